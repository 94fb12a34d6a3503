"""The chunked SSD scan of :func:`train.ops.ssd.ssd_scan_ref` as one autograd Function.

Forward and backward are written by hand, a few chunks at a time, so that the (cl, cl) blocks and
every per-chunk temporary live only while their group of chunks is processed (small enough to
stay in cache), and backward keeps only the inputs and the chunk-boundary states: no graph of
activation-sized intermediates. Per head, with ``s`` the cumulative log-decay within a chunk::

    decay[i, j]  = exp(s_i - s_j)  (j <= i, same sample; else 0)
                 = row_i exp(s'_i - s'_j) col_j                  # as computed, see below
    y_i          = sum_j (C_i . B_j) decay[i, j] dt_j x_j       # within the chunk
                 + exp(s_i) C_i . prev                           # the state entering the chunk
                 + D x_i
    state_c      = sum_j decay[last, j] dt_j x_j B_j^T           # what chunk c adds to the state
    prev_z       = sum_c carry[z, c] state_c                     # closed form over chunks

Precision (this is the reference GPU kernels are tested against): a head that decays hard reaches
|s| of hundreds within a chunk, and s in fp32 is off by ~eps |s|, so exp(s_i - s_j) would err by
~1e-5 even between neighbouring tokens. So ``s`` is summed in float64 and ``s'`` is its rounding to
the compute dtype; exp(s'_i - s'_j) errs by only ~eps |s_i - s_j|, and the per-token factors
row_i = exp(s_i - s'_i), col_j = exp(s'_j - s_j) (within ~1e-5 of 1) restore what the rounding lost.
They scale the chunk's outputs and inputs (vectors), so the (cl, cl) blocks cost nothing more.
Backward sums the log-decay gradients per token in float64 for the same reason (see there).

Packed rows: a chunk holding a sample boundary forms its log-decays by exact segment sums
(`_segsum`, with row = col = 1) and passes no state on, and the entering state reaches only tokens
of the sample it belongs to, so a sample's outputs are bit-identical whatever the other samples hold.
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


def _exp_(log_decay: Tensor) -> Tensor:
    """exp, in place, of log-decays clamped to where exp is a normal number of their dtype -> same.

    A log-decay below -87 (fp32; -708 in fp64) gives exp(-87) ~ 1.6e-38 instead of a subnormal or 0,
    which no sum holding a token's own term (decay 1) can see. The clamp is for speed: CPU exp takes
    ~10-35x longer per element whose result is subnormal, 0 or inf, as strongly decaying heads' are.
    """
    info = torch.finfo(log_decay.dtype)
    return log_decay.clamp_(math.ceil(math.log(info.tiny)), math.floor(math.log(info.max))).exp_()


class _Chunks(NamedTuple):
    """One group of k chunks in the head-major layout of the per-chunk matmuls."""
    x: Tensor  # (k, g, r, cl, p) view of the inputs
    dt: Tensor  # (k, g, r, cl)
    x_col: Tensor  # (k, g, r, cl, p) col_j dt_j x_j: the inputs as the decay's column j takes them
    dA: Tensor  # (k, g, r, cl) per-token log-decay
    s: Tensor  # (k, g, r, cl) s': the cumulative log-decay in the compute dtype
    row: Tensor  # (k, g, r, cl) exp(s - s'), 1 in chunks holding a boundary
    col: Tensor  # (k, g, r, cl) exp(s' - s), 1 in chunks holding a boundary
    to_end: Tensor  # (k, g, r, cl) exp(s_last - s_j), but see `_decay_to_end`
    into: Tensor  # (k, g, r, cl) the decay of the entering state to token i (`_Row.into`)
    B: Tensor  # (k, g, cl, n)
    C: Tensor  # (k, g, cl, n)
    boundary: Tensor | None  # indices of the chunks holding a sample boundary, or None
    other_sample: Tensor | None  # (k, cl, cl) pairs of tokens of different samples


class _Row(NamedTuple):
    """The whole row, chunks flattened over (batch, chunk): N = b * nc. The per-token vectors are
    head-major and formed once per row; the groups slice them."""
    x: Tensor  # (N, cl, h, p)
    B: Tensor  # (N, cl, g, n)
    C: Tensor  # (N, cl, g, n)
    dt: Tensor  # (N, g, r, cl)
    dA: Tensor  # (N, g, r, cl)
    s: Tensor  # (N, g, r, cl) s' (see the module docstring)
    row: Tensor  # (N, g, r, cl)
    col: Tensor  # (N, g, r, cl)
    to_end: Tensor  # (N, g, r, cl)
    into: Tensor  # (N, g, r, cl) exp(s_i); 0 for tokens of a later sample than the entering state's
    boundary: Tensor | None  # (N,) bool: the chunk holds a sample boundary
    other_sample: Tensor | None  # (N, cl, cl)

    def chunks(self, part: slice, groups: int) -> _Chunks:
        x_h = _head_major(self.x[part], groups)  # (k, g, r, cl, p)
        col, dt = self.col[part], self.dt[part]
        boundary = None
        if self.boundary is not None:
            boundary = self.boundary[part].nonzero(as_tuple=True)[0]
            boundary = boundary if boundary.numel() else None
        return _Chunks(
            x=x_h, dt=dt, x_col=(col * dt).unsqueeze(-1) * x_h,  # contiguous: the vector's layout leads
            dA=self.dA[part], s=self.s[part], row=self.row[part], col=col, to_end=self.to_end[part],
            into=self.into[part], B=self.B[part].transpose(1, 2).contiguous(),
            C=self.C[part].transpose(1, 2).contiguous(), boundary=boundary,
            other_sample=None if self.other_sample is None else self.other_sample[part],
        )


def _decay(ch: _Chunks) -> Tensor:
    """decay[..., i, j] = exp(log-decay from token j to token i) / (row_i col_j), 0 where j > i or
    where i and j belong to different samples -> (k, g, r, cl, cl)."""
    # exp(s'_i - s'_j), as mamba_ssm's chunk-scan kernel forms it, up to the row and column factors
    # that the callers fold into the chunk's outputs and inputs. Above the diagonal the difference is
    # positive; tril_ writes zeros there.
    decay = _exp_(ch.s.unsqueeze(-1) - ch.s.unsqueeze(-2)).tril_()
    boundary = ch.boundary  # (m,) chunks holding a sample boundary
    if boundary is not None:
        # The difference would round through the earlier sample's log-decay: there the sums run
        # over each pair's own tokens, so a sample's outputs never depend on another's values.
        decay[boundary] = torch.exp(_segsum(ch.dA[boundary], ch.other_sample[boundary, None, None]))
    return decay


def _decay_to_end(ch: _Chunks, decay: Tensor | None = None) -> Tensor:
    """The decay from each token to the chunk's last (row and column factors included) -> (k, g, r,
    cl). Chunks holding a boundary take it from `decay` (their `_decay` blocks) when given, else
    from segment sums of their own: the same values."""
    boundary = ch.boundary  # (m,) chunks holding a sample boundary
    if boundary is None:
        return ch.to_end
    last = ch.to_end.clone()
    if decay is not None:
        last[boundary] = decay[boundary, ..., -1, :]
    else:
        last[boundary] = torch.exp(_segsum(ch.dA[boundary], ch.other_sample[boundary, None, None])[..., -1, :])
    return last


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

        # 1. What each chunk's own tokens leave in the state at its end.
        own = x.new_empty(b * nc, h, p, n)
        for part in parts:
            ch = row.chunks(part, groups)
            k = ch.x.shape[0]
            weighted = (ch.x_col * (_decay_to_end(ch) / ch.col).unsqueeze(-1)).transpose(-1, -2)  # (k, g, r, p, cl)
            own[part] = (weighted @ ch.B.unsqueeze(2)).reshape(k, h, p, n)

        # 2. The state entering each chunk, in closed form over chunks (as mamba's ssd_minimal).
        chunk_log_decay = row.s[..., -1].reshape(b, nc, h)  # each chunk's total log-decay
        carry, log_carry = _carry(chunk_log_decay, passes)  # (b, h, c+1, c+1)
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
            out = (_decay(ch).mul_(CB.unsqueeze(2)) @ ch.x_col).mul_(ch.row.unsqueeze(-1))  # (k, g, r, cl, p)
            from_state = ch.C.unsqueeze(2) @ prev[part].reshape(k, groups, -1, p, n).transpose(-1, -2)
            out.addcmul_(from_state, ch.into.unsqueeze(-1))
            _head_major(y[part], groups).copy_(out)
            if D is not None:  # the skip, token-major like x
                y[part].addcmul_(row.x[part], D.reshape(h, -1))

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
            into = ch.into  # (k, g, r, cl)
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
        D_tok = None if D is None else D.reshape(h, -1)  # (h, 1) or (h, p)
        A_h = A.reshape(groups, r, 1)
        for part in parts:
            ch = row.chunks(part, groups)
            k = ch.x.shape[0]
            gy = _head_major(grad_y[part], groups)  # (k, g, r, cl, p) view
            gy_row = ch.row.unsqueeze(-1) * gy  # contiguous: the vector's layout leads
            g_own = grad_own[part].reshape(k, groups, r, p, n)
            decay = _decay(ch)  # (k, g, r, cl, cl), without the row and column factors
            last = _decay_to_end(ch, decay)  # (k, g, r, cl)
            last_col = last / ch.col  # x_col * last_col = x_dt * last
            CB = ch.C @ ch.B.transpose(-1, -2)  # (k, g, cl, cl)
            # own state = (x_dt * last)^T B: Q = B g_own^T is the gradient of x_dt * last.
            Q = ch.B.unsqueeze(2) @ g_own.transpose(-1, -2)  # (k, g, r, cl, p)
            # y = row * ((CB * decay) x_col): the gradient of x_col.
            g_x_col = (decay * CB.unsqueeze(2)).transpose(-1, -2) @ gy_row
            g_x_col.addcmul_(Q, last_col.unsqueeze(-1))
            g_last = (ch.x_col * Q).sum(-1).div_(ch.col)  # (k, g, r, cl)
            g_B = ((ch.x_col * last_col.unsqueeze(-1)) @ g_own).sum(2)  # (k, g, cl, n)
            # Pairs masked out have decay 0, so their gradients vanish without a mask.
            g_t = (gy_row @ ch.x_col.transpose(-1, -2)).mul_(decay)  # d/d(CB * decay) * decay, factors in
            g_CB = g_t.sum(2)  # (k, g, cl, cl)
            g_log = g_t.mul_(CB.unsqueeze(2))  # (k, g, r, cl, cl) d/d log-decay
            g_log[..., -1, :].addcmul_(g_last, last)
            # log-decay[i, j] = s_i - s_j (also where `_segsum` forms it: the same value, summed
            # another way); s = cumsum(dA), dA = dt * A, x_col = x * dt * col. The gradient of dA_m
            # sums the pairs j < m <= i; as the reversed cumsum of row-minus-column sums, the other
            # pairs cancel, and in fp32 every token's rounding (~eps of its own terms) would add up
            # over the chunk: ~1e-4 relative in A's gradient for a head that decays hard. Not in fp64.
            g_log = g_log.double()
            g_s = g_log.sum(-1).sub_(g_log.sum(-2)).add_(grad_s[part])
            g_s[..., -1] += grad_chunk_log_decay[part]
            g_dA = g_s.flip(-1).cumsum(-1).flip(-1).to(x.dtype)
            g_dt = (g_x_col * ch.x).sum(-1).mul_(ch.col).addcmul_(g_dA, A_h)  # (k, g, r, cl)
            grad_A += (g_dA * ch.dt).sum((0, 3))
            torch.mul(g_x_col, (ch.col * ch.dt).unsqueeze(-1), out=_head_major(grad_x[part], groups))
            if D is not None:  # the skip, token-major like grad_y and x
                grad_x[part].addcmul_(grad_y[part], D_tok)
                per_channel = (grad_y[part] * row.x[part]).sum((0, 1))  # (h, p)
                grad_D += per_channel.sum(-1) if D.ndim == 1 else per_channel
            grad_dt[part] = g_dt.permute(0, 3, 1, 2).reshape(k, cl, h)
            grad_C[part] += (g_CB @ ch.B).transpose(1, 2)
            grad_B[part] = g_B.add_(g_CB.transpose(-1, -2) @ ch.C).transpose(1, 2)

        return (grad_x.reshape(x.shape), grad_dt.reshape(dt.shape), grad_A.reshape(h), grad_B.reshape(B.shape),
                grad_C.reshape(C.shape), grad_D, grad_first, None, None, None)


def _row(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seq: Tensor | None, cl: int
         ) -> tuple[_Row, Tensor | None]:
    """The row's chunk views and per-token vectors, and (b, nc) whether each chunk passes the
    entering state on (None: every chunk does)."""
    b, L, h, p = x.shape
    nc, g, n = L // cl, B.shape[2], B.shape[3]
    other = from_prev = passes = boundary = None
    if seq is not None:
        seq = seq.reshape(b, nc, cl)
        other = (seq.unsqueeze(-1) != seq.unsqueeze(-2)).reshape(b * nc, cl, cl)
        # The entering state belongs to the sample of the previous chunk's last token (the row's
        # first sample for chunk 0); it reaches that sample's tokens only, and survives chunk c
        # only if c ends in that same sample.
        start_sids = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)  # (b, c)
        from_prev = (seq == start_sids.unsqueeze(-1)).to(x.dtype).reshape(b * nc, 1, 1, cl)
        passes = seq[:, :, -1] == start_sids
        boundary = other.flatten(1).any(-1)
    dt_h = dt.reshape(b * nc, cl, g, h // g).permute(0, 2, 3, 1).contiguous()  # (N, g, r, cl)
    dA = dt_h * A.reshape(g, -1, 1)
    # See the module docstring: s summed in float64, s' its rounding, row and col what was lost.
    s_exact = dA.double().cumsum(-1)
    s = s_exact.to(x.dtype)
    lost = (s_exact - s).to(x.dtype)
    if boundary is not None:
        lost[boundary] = 0.0  # their decays come from segment sums of dA, in full
    into = _exp_(s.clone())  # exp(s') errs by ~eps |s| exp(s) <= eps / e of the state's term: kept
    row = _Row(x=x.reshape(b * nc, cl, h, p), B=B.reshape(b * nc, cl, g, n), C=C.reshape(b * nc, cl, g, n),
               dt=dt_h, dA=dA, s=s, row=lost.exp(), col=lost.neg().exp_(),
               to_end=_exp_((s_exact[..., -1:] - s_exact).to(x.dtype)),
               into=into if from_prev is None else into.mul_(from_prev), boundary=boundary, other_sample=other)
    return row, passes


def _carry(chunk_log_decay: Tensor, passes: Tensor | None) -> tuple[Tensor, Tensor]:
    """(b, nc, h) total log-decay of each chunk -> carry (b, h, c+1, c+1): [z, j] = decay from the end
    of chunk j-1 (j=0: the row start) to the start of chunk z; and its (b, h, c+1) log-decays. A
    chunk holding a sample boundary passes no state on: log-decay -inf, a decay of exactly 0."""
    if passes is not None:
        chunk_log_decay = chunk_log_decay.masked_fill(~passes.unsqueeze(-1), -math.inf)
    log_carry = F.pad(chunk_log_decay.transpose(1, 2), (1, 0))  # (b, h, c+1)
    return torch.exp(_segsum(log_carry)), log_carry
