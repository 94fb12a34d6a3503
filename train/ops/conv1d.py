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
from torch.autograd.function import once_differentiable

from train.ops.reference_math import compute_dtype, outside_autocast

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref"]


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


@outside_autocast
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
        x: (b, d, l) channel-first; a transposed view of token-major memory, as the model passes
            it, is read without a copy.
        weight: (d, k); tap ``k-1`` multiplies the current token.
        bias: (d,).
        seq_idx: (b, l) int sample index per token (non-decreasing along a row).
        activation: None, "silu" or "swish".

    Returns:
        (b, d, l) in ``x.dtype``: a transposed view of token-major memory, the layout the model
        reads it in.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be (dim={d}, width), got {tuple(weight.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx must be (batch, seqlen) = {(b, l)}, got {tuple(seq_idx.shape)}")
    y = _CausalConv1d.apply(x.transpose(1, 2), weight, bias, seq_idx, activation)  # (b, l, d)
    return y.transpose(1, 2)


class _CausalConv1d(torch.autograd.Function):
    """The conv in token-major layout, (b, l, d), with a hand-written backward.

    Forward and the input gradient run as one depthwise conv each (oneDNN's channels-last kernel,
    an order of magnitude faster than a channel-first conv1d on this layout, with no transposing
    copies); the weight gradient is k multiply-sums. Only the left-padded input is kept: the
    pre-activation is recomputed in backward (one cheap conv) rather than stored.

    Packed rows: outputs whose window reaches into an earlier sample (the first k - 1 tokens after
    each boundary), and input gradients whose taps reach into a later one, are recomputed from
    their own sample's tokens only (`_taps_at`), so no sample reads another's values.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                activation: str | None) -> Tensor:
        cdt = compute_dtype(x)
        k = weight.shape[1]
        wf = weight.to(cdt)
        bf = None if bias is None else bias.to(cdt)
        padded = F.pad(x.to(cdt), (0, 0, k - 1, 0))  # (b, k-1+l, d): zeros before the first token
        pre = _conv_token_major(padded, wf, bf, seq_idx)  # (b, l, d)
        ctx.save_for_backward(padded, wf, bf, seq_idx)
        ctx.activated, ctx.in_dtype, ctx.weight_dtype = activation is not None, x.dtype, weight.dtype
        return _activate(pre, activation).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        padded, wf, bf, seq_idx = ctx.saved_tensors
        k = wf.shape[1]
        l = padded.shape[1] - (k - 1)
        grad = grad.to(padded.dtype)
        if ctx.activated:  # silu
            grad = torch.ops.aten.silu_backward(grad, _conv_token_major(padded, wf, bf, seq_idx))
        # d/dx[t] = sum_s w[:, k-1-s] * grad[t+s]: the same conv, anti-causal, with the taps reversed.
        grad_x = _conv_token_major(F.pad(grad, (0, 0, 0, k - 1)), wf.flip(1), None, seq_idx, reverse=True)
        # d/dw[:, j] = sum_t grad[t] * x[t - (k-1-j)]; the product is zeroed where the tap would
        # cross a sample boundary.
        grad_w = torch.empty_like(wf)
        for j in range(k):
            prod = grad * padded[:, j:j + l]  # (b, l, d)
            if seq_idx is not None and j < k - 1:
                rows, cols = _crossing(seq_idx, k - 1 - j, reverse=False)
                prod[rows, cols] = 0.0
            grad_w[:, j] = prod.sum((0, 1))
        grad_b = None if bf is None else grad.sum((0, 1)).to(bf.dtype)
        return grad_x.to(ctx.in_dtype), grad_w.to(ctx.weight_dtype), grad_b, None, None


def _conv_token_major(padded: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                      reverse: bool = False) -> Tensor:
    """Depthwise conv over the k-1 padded (b, k-1+l, d) input -> (b, l, d), isolated per sample.

    Forward (`reverse=False`): out[t] = sum_j weight[:, j] * x[t - (k-1-j)], x padded on the left.
    Input gradient (`reverse=True`, weight flipped, grad padded on the right): out[t] = sum_j
    weight[:, j] * grad[t + j]. The few outputs whose taps cross a boundary are recomputed.
    """
    b, _, d = padded.shape
    k = weight.shape[1]
    # (b, d, 1, L) channels-last view of the token-major memory: oneDNN's fast depthwise kernel.
    out = F.conv2d(padded.transpose(1, 2).unsqueeze(2), weight[:, None, None, :], bias, groups=d)
    out = out.squeeze(2).transpose(1, 2)  # (b, l, d), token-major in memory
    if seq_idx is not None and k > 1:
        rows, cols = _crossing(seq_idx, range(1, k), reverse)
        if rows.numel():
            exact = _taps_at(padded, weight, seq_idx, rows, cols, reverse)  # (m, d)
            out[rows, cols] = exact if bias is None else exact + bias
    return out


def _crossing(seq_idx: Tensor, shifts: int | range, reverse: bool) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the outputs whose tap `shifts` tokens back (forward) or ahead (`reverse`)
    reads a token of another sample. Taps reading before the row's start or past its end read the
    padding's zeros, as an unpacked sample would."""
    b, l = seq_idx.shape
    crossing = torch.zeros(b, l, dtype=torch.bool, device=seq_idx.device)
    for shift in [shifts] if isinstance(shifts, int) else shifts:
        if shift >= l:
            continue
        differs = seq_idx[:, shift:] != seq_idx[:, :-shift]  # (b, l - shift)
        if reverse:
            crossing[:, :-shift] |= differs
        else:
            crossing[:, shift:] |= differs
    return crossing.nonzero(as_tuple=True)


def _taps_at(padded: Tensor, weight: Tensor, seq_idx: Tensor, rows: Tensor, cols: Tensor,
             reverse: bool) -> Tensor:
    """The conv at the (rows, cols) outputs from their own sample's tokens only -> (m, d)."""
    k = weight.shape[1]
    l = seq_idx.shape[1]
    exact = padded.new_zeros(rows.shape[0], padded.shape[2])  # (m, d)
    for j in range(k):
        src = cols + j if reverse else cols - (k - 1 - j)  # the token tap j reads
        inside = (src >= 0) & (src < l)
        src_in = src.clamp(0, l - 1)
        same = inside & (seq_idx[rows, src_in] == seq_idx[rows, cols])
        # padded holds token t at t + (k-1) (forward: left padding), or at t (reverse: right padding)
        value = padded[rows, src_in if reverse else src_in + (k - 1)]  # (m, d)
        exact = exact + weight[:, j] * (value * same.unsqueeze(1).to(padded.dtype))
    return exact


@outside_autocast
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
    cdt = compute_dtype(x)
    full = torch.cat([conv_state.to(cdt), x.to(cdt).unsqueeze(-1)], dim=-1)  # (b, d, s + 1)
    window = full[..., -k:]  # (b, d, k)
    y = (window * weight.to(cdt)).sum(-1)  # (b, d)
    if bias is not None:
        y = y + bias.to(cdt)
    y = _activate(y, activation).to(x.dtype)
    new_state = full[..., -s:].to(conv_state.dtype)  # (b, d, s)
    return y, new_state
