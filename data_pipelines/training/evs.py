"""Efficient video sampling (EVS), data side: how many tokens a video keeps, and its pruning rate.

The model scores a video's tokens after the projector and keeps the most changed ones
(`train/model/evs.py`); the *number* it keeps depends only on the frame count, the tokens per
frame and the pruning rate q, so the data side knows every sample's exact length before the
forward and the packer plans rows with it. Training draws q per video (mode `range`) so the
model learns to read videos at any pruning rate it may be served with, including none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

EVS_MODES = ("off", "fixed", "range")


@dataclass(frozen=True)
class EvsConfig:
    """`off`: every frame keeps all its tokens. `fixed`: every video is pruned at rate `q`.
    `range`: each video draws q uniformly from [`q_min`, `q_max`]. Rates are in [0, 1).
    In YAML write `mode: "off"` quoted: a bare `off` is a YAML boolean."""

    mode: Literal["off", "fixed", "range"] = "off"
    q: float = 0.0
    q_min: float = 0.0
    q_max: float = 0.0

    def validate(self, path: str = "evs") -> None:
        """Raises ValueError naming the field (e.g. `data.evs.q_max`) and what to set."""
        if self.mode not in EVS_MODES:
            raise ValueError(f"{path}.mode={self.mode!r}: choose one of {list(EVS_MODES)}")
        for name in ("q", "q_min", "q_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{path}.{name}={value!r} must be a pruning rate in [0, 1)")
        if self.q_min > self.q_max:
            raise ValueError(f"{path}.q_min={self.q_min} must be <= {path}.q_max={self.q_max}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def kept_token_count(num_frames: int, tokens_per_frame: int, q: float) -> int:
    """Tokens a video keeps at pruning rate q: `max(P, int(T * P * (1 - q)))`.

    The floor of one frame's worth is what makes frame 0 (always kept whole) fit at any q.
    """
    if num_frames < 1 or tokens_per_frame < 1:
        raise ValueError(f"a video needs >= 1 frame and >= 1 token per frame, got {num_frames} x {tokens_per_frame}")
    if not 0.0 <= q < 1.0:
        raise ValueError(f"pruning rate q={q} must be in [0, 1)")
    return max(tokens_per_frame, int(num_frames * tokens_per_frame * (1.0 - q)))


def sample_q(cfg: EvsConfig, rng: random.Random) -> float:
    """This video's pruning rate. Draws from `rng` only in `range` mode, so switching modes never
    shifts the other draws made from the same per-sample stream."""
    if cfg.mode == "off":
        return 0.0
    if cfg.mode == "fixed":
        return cfg.q
    return rng.uniform(cfg.q_min, cfg.q_max)


def provisional_frame_counts(num_frames: int, tokens_per_frame: int, kept: int) -> list[int]:
    """Context tokens per frame in the sample as the data side writes it, before the model knows
    which tokens survive: frame 0 whole (EVS always keeps it), the rest spread evenly over the
    later frames (earlier frames take the remainder). The model rewrites the video's span with
    the real per-frame counts (`train.model.evs.relayout_video_span`); only the total, and so
    the sample's length, is fixed here.
    """
    if not tokens_per_frame <= kept <= num_frames * tokens_per_frame:
        raise ValueError(f"kept={kept} must be in [{tokens_per_frame}, {num_frames * tokens_per_frame}]")
    rest, later = kept - tokens_per_frame, num_frames - 1
    if not later:
        return [tokens_per_frame]
    base, extra = divmod(rest, later)
    return [tokens_per_frame] + [base + (i < extra) for i in range(later)]
