"""RMS norms: pure-torch reference twins.

:func:`rms_norm_ref` is the plain RMSNorm of the Nemotron-H blocks.
:func:`gated_rms_norm_ref` is Mamba2's ``RMSNormGated`` (mamba_ssm
``layernorm_gated.rmsnorm_fn``): a silu(z) gate plus RMS normalisation over
groups of ``group_size`` channels. Nemotron-H uses
``group_size = d_inner // n_groups`` and ``norm_before_gate=False``; grouping
matters under tensor parallelism, where each rank owns whole groups and the
norm must not mix them.

Both compute in float32 (weight multiply included) and cast back to
``x.dtype``, so bf16 activations are normalised with fp32 statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rms_norm_ref", "gated_rms_norm_ref"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

    x: (..., d); weight: (d,) -> (..., d) in ``x.dtype``.
    """
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (xf * rstd * weight.to(cdt)).to(x.dtype)


def gated_rms_norm_ref(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Mamba2 gated RMSNorm.

    ``norm_before_gate=False`` (Nemotron-H): ``rmsnorm(x * silu(z)) * weight``.
    ``norm_before_gate=True``: ``rmsnorm(x) * weight * silu(z)``.

    Args:
        x: (..., d); z: (..., d) gate or None (then a grouped RMSNorm).
        weight: (d,).
        group_size: channels per normalisation group (d % group_size == 0);
            None normalises over all d channels.

    Returns:
        (..., d) in ``x.dtype``.
    """
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    if gs <= 0 or d % gs != 0:
        raise ValueError(f"group_size ({group_size}) must divide the channel dim ({d})")
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.reshape(*xf.shape[:-1], d // gs, gs)  # (..., groups, group_size)
    rstd = torch.rsqrt(xg.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., groups, 1)
    out = (xg * rstd).reshape(xf.shape) * weight.to(cdt)  # (..., d)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
