"""The batch contract: what a model consumes, built by the collator and passed whole.

One packed micro-batch of `B` rows of `L` token slots. Besides the token ids it carries what
every engine needs to keep packed samples apart (`seq_idx`, `cu_seqlens`, `position_ids`), the
loss targets (next-token ids that never cross a sample boundary, and a weight per target), the
media tiles with the sample each belongs to, and the EVS rows of pruned videos. The native model
reads it directly; megatron-core's packed-sequence parameters (THD `cu_seqlens`, labels and loss
mask) are a view of the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from data_pipelines.training.conversation import IGNORE_INDEX

LOSS_WEIGHTINGS = ("token", "sqrt_turn")


@dataclass
class PackedBatch:
    input_ids: Tensor  # (B, L) int64
    labels: Tensor  # (B, L) int64, -100 on padding and unsupervised tokens
    targets: Tensor  # (B, L) int64, labels[t + 1] when t + 1 is in the same sample, else -100
    target_weights: Tensor  # (B, L) float32, loss weight of each target (0 where it is -100)
    position_ids: Tensor  # (B, L) int64, restarting at 0 per sample
    seq_idx: Tensor  # (B, L) int32, segment index over the flattened batch (padding is its own segment)
    cu_seqlens: Tensor  # (S + 1,) int32, segment boundaries over the flattened B * L tokens
    tiles: Tensor  # (N, 3, T, T) uint8, media of all samples in token order
    media_sample_index: Tensor  # (N,) int64, segment index of each tile's sample
    num_samples: int
    num_real_tokens: int
    # (V, 5) int64, one row per video under EVS: [first tile in `tiles`, frames, kept tokens,
    # span start (flat index over B * L), span length]; see train.model.evs.prune_videos.
    video_evs: Tensor = field(default_factory=lambda: torch.zeros(0, 5, dtype=torch.int64))

    @classmethod
    def build(cls, input_ids: Tensor, labels: Tensor, seq_idx: Tensor, cu_seqlens: Tensor,
              tiles: Tensor | None = None, *, video_evs: Tensor | None = None, loss_weighting: str = "token",
              position_ids: Tensor | None = None, media_sample_index: Tensor | None = None,
              num_samples: int | None = None, num_real_tokens: int | None = None) -> "PackedBatch":
        """A batch from its token-level tensors; targets and their weights are derived here, once.

        Fields left out take what a batch of unpadded samples would have: positions restart at
        every `seq_idx` change, each segment counts as a sample, every token is real.
        """
        if position_ids is None:
            position_ids = positions_from_seq_idx(seq_idx)
        if tiles is None:
            tiles = torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
        return cls(
            input_ids=input_ids, labels=labels,
            targets=next_token_targets(labels, seq_idx),
            target_weights=next_token_targets_weights(token_weights(labels, seq_idx, loss_weighting), seq_idx),
            position_ids=position_ids, seq_idx=seq_idx, cu_seqlens=cu_seqlens, tiles=tiles,
            media_sample_index=(torch.zeros(tiles.shape[0], dtype=torch.int64)
                                if media_sample_index is None else media_sample_index),
            num_samples=cu_seqlens.numel() - 1 if num_samples is None else num_samples,
            num_real_tokens=input_ids.numel() if num_real_tokens is None else num_real_tokens,
            video_evs=torch.zeros(0, 5, dtype=torch.int64) if video_evs is None else video_evs,
        )

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)

    @property
    def num_supervised_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def loss_weight(self) -> float:
        """Sum of the target weights (the supervised-target count under per-token weighting)."""
        return float(self.target_weights.sum())


def positions_from_seq_idx(seq_idx: Tensor) -> Tensor:
    """(B, L) positions restarting at 0 wherever the segment changes (and at each row start)."""
    b, l = seq_idx.shape
    index = torch.arange(l).expand(b, l)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start_at = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_at


def next_token_targets(labels: Tensor, seq_idx: Tensor) -> Tensor:
    """Target of position t is labels[t+1] if t+1 is in the same sample, else ignored."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    same = seq_idx[:, 1:] == seq_idx[:, :-1]
    targets[:, :-1] = torch.where(same, labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX))
    return targets


def token_weights(labels: Tensor, seq_idx: Tensor, mode: str) -> Tensor:
    """Loss weight of each supervised label (0 elsewhere), (B, L) float32.

    "token": 1 per supervised token (per-token mean). "sqrt_turn": each assistant turn (a run of
    consecutive supervised labels within a sample) weighs 1/sqrt(its length) per token, so a turn
    counts sqrt(length) in total: long answers still count more than short ones, but not
    linearly (Megatron's --use-loss-scaling idea of scaling by turn length).
    """
    supervised = labels != IGNORE_INDEX
    if mode == "token":
        return supervised.float()
    if mode != "sqrt_turn":
        raise ValueError(f"unknown loss weighting {mode!r}; use one of {LOSS_WEIGHTINGS}")
    flat_sup, flat_seq = supervised.flatten(), seq_idx.flatten()
    starts = flat_sup.clone()
    starts[1:] &= ~flat_sup[:-1] | (flat_seq[1:] != flat_seq[:-1])
    run = torch.cumsum(starts.long(), 0) * flat_sup  # 1-based turn id per supervised token, 0 elsewhere
    lengths = torch.bincount(run, minlength=int(run.max()) + 1).float()
    weights = torch.where(flat_sup, lengths[run].clamp(min=1).rsqrt(), torch.zeros_like(lengths[run]))
    return weights.reshape(labels.shape)


def next_token_targets_weights(weights: Tensor, seq_idx: Tensor) -> Tensor:
    """Weights aligned with `next_token_targets`: position t carries the weight of label t+1."""
    shifted = torch.zeros_like(weights)
    same = seq_idx[:, 1:] == seq_idx[:, :-1]
    shifted[:, :-1] = torch.where(same, weights[:, 1:], torch.zeros_like(weights[:, 1:]))
    return shifted
