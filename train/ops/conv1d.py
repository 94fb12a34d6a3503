"""Depthwise causal conv1d: pure-torch reference twins of the ``causal_conv1d`` package.

:func:`causal_conv1d_ref` mirrors ``causal_conv1d_fn`` (channel-first ``(b, d, l)``,
weight ``(d, k)``) and :func:`causal_conv1d_update_ref` mirrors
``causal_conv1d_update`` for cached generation, but functionally (the new state
is returned, nothing is updated in place).

Packed sequences: with ``seq_idx`` a tap that would read a token of an earlier
sample reads zero instead, so every sample sees exactly the zero left padding it
would see if convolved alone. Computation is in float32 (float64 kept), the
result comes back in ``x.dtype``, as the CUDA kernel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    *,
    activation: str | None = None,
) -> Tensor:
    """Causal depthwise conv over time, isolated per packed sample.

    ``activation`` is keyword-only because ``causal_conv1d_fn`` has other
    arguments (initial_states, ...) between ``seq_idx`` and it.

    Args:
        x: (b, d, l) channel-first.
        weight: (d, k); tap ``k-1`` multiplies the current token.
        bias: (d,).
        seq_idx: (b, l) int sample index per token (non-decreasing along a row).
        activation: None, "silu" or "swish".

    Returns:
        (b, d, l) in ``x.dtype``.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be (dim={d}, width), got {tuple(weight.shape)}")
    k = weight.shape[1]
    cdt = _compute_dtype(x)
    xf, wf = x.to(cdt), weight.to(cdt)
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx must be (batch, seqlen) = {(b, l)}, got {tuple(seq_idx.shape)}")

    # One shifted copy per tap instead of unfolding a (b, d, l, k) window:
    # memory stays O(b*d*l) whatever the kernel width.
    y = xf.new_zeros(b, d, l)
    for j in range(k):
        shift = k - 1 - j  # tap j reads token t - shift
        if shift >= l:
            continue
        xs = F.pad(xf, (shift, 0))[..., :l]  # (b, d, l): xs[..., t] = x[..., t - shift] (0 before start)
        if seq_idx is not None and shift > 0:
            # Reading across a sample boundary must give the zero the sample
            # would have seen alone; torch.where keeps other samples bit-exact.
            src = F.pad(seq_idx, (shift, 0), value=-1)[:, :l]  # (b, l)
            same = (src == seq_idx).unsqueeze(1)  # (b, 1, l)
            xs = torch.where(same, xs, torch.zeros((), dtype=cdt, device=x.device))
        y = y + wf[:, j, None] * xs
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_update_ref(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step with a rolling window of past inputs.

    Args:
        x: (b, d) the new token's inputs.
        conv_state: (b, d, s) the last ``s`` inputs, oldest first, with
            ``s >= k - 1``. ``s == k`` is the transformers/HF cache layout,
            ``s == k - 1`` the causal_conv1d one; both work. A prefill can build
            it as ``F.pad(x, (s - l, 0))[..., -s:]`` (zero when l < s).
        weight: (d, k); bias: (d,); activation: None, "silu" or "swish".

    Returns:
        y (b, d) in ``x.dtype`` and the new state (b, d, s) (window shifted left
        by one, ``x`` appended) in ``conv_state.dtype``.
    """
    d, k = weight.shape
    s = conv_state.shape[-1]
    if s < k - 1:
        raise ValueError(f"conv_state holds {s} steps but width {k} needs at least {k - 1}")
    cdt = _compute_dtype(x)
    full = torch.cat([conv_state.to(cdt), x.to(cdt).unsqueeze(-1)], dim=-1)  # (b, d, s + 1)
    window = full[..., -k:]  # (b, d, k)
    y = (window * weight.to(cdt)).sum(-1)  # (b, d)
    if bias is not None:
        y = y + bias.to(cdt)
    y = _activate(y, activation).to(x.dtype)
    new_state = full[..., -s:].to(conv_state.dtype)  # (b, d, s)
    return y, new_state
