"""The chunked SSD scan of :func:`train.ops.ssd.ssd_scan_ref` as one autograd Function.

Forward and backward are written by hand, a few chunks at a time, so that the (cl, cl) blocks and
every per-chunk temporary live only while their group of chunks is processed (small enough to
stay in cache), and backward keeps only the inputs and the chunk-boundary states: no graph of
activation-sized intermediates. Per head, with ``s`` the cumulative log-decay within a chunk::

    decay[i, j]  = exp(s_i - s_j)  (j <= i, same sample; else 0)
    y_i          = sum_j (C_i . B_j) decay[i, j] dt_j x_j       # within the chunk
                 + exp(s_i) C_i . prev                           # the state entering the chunk
                 + D x_i
    state_c      = sum_j decay[last, j] dt_j x_j B_j^T           # what chunk c adds to the state
    prev_z       = sum_c carry[z, c] state_c                     # closed form over chunks

Packed rows: a chunk holding a sample boundary forms its log-decays by exact segment sums
(`_segsum`) and passes no state on, and the entering state reaches only tokens of the sample it
belongs to, so a sample's outputs are bit-identical whatever the other samples hold.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Elements of the (chunk, chunk) blocks of the chunks processed at once (k * h * cl * cl): 2 MiB in
# fp32, small enough that one group's blocks stay in cache, large enough that the Python overhead
# per group stays small (4 chunks of 128 tokens x 8 heads; a whole row for the tiny smoke model).
_GROUP_ELEMENTS = 1 << 19


def _segsum(a: Tensor, blocked: Tensor | None = None) -> Tensor:
    """Stable segment sums of the last dim: out[..., i, j] = sum_{j < k <= i} a[..., k].

    The upper triangle (j > i), and the pairs `blocked` marks (broadcast against the output: e.g.
    tokens of different packed samples), are -inf so that exp() gives the causal decay matrix.
    Summing the masked copies directly (rather than cumsum[i] - cumsum[j]) avoids cancellation
    when the cumulative log-decay is large.

    a: (..., T) -> (..., T, T)
    """
    T = a.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., i, j] = a[..., i]
    seg = rep.masked_fill(~strict, 0.0).cumsum(dim=-2)  # (..., T, T)
    acausal = torch.ones(T, T, dtype=torch.bool, device=a.device).triu(1)
    return seg.masked_fill_(acausal if blocked is None else acausal | blocked, -math.inf)


class _Chunks(NamedTuple):
    """One group of k chunks in the head-major layout of the per-chunk matmuls."""
    x: Tensor  # (k, g, r, cl, p) view of the inputs
    dt: Tensor  # (k, g, r, cl)
    x_dt: Tensor  # (k, g, r, cl, p) dt_j x_j
    dA: Tensor  # (k, g, r, cl) per-token log-decay
    s: Tensor  # (k, g, r, cl) cumulative log-decay from the chunk's start (inclusive)
    B: Tensor  # (k, g, cl, n)
    C: Tensor  # (k, g, cl, n)
    boundary: Tensor | None  # indices of the chunks holding a sample boundary, or None
    other_sample: Tensor | None  # (k, cl, cl) pairs of tokens of different samples
    from_prev: Tensor | None  # (k, cl) 1 for tokens of the sample the entering state belongs to


class _Row(NamedTuple):
    """The whole row, chunks flattened over (batch, chunk): N = b * nc."""
    x: Tensor  # (N, cl, h, p)
    dt: Tensor  # (N, cl, h)
    A: Tensor  # (h,)
    B: Tensor  # (N, cl, g, n)
    C: Tensor  # (N, cl, g, n)
    boundary: Tensor | None  # (N,) bool: the chunk holds a sample boundary
    other_sample: Tensor | None  # (N, cl, cl)
    from_prev: Tensor | None  # (N, cl)

    def chunks(self, part: slice, groups: int) -> _Chunks:
        x_h = _head_major(self.x[part], groups)  # (k, g, r, cl, p)
        dt_h = _head_major(self.dt[part].unsqueeze(-1), groups).squeeze(-1)  # (k, g, r, cl)
        dA = dt_h * self.A.reshape(groups, -1, 1)
        boundary = None
        if self.boundary is not None:
            boundary = self.boundary[part].nonzero(as_tuple=True)[0]
            boundary = boundary if boundary.numel() else None
        return _Chunks(
            x=x_h, dt=dt_h, x_dt=(x_h * dt_h.unsqueeze(-1)).contiguous(), dA=dA, s=dA.cumsum(-1),
            B=self.B[part].transpose(1, 2).contiguous(), C=self.C[part].transpose(1, 2).contiguous(),
            boundary=boundary, other_sample=None if self.other_sample is None else self.other_sample[part],
            from_prev=None if self.from_prev is None else self.from_prev[part],
        )


def _decay(ch: _Chunks) -> Tensor:
    """decay[..., i, j] = exp(log-decay from token j to token i), 0 where j > i or where i and j
    belong to different samples -> (k, g, r, cl, cl)."""
    # exp(s_i - s_j), as mamba_ssm's chunk-scan kernel forms it: the log-decay within a chunk is
    # small enough that the difference loses nothing that matters in fp32. Above the diagonal the
    # difference is positive and may overflow to inf; tril_ writes zeros there.
    decay = (ch.s.unsqueeze(-1) - ch.s.unsqueeze(-2)).exp_().tril_()
    boundary = ch.boundary  # (m,) chunks holding a sample boundary
    if boundary is not None:
        # The difference would round through the earlier sample's log-decay: there the sums run
        # over each pair's own tokens, so a sample's outputs never depend on another's values.
        decay[boundary] = torch.exp(_segsum(ch.dA[boundary], ch.other_sample[boundary, None, None]))
    return decay


def _decay_to_end(ch: _Chunks) -> Tensor:
    """decay[..., -1, :] of `_decay` without the (cl, cl) blocks -> (k, g, r, cl)."""
    last = torch.exp(ch.s[..., -1:] - ch.s)
    boundary = ch.boundary  # (m,) chunks holding a sample boundary
    if boundary is not None:
        blocked = ch.other_sample[boundary, None, None]
        last[boundary] = torch.exp(_segsum(ch.dA[boundary], blocked)[..., -1, :])
    return last


def _decay_from_start(ch: _Chunks) -> Tensor:
    """exp(s_i), the decay of the entering state to token i; 0 for tokens of a later sample than
    the state's -> (k, g, r, cl)."""
    decay = torch.exp(ch.s)
    return decay if ch.from_prev is None else decay * ch.from_prev[:, None, None, :]


