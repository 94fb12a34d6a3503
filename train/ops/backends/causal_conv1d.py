"""causal-conv1d CUDA kernel behind the Mamba depthwise conv: the one module importing causal_conv1d.

:func:`causal_conv1d_cuda` has the exact signature of :func:`train.ops.causal_conv1d_ref`, so the
model swaps it by config (`model.kernels.conv1d=causal_conv1d`, see `train.ops.backends`).

Layout the kernel needs (checked against causal-conv1d 1.4-1.6 ``csrc/causal_conv1d.cpp``): x is
(b, d, l) and either channel-first (``x.stride(2) == 1``) or channel-last (``x.stride(1) == 1``).
``seq_idx`` (which resets the conv window at packed-sample boundaries) is supported only in the
channel-last layout, and that layout further needs ``d % 8 == 0`` and ``x.stride(0)``,
``x.stride(2)`` multiples of 8; seq_idx must be int32 and contiguous. The conv input of a Mamba
layer is a slice of in_proj's output whose row stride (in_proj's width) is usually not a multiple
of 8, so x is re-laid out channel-last with ``x.transpose(1, 2).contiguous().transpose(1, 2)``
unless it already qualifies (mamba_ssm's ``ensure_stride`` does the same). Width is 2..4; the
weight may be float32 while x is bf16 (autocast), but bias must have the weight's dtype.

The import is guarded: on a machine without a working causal_conv1d this module still imports
and ``IMPORT_ERROR`` says why; `train.ops.dispatch` turns that into an install hint at model build.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from causal_conv1d import causal_conv1d_fn

    IMPORT_ERROR: Exception | None = None
except Exception as err:  # an ABI-mismatched extension raises ImportError or OSError
    IMPORT_ERROR = err

__all__ = ["IMPORT_ERROR", "causal_conv1d_cuda", "channel_last"]


def channel_last(x: Tensor) -> Tensor:
    """(b, d, l) with channels contiguous, 8-aligned strides and a 16-byte aligned start, as the
    seq_idx path requires (a slice of in_proj's output starts after z)."""
    if (x.stride(1) == 1 and x.stride(2) > 1 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0):
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, memory (b, l, d)


def causal_conv1d_cuda(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    *,
    activation: str | None = None,
) -> Tensor:
    """Causal depthwise conv over time, isolated per packed sample (fused forward and backward).

    x: (b, d, l); weight: (d, k); bias: (d,); seq_idx: (b, l); activation: None, "silu" or
    "swish". Returns (b, d, l) in x's dtype, channel-last in memory unless x was channel-first
    contiguous and seq_idx is None.
    """
    if not x.is_cuda:
        raise RuntimeError(f"model.kernels.conv1d=causal_conv1d runs on CUDA tensors only, got {x.device}: "
                           "set model.kernels.conv1d=torch on this device")
    if seq_idx is not None or x.stride(2) != 1:
        # seq_idx needs channel-last; a channel-last-ish slice (in_proj's output) needs aligned strides.
        x = channel_last(x)
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()  # (b, l)
    return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation)
