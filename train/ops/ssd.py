"""Mamba2 SSD (state space duality) scan: pure-torch reference twins.

Three views of one recurrence, per head ``h`` with a ``(p, n)`` state::

    dt_t  = clamp(softplus?(dt_t + dt_bias), *dt_limit)
    S_t   = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        # (p, n)
    y_t   = S_t C_t + D * x_t ;  y_t *= silu(z_t)  (when z is given)

- :func:`ssd_scan_ref` is the chunked SSD form (quadratic inside a chunk, state
  passing between chunks) that the model uses on CPU. Its signature mirrors
  ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` so the Triton
  kernel can be swapped in by config. Its math, forward and hand-written backward,
  is :class:`train.ops.ssd_chunked.ChunkedScan`.
- :func:`ssd_recurrent_ref` is the plain token-by-token loop: slow, obviously
  right, the ground truth for tests.
- :func:`ssd_step_ref` advances a cached state by one token for generation
  (the counterpart of ``selective_state_update``).

Packed sequences ("Packing never leaks"): ``seq_idx`` (b, l) gives the sample
index of each token (non-decreasing along a row). The state is reset to zero
at every change of ``seq_idx``, including changes inside a chunk, so a packed
row computes exactly what each sample would compute alone. ``initial_states``
belongs to the first sample of a row only, and with ``seq_idx`` only when that
sample's index is 0: mamba_ssm's kernel carries the initial state while the
sample index equals 0, so a row whose first token has another index starts
from zero there, and the references do the same (`_row_initial_states`).

All math runs in float32 (float64 when the inputs are float64, so gradcheck
works); ``y`` comes back in ``x.dtype``; final states stay in the compute dtype
because a recurrent state rounded to bf16 drifts over long generations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from train.ops.reference_math import compute_dtype, outside_autocast

from train.ops.ssd_chunked import ChunkedScan

__all__ = ["ssd_scan_ref", "ssd_recurrent_ref", "ssd_step_ref"]


def _discretize_dt(
    dt: Tensor,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> Tensor:
    """Bias, softplus, clamp -- in that order, as mamba_ssm's chunk-cumsum kernel.

    The clamp is applied unconditionally (like the kernel), so with the default
    limit ``(0, inf)`` a negative raw ``dt`` without softplus becomes 0.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        # threshold=20 matches the kernel's `where(dt <= 20, softplus(dt), dt)`.
        dt = F.softplus(dt, beta=1.0, threshold=20.0)
    lo, hi = dt_limit
    if lo > -math.inf or hi < math.inf:
        dt = dt.clamp(min=lo if lo > -math.inf else None, max=hi if hi < math.inf else None)
    return dt


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[int, int, int, int, int, int]:
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(
            f"B and C must both be (batch={b}, seqlen={l}, ngroups, dstate), got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be a multiple of ngroups ({g})")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, seqlen, nheads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    return b, l, h, p, g, n


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D*x, then y * silu(z): the order of mamba_chunk_scan_combined.

    Works for any leading dims as long as the last two are (h, p).
    """
    if D is not None:
        Df = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Df if Df.ndim == 2 else Df[:, None])  # D (h,) or (h, p)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _row_initial_states(initial_states: Tensor, seq_idx: Tensor | None) -> Tensor:
    """(b, h, p, n) initial states, zero for rows whose first token's sample index is not 0."""
    if seq_idx is None:
        return initial_states
    keep = (seq_idx[:, 0] == 0).to(initial_states.dtype).reshape(-1, 1, 1, 1)
    return initial_states * keep