def _group_slices(num_chunks: int, chunk_len: int, heads: int) -> list[slice]:
    per_group = max(1, _GROUP_ELEMENTS // (heads * chunk_len * chunk_len))
    return [slice(start, start + per_group) for start in range(0, num_chunks, per_group)]


def _head_major(t: Tensor, groups: int) -> Tensor:
    """(k, cl, h, p) token-major -> (k, g, r, cl, p) view."""
    k, cl, h, p = t.shape
    return t.reshape(k, cl, groups, h // groups, p).permute(0, 2, 3, 1, 4)


class ChunkedScan(torch.autograd.Function):
    """y, final_state = ChunkedScan.apply(x, dt, A, B, C, D, first, seq, chunk_size, groups).

    x: (b, L, h, p); dt: (b, L, h) discretised; A: (h,); B, C: (b, L, g, n); D: (h,), (h, p) or
    None; first: (b, h, p, n) the state entering each row; seq: (b, L) sample index per token or
    None; L a multiple of `chunk_size`. All in one float dtype. Returns y (b, L, h, p) and the
    state after the last token (b, h, p, n).
    """

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, first: Tensor,
                seq: Tensor | None, chunk_size: int, groups: int) -> tuple[Tensor, Tensor]:
        b, L, h, p = x.shape
        n, cl, nc = B.shape[-1], chunk_size, L // chunk_size
        row, passes = _row(x, dt, A, B, C, seq, cl)
        parts = _group_slices(b * nc, cl, h)

        # 1. What each chunk's own tokens leave in the state at its end, and its total log-decay.
        own = x.new_empty(b * nc, h, p, n)
        chunk_log_decay = x.new_empty(b * nc, h)
        for part in parts:
            ch = row.chunks(part, groups)
            k = ch.x.shape[0]
            weighted = (ch.x_dt * _decay_to_end(ch).unsqueeze(-1)).transpose(-1, -2)  # (k, g, r, p, cl)
            own[part] = (weighted @ ch.B.unsqueeze(2)).reshape(k, h, p, n)
            chunk_log_decay[part] = ch.s[..., -1].reshape(k, h)

        # 2. The state entering each chunk, in closed form over chunks (as mamba's ssd_minimal).
        carry, log_carry = _carry(chunk_log_decay.reshape(b, nc, h), passes)  # (b, h, c+1, c+1)
        states = torch.cat([first.reshape(b, 1, h, p * n), own.reshape(b, nc, h, p * n)], dim=1)  # (b, c+1, h, pn)
        entering = carry @ states.transpose(1, 2)  # (b, h, c+1, pn)
        prev = entering[:, :, :nc].transpose(1, 2).reshape(b * nc, h, p, n)
        final = entering[:, :, nc].reshape(b, h, p, n)

        # 3. Outputs: the chunk's own tokens, the entering state, the skip.
        y = x.new_empty(b * nc, cl, h, p)
        for part in parts:
            ch = row.chunks(part, groups)
            k = ch.x.shape[0]
            CB = ch.C @ ch.B.transpose(-1, -2)  # (k, g, cl, cl)
            out = _decay(ch).mul_(CB.unsqueeze(2)) @ ch.x_dt  # (k, g, r, cl, p)
            from_state = ch.C.unsqueeze(2) @ prev[part].reshape(k, groups, -1, p, n).transpose(-1, -2)
            out.addcmul_(from_state, _decay_from_start(ch).unsqueeze(-1))
            if D is not None:
                out.addcmul_(ch.x, _head_major_param(D, groups, p))
            _head_major(y[part], groups).copy_(out)

        ctx.save_for_backward(x, dt, A, B, C, D, seq, states, prev, carry, log_carry)
        ctx.chunk_size, ctx.groups = chunk_size, groups
        return y.reshape(b, L, h, p), final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, grad_final: Tensor):
        x, dt, A, B, C, D, seq, states, prev, carry, log_carry = ctx.saved_tensors
        cl, groups = ctx.chunk_size, ctx.groups
        b, L, h, p = x.shape
        n, nc = B.shape[-1], L // cl
        r = h // groups
        row, _ = _row(x, dt, A, B, C, seq, cl)
        parts = _group_slices(b * nc, cl, h)
        grad_y = grad_y.reshape(b * nc, cl, h, p)

        # 1. Through the entering state's outputs: gradients of prev, of exp(s) and of C.
        grad_prev = x.new_empty(b * nc, h, p, n)
        grad_s = x.new_empty(b * nc, groups, r, cl)
        grad_C = x.new_empty(b * nc, cl, groups, n)
        for part in parts:
            ch = row.chunks(part, groups)
            k = ch.x.shape[0]
            gy = _head_major(grad_y[part], groups).contiguous()  # (k, g, r, cl, p)
            into = _decay_from_start(ch)  # (k, g, r, cl)
            grad_prev[part] = ((gy * into.unsqueeze(-1)).transpose(-1, -2) @ ch.C.unsqueeze(2)).reshape(k, h, p, n)
            gy_prev = gy @ prev[part].reshape(k, groups, r, p, n)  # (k, g, r, cl, n)
            grad_s[part] = (gy_prev * ch.C.unsqueeze(2)).sum(-1).mul_(into)
            grad_C[part] = (gy_prev * into.unsqueeze(-1)).sum(2).transpose(1, 2)

        # 2. Through the closed form over chunks.
        grad_entering = torch.cat([grad_prev.reshape(b, nc, h, p * n), grad_final.reshape(b, 1, h, p * n)],
                                  dim=1).transpose(1, 2)  # (b, h, c+1, pn)
        grad_states = carry.transpose(-1, -2) @ grad_entering  # (b, h, c+1, pn)
        grad_carry = grad_entering @ states.permute(0, 2, 3, 1)  # (b, h, c+1, c+1)
        with torch.enable_grad():
            log = log_carry.detach().requires_grad_(True)
            (grad_log,) = torch.autograd.grad(torch.exp(_segsum(log)), log, grad_carry)
        grad_first = grad_states[:, :, 0].reshape(b, h, p, n)
        grad_own = grad_states[:, :, 1:].transpose(1, 2).reshape(b * nc, h, p, n)
        grad_chunk_log_decay = grad_log[..., 1:].transpose(1, 2).reshape(b * nc, groups, r)

        # 3. Through the chunks' own outputs and states, down to the inputs.
        grad_x, grad_dt = x.new_empty(b * nc, cl, h, p), dt.new_empty(b * nc, cl, h)
        grad_B = x.new_empty(b * nc, cl, groups, n)
        grad_A = A.new_zeros(groups, r)
        grad_D = None if D is None else torch.zeros_like(D)
        A_h = A.reshape(groups, r, 1)
        for part in parts:
            ch = row.chunks(part, groups)
            k = ch.x.shape[0]
            gy = _head_major(grad_y[part], groups).contiguous()  # (k, g, r, cl, p)
            g_own = grad_own[part].reshape(k, groups, r, p, n)
            decay = _decay(ch)  # (k, g, r, cl, cl)
            last = decay[..., -1, :]  # (k, g, r, cl)
            CB = ch.C @ ch.B.transpose(-1, -2)  # (k, g, cl, cl)
            # own state = (x_dt * last)^T B: Q = B g_own^T is the gradient of x_dt * last.
            Q = ch.B.unsqueeze(2) @ g_own.transpose(-1, -2)  # (k, g, r, cl, p)
            g_x_dt = (decay * CB.unsqueeze(2)).transpose(-1, -2) @ gy
            g_x_dt.addcmul_(Q, last.unsqueeze(-1))
            g_last = (ch.x_dt * Q).sum(-1)  # (k, g, r, cl)
            g_B = ((ch.x_dt * last.unsqueeze(-1)) @ g_own).sum(2)  # (k, g, cl, n)
            # y = (CB * decay) x_dt, decay = exp(log-decay): pairs masked out have decay 0, so their
            # gradients vanish without a mask.
            g_t = (gy @ ch.x_dt.transpose(-1, -2)).mul_(decay)  # d/d(CB * decay) * decay
            g_CB = g_t.sum(2)  # (k, g, cl, cl)
            g_log = g_t.mul_(CB.unsqueeze(2))  # (k, g, r, cl, cl) d/d log-decay
            g_log[..., -1, :].addcmul_(g_last, last)
            # log-decay[i, j] = s_i - s_j (also where `_segsum` forms it: the same value, summed
            # another way); s = cumsum(dA), dA = dt * A, x_dt = x * dt.
            g_s = g_log.sum(-1).sub_(g_log.sum(-2)).add_(grad_s[part])
            g_s[..., -1] += grad_chunk_log_decay[part]
            g_dA = g_s.flip(-1).cumsum(-1).flip(-1)
            g_x = g_x_dt * ch.dt.unsqueeze(-1)
            if D is not None:
                D_h = _head_major_param(D, groups, p)
                g_x.addcmul_(gy, D_h)
                per_channel = (gy * ch.x).sum((0, 3)).reshape(h, p)
                grad_D += per_channel.sum(-1) if D.ndim == 1 else per_channel
            g_dt = (g_x_dt * ch.x).sum(-1).addcmul_(g_dA, A_h)  # (k, g, r, cl)
            grad_A += (g_dA * ch.dt).sum((0, 3))
            _head_major(grad_x[part], groups).copy_(g_x)
            grad_dt[part] = g_dt.permute(0, 3, 1, 2).reshape(k, cl, h)
            grad_C[part] += (g_CB @ ch.B).transpose(1, 2)
            grad_B[part] = g_B.add_(g_CB.transpose(-1, -2) @ ch.C).transpose(1, 2)

        return (grad_x.reshape(x.shape), grad_dt.reshape(dt.shape), grad_A.reshape(h), grad_B.reshape(B.shape),
                grad_C.reshape(C.shape), grad_D, grad_first, None, None, None)


