"""Per-tensor FP8 delayed scaling, exactly as Transformer Engine's `DelayedScaling` recipe defines it.

Each FP8 tensor (an input, a weight or an output gradient of one GEMM) owns one column of
`amax_history` (len, N) and one entry of `scale` (N,), in TE's layout: row 0 collects the amax of
the step in progress (the max over its micro-batches), rows 1..len-1 hold the previous steps'
amaxes, oldest first. The scale used during step t was computed from the history before step t:

    update after step t:  window = rows 1..len-1 + [amax_t]          (the last `len` amaxes)
                          amax   = max(window) | amax_t              (amax_compute_algo)
                          scale  = fp8_max * 2**-margin / amax       (previous scale if amax is 0,
                                                                      inf or NaN; float32 max if
                                                                      the quotient overflows)
                          history = [0, rows 2..len-1, amax_t]

A tensor that recorded amax 0 in a step (unused, or all zeros) keeps its history and scale, as TE's
fused update (`kernel_bulk` in delayed_scaling.cu, the default path) does. Quantisation saturates:
values beyond the format's largest finite number clip to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from train.parallel.distributed import all_reduce_max_

# The ranks that hold the same linears and so must agree on their scales: the gradient replicas.
AMAX_GROUP = "data_context"

FP32_MAX = torch.finfo(torch.float32).max


def fp8_max(dtype: torch.dtype) -> float:
    """448 for float8_e4m3fn, 57344 for float8_e5m2."""
    return float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class DelayedScalingRecipe:
    """The fields of TE's `DelayedScaling` that change numerics, plus the wgrad switch."""

    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0
    fp8_wgrad: bool = True

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self.fp8_format == "hybrid" else torch.float8_e4m3fn


def compute_scale(amax: Tensor, scale: Tensor, max_value: Tensor, margin: int) -> Tensor:
    """New scales (N,) from amaxes (N,), previous scales (N,) and format maxima (N,), all float32."""
    new = (max_value * 2.0 ** -margin) / amax
    new = torch.where((amax > 0) & torch.isfinite(amax), new, scale)
    # A tiny but nonzero amax overflows the quotient; TE then settles for the largest float32.
    return torch.where(torch.isinf(new), torch.full_like(new, FP32_MAX), new)


def update_history_and_scale(amax_history: Tensor, scale: Tensor, max_value: Tensor,
                             recipe: DelayedScalingRecipe, step_amax: Tensor | None = None) -> None:
    """In place: roll every column's history and recompute its scale (TE's fused update).

    `step_amax` (N,) replaces row 0 when given (the step's amax reduced over data-parallel ranks).
    """
    last = amax_history[0] if step_amax is None else step_amax  # (N,)
    window = torch.cat([amax_history[1:], last[None]])  # (len, N): the last `len` amaxes
    if recipe.amax_compute_algo == "max":
        # CUDA's fmaxf skips NaN; so does this.
        amax = torch.where(torch.isnan(window), torch.zeros_like(window), window).amax(dim=0)
    else:
        amax = last
    recorded = last != 0
    amax = torch.where(recorded, amax, torch.zeros_like(amax))
    rolled = window.clone()
    rolled[0] = 0  # the slot the next step records into
    scale.copy_(compute_scale(amax, scale, max_value, recipe.margin))
    amax_history.copy_(torch.where(recorded, rolled, amax_history))


def quantize(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """x * scale in float32, clipped to the format's finite range, rounded to nearest-even FP8.

    The clip is explicit because what a plain cast does out of range (saturate, inf or NaN)
    differs between formats and backends; TE's casts saturate.
    """
    limit = fp8_max(dtype)
    return (x.float() * scale).clamp_(-limit, limit).to(dtype)


class DelayedScalingState:
    """The FP8 meta of N tensors: amax histories, scales and this step's saturation flags.

    Plain tensors rather than module buffers on purpose: DDP broadcasts buffers from rank 0 before
    every forward, which would overwrite the amax a rank recorded in an earlier micro-batch.
    """

    def __init__(self, recipe: DelayedScalingRecipe, dtypes: list[torch.dtype], device: torch.device):
        n = len(dtypes)
        self.recipe = recipe
        self.dtypes = list(dtypes)
        self.max_value = torch.tensor([fp8_max(d) for d in dtypes], dtype=torch.float32, device=device)
        self.amax_history = torch.zeros(recipe.amax_history_len, n, dtype=torch.float32, device=device)
        self.scale = torch.ones(n, dtype=torch.float32, device=device)
        self.saturated = torch.zeros(n, dtype=torch.float32, device=device)  # 1 where a value clipped
        # Off while a checkpointed layer reruns in backward: its tensors were recorded in the forward.
        self.recording = True

    @property
    def num_tensors(self) -> int:
        return len(self.dtypes)

    def quantize(self, x: Tensor, col: int) -> tuple[Tensor, Tensor]:
        """FP8 copy of `x` with column `col`'s current scale, and that scale's inverse; records
        |x|'s max into the step's amax and whether any value clipped."""
        scale = self.scale[col]
        if x.numel() and self.recording:
            with torch.no_grad():
                amax = x.detach().abs().amax().float()
                self.amax_history[0, col] = torch.maximum(self.amax_history[0, col], amax)
                # |x_i * s| is monotone in |x_i|, so the largest value decides whether any clipped.
                clipped = (amax * scale > self.max_value[col]).float()
                self.saturated[col] = torch.maximum(self.saturated[col], clipped)
        return quantize(x, scale, self.dtypes[col]), scale.reciprocal()

    def step(self) -> dict[str, Tensor]:
        """Every column at once: `stats` (of the scales just used), then `update` of all columns."""
        stats = self.stats()
        self.update(torch.arange(self.num_tensors, device=self.scale.device))
        return stats

    def update(self, columns: Tensor) -> None:
        """Reduce the amaxes `columns` recorded since their last update over ranks, roll their
        histories and recompute their scales. Transformer Engine does this for a module's forward
        tensors when an FP8 autocast exits and for its gradients after their backward, i.e. once
        per micro-batch; the emulation follows it (`EmulatedFp8Precision`)."""
        # Every replica must quantise with the same scales, as TE's amax reduction guarantees.
        step_amax = all_reduce_max_(self.amax_history[0, columns].clone(), AMAX_GROUP)
        history, scale = self.amax_history[:, columns], self.scale[columns]  # copies (advanced indexing)
        update_history_and_scale(history, scale, self.max_value[columns], self.recipe, step_amax)
        self.amax_history[:, columns], self.scale[columns] = history, scale

    def stats(self) -> dict[str, Tensor]:
        """Statistics since the last call, over every rank (0-d tensors, no host sync): the fraction
        of tensors that saturated and the smallest / largest scale in use."""
        saturated = all_reduce_max_(self.saturated.clone(), AMAX_GROUP)
        self.saturated.zero_()
        return {"fp8_saturated_frac": saturated.mean(), "fp8_scale_min": self.scale.min(),
                "fp8_scale_max": self.scale.max()}
