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

from train.ops.reference_math import compute_dtype

__all__ = ["rms_norm_ref", "gated_rms_norm_ref"]


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

    x: (..., d); weight: (d,) -> (..., d) in ``x.dtype``.
    """
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    """Keeps x and the per-row 1/rms for backward (not the normalised copies autograd would keep)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.to(compute_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _normalized_backward(grad, x.to(rstd.dtype), rstd, weight, ctx.needs_input_grad[1])
        return grad_x.to(x.dtype), grad_weight, None


def _normalized_backward(grad: Tensor, xg: Tensor, rstd: Tensor, weight: Tensor, weight_grad: bool
                         ) -> tuple[Tensor, Tensor | None]:
    """Gradients of ``out = xg * rstd * weight``, rstd = 1 / rms over the last dim of `xg`; `grad`
    shaped as `xg`, `weight` broadcasting against it:
    d/dxg = rstd * (gw - xhat * mean(gw * xhat)), gw = grad * weight, xhat = xg * rstd."""
    xhat = xg * rstd
    g = grad.to(rstd.dtype)
    grad_weight = None
    if weight_grad:
        grad_weight = (g * xhat).reshape(-1, weight.numel()).sum(0).reshape(weight.shape).to(weight.dtype)
    gw = g * weight.to(rstd.dtype)
    # In place on the one new activation-sized tensor: each pass over it costs as much as the math.
    grad_x = gw.addcmul_(xhat, (gw * xhat).mean(dim=-1, keepdim=True), value=-1.0).mul_(rstd)
    return grad_x, grad_weight


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
    if not norm_before_gate:  # Nemotron-H's order: one fused step (see _GatedRMSNorm)
        return _GatedRMSNorm.apply(x, z, weight, eps, gs)
    cdt = compute_dtype(x)
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


class _GatedRMSNorm(torch.autograd.Function):
    """``rmsnorm(x * silu(z)) * weight`` over groups, keeping only x, z and the per-group 1/rms for
    backward: the gate and the normalised copies (four activation-sized tensors under autograd)
    are recomputed there."""

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int) -> Tensor:
        d = x.shape[-1]
        u = x.to(compute_dtype(x))
        if z is not None:
            u = u * F.silu(z.to(u.dtype))
        ug = u.reshape(*u.shape[:-1], d // group_size, group_size)  # (..., groups, group_size)
        rstd = torch.rsqrt(ug.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., groups, 1)
        # z is usually a slice of a wider projection: a copy of its own lets that be freed.
        ctx.save_for_backward(x, None if z is None else z.contiguous(), weight, rstd)
        return (ug * rstd).reshape(u.shape).mul_(weight.to(u.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, z, weight, rstd = ctx.saved_tensors
        cdt = rstd.dtype
        xf = x.to(cdt)
        zf = None if z is None else z.to(cdt)
        gate = None if zf is None else F.silu(zf)
        u = xf if gate is None else xf * gate
        ug = u.reshape(*rstd.shape[:-1], -1)  # (..., groups, group_size)
        grad_u, grad_weight = _normalized_backward(grad.reshape(ug.shape), ug, rstd, weight.reshape(ug.shape[-2:]),
                                                   ctx.needs_input_grad[2])
        grad_u = grad_u.reshape(x.shape)
        grad_weight = None if grad_weight is None else grad_weight.reshape(weight.shape)
        grad_z = None
        if zf is not None and ctx.needs_input_grad[1]:
            grad_z = torch.ops.aten.silu_backward(grad_u * xf, zf).to(z.dtype)  # d silu(z) / dz
        grad_x = grad_u if gate is None else grad_u.mul_(gate)
        return grad_x.to(x.dtype), grad_z, grad_weight, None, None