def _head_major_param(D: Tensor, groups: int, p: int) -> Tensor:
    """D (h,) or (h, p) -> broadcastable against (k, g, r, cl, p)."""
    h = D.shape[0]
    return D.reshape(groups, h // groups, 1, 1) if D.ndim == 1 else D.reshape(groups, h // groups, 1, p)


def _row(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seq: Tensor | None, cl: int
         ) -> tuple[_Row, Tensor | None]:
    """The row's chunk views, and (b, nc) whether each chunk passes the entering state on (None:
    every chunk does)."""
    b, L, h, p = x.shape
    nc, g, n = L // cl, B.shape[2], B.shape[3]
    other = from_prev = passes = None
    if seq is not None:
        seq = seq.reshape(b, nc, cl)
        other = (seq.unsqueeze(-1) != seq.unsqueeze(-2)).reshape(b * nc, cl, cl)
        # The entering state belongs to the sample of the previous chunk's last token (the row's
        # first sample for chunk 0); it reaches that sample's tokens only, and survives chunk c
        # only if c ends in that same sample.
        start_sids = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)  # (b, c)
        from_prev = (seq == start_sids.unsqueeze(-1)).to(x.dtype).reshape(b * nc, cl)
        passes = seq[:, :, -1] == start_sids
    row = _Row(x=x.reshape(b * nc, cl, h, p), dt=dt.reshape(b * nc, cl, h), A=A, B=B.reshape(b * nc, cl, g, n),
               C=C.reshape(b * nc, cl, g, n), boundary=None if other is None else other.flatten(1).any(-1),
               other_sample=other, from_prev=from_prev)
    return row, passes


def _carry(chunk_log_decay: Tensor, passes: Tensor | None) -> tuple[Tensor, Tensor]:
    """(b, nc, h) total log-decay of each chunk -> carry (b, h, c+1, c+1): [z, j] = decay from the end
    of chunk j-1 (j=0: the row start) to the start of chunk z; and its (b, h, c+1) log-decays. A
    chunk holding a sample boundary passes no state on: log-decay -inf, a decay of exactly 0."""
    if passes is not None:
        chunk_log_decay = chunk_log_decay.masked_fill(~passes.unsqueeze(-1), -math.inf)
    log_carry = F.pad(chunk_log_decay.transpose(1, 2), (1, 0))  # (b, h, c+1)
    return torch.exp(_segsum(log_carry)), log_carry