@outside_autocast
def ssd_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    *,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan (reference for ``mamba_chunk_scan_combined``).

    Arguments after ``dt_bias`` are keyword-only: mamba_ssm's positional order
    for them differs between versions, so naming them keeps a kernel swap safe.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) raw time steps (bias/softplus/clamp applied here).
        A: (h,) negative decay rates.
        B, C: (b, l, g, n), h % g == 0; head ``i`` uses group ``i // (h // g)``.
        chunk_size: chunk length; ``l`` need not be a multiple (padded internally
            with dt = 0, which is an identity step).
        D: (h,) or (h, p) skip connection.
        z: (b, l, h, p) gate: ``y *= silu(z)`` after the skip.
        dt_bias: (h,).
        initial_states: (b, h, p, n) state before the first token (first sample only; with
            ``seq_idx``, only for rows whose first token has index 0, as the kernel).
        seq_idx: (b, l) int sample index per token, non-decreasing along a row;
            the state is reset at every change.
        dt_softplus, dt_limit: see :func:`_discretize_dt`.
        return_final_states: also return the state after the last token.

    Returns:
        y (b, l, h, p) in ``x.dtype``; with ``return_final_states`` also
        final_states (b, h, p, n) in float32 (float64 for float64 inputs).
    """
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    cdt = compute_dtype(x)
    cl = chunk_size
    pad = (-l) % cl

    dtf = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, l, h)
    xf, Bf, Cf = x.to(cdt), B.to(cdt), C.to(cdt)
    if pad:
        # Zero dt means decay exp(0) = 1 and no input: padded steps leave the
        # state untouched, so the final state is the one after token l-1.
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    seq: Tensor | None = None
    if seq_idx is not None:
        if seq_idx.shape != (b, l):
            raise ValueError(f"seq_idx must be (batch, seqlen) = {(b, l)}, got {tuple(seq_idx.shape)}")
        seq = seq_idx.long()
        if pad:
            # Padding continues the last sample so it never triggers a reset.
            seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)
    if initial_states is not None:
        if initial_states.shape != (b, h, p, n):
            raise ValueError(
                f"initial_states must be (batch, nheads, headdim, dstate) = {(b, h, p, n)}, "
                f"got {tuple(initial_states.shape)}"
            )
        first = _row_initial_states(initial_states, seq_idx).to(cdt)
    else:
        first = xf.new_zeros(b, h, p, n)
    y, final_state = ChunkedScan.apply(xf, dtf, A.to(cdt), Bf, Cf, None if D is None else D.to(cdt), first, seq,
                                       cl, g)  # (b, nc * cl, h, p), (b, h, p, n)
    y = _skip_and_gate(y[:, :l], x, None, z).to(x.dtype)
    if return_final_states:
        return y, final_state
    return y


@outside_autocast
def ssd_recurrent_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int | None = None,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    *,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Token-by-token recurrence; same arguments and results as :func:`ssd_scan_ref`.

    ``chunk_size`` is accepted (and ignored) so the two are drop-in twins.
    Deliberately naive -- O(l) Python steps -- because it is the ground truth.
    """
    del chunk_size
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C)
    cdt = compute_dtype(x)
    r = h // g
    dtf = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, l, h)
    Af = A.to(cdt)
    Bh = B.to(cdt).repeat_interleave(r, dim=2)  # (b, l, h, n)
    Ch = C.to(cdt).repeat_interleave(r, dim=2)  # (b, l, h, n)
    xf = x.to(cdt)
    state = _row_initial_states(initial_states, seq_idx).to(cdt) if initial_states is not None \
        else xf.new_zeros(b, h, p, n)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            new_sample = (seq_idx[:, t] != seq_idx[:, t - 1]).reshape(b, 1, 1, 1)
            state = torch.where(new_sample, torch.zeros_like(state), state)
        dA = torch.exp(dtf[:, t] * Af)  # (b, h)
        dBx = (dtf[:, t, :, None] * xf[:, t]).unsqueeze(-1) * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = dA[:, :, None, None] * state + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)  # (b, l, h, p)
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    if return_final_states:
        return y, state
    return y


@outside_autocast
def ssd_step_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> tuple[Tensor, Tensor]:
    """One decoding step (reference for ``selective_state_update``), functional.

    Args:
        state: (b, h, p, n) cached SSM state.
        x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n); D: (h,) or (h, p);
        z: (b, h, p); dt_bias: (h,).
        dt_limit: keyword-only extra (the kernel lacks it) so decoding applies
            the same clamp as the training scan.

    Returns:
        y (b, h, p) in ``x.dtype`` and the new state in ``state.dtype``.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be a multiple of ngroups ({g})")
    cdt = compute_dtype(state if state.dtype == torch.float64 else x)
    dtf = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, h)
    Bh = B.to(cdt).repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.to(cdt).repeat_interleave(h // g, dim=1)  # (b, h, n)
    dA = torch.exp(dtf * A.to(cdt))  # (b, h)
    dBx = (dtf[:, :, None] * x.to(cdt)).unsqueeze(-1) * Bh[:, :, None, :]  # (b, h, p, n)
    new_state = dA[:, :, None, None] * state.to(cdt) + dBx
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)  # (b, h, p)
    y = _skip_and_gate(y, x, D, z)
    return y.to(x.dtype), new_state.to(state.dtype)
