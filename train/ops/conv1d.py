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

    # One depthwise conv over the whole row (torch's fused kernel: no shifted copies per tap), then
    # the few outputs whose window reaches into an earlier sample (the first k - 1 tokens after each
    # boundary) recomputed from their own sample's tokens only. Outputs are never shared across
    # samples, so changing one sample leaves every other sample's outputs bit-identical.
    y = F.conv1d(F.pad(xf, (k - 1, 0)), wf.unsqueeze(1), groups=d)  # (b, d, l)
    if seq_idx is not None and k > 1 and l > 1:
        crossing = torch.zeros(b, l, dtype=torch.bool, device=x.device)
        for shift in range(1, min(k, l)):
            crossing[:, shift:] |= seq_idx[:, shift:] != seq_idx[:, :-shift]
        rows, cols = crossing.nonzero(as_tuple=True)  # (m,) each: outputs to recompute
        if rows.numel():
            exact = xf.new_zeros(rows.shape[0], d)  # (m, d)
            for j in range(k):
                src = cols - (k - 1 - j)  # the token tap j reads
                same = (src >= 0) & (seq_idx[rows, src.clamp(min=0)] == seq_idx[rows, cols])
                exact = exact + wf[:, j] * (xf[rows, :, src.clamp(min=0)] * same.unsqueeze(1).to(cdt))
            y[rows, :, cols] = exact  # in place: the conv's backward does not need its output
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    # The activation runs token-major, (b, l, d) in memory, the layout the model reads the output in
    # (`.transpose(1, 2)`): its backward then gets its gradient in its own layout, where a
    # channel-major input makes silu's backward several times slower. Returned as (b, d, l).
    y = y.transpose(1, 2).contiguous()  # (b, l, d)
    return _activate(y, activation).to(x.dtype).transpose(1, 2)


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
