"""Reference ops: chunked == recurrent, packed == per-sample, step == full.

The packed-isolation tests are the proof behind "Packing never leaks": running
a packed row with ``seq_idx`` / ``cu_seqlens`` must equal running every sample
alone, and perturbing one sample must leave the others bit-identical.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.ops import (
    attention_with_kv_cache_ref,
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    gated_rms_norm_ref,
    rms_norm_ref,
    ssd_recurrent_ref,
    ssd_scan_ref,
    ssd_step_ref,
    varlen_attention_ref,
)
from train.ops.activations import squared_relu

CHUNK = 8
# 1-token samples, exact chunk multiples (8, 16) and boundaries inside chunks.
SEGMENTS = [
    [1],
    [8],
    [21],
    [1, 8, 5, 16, 3, 11, 1],
    [3, 1, 1, 9, 7],
    [16, 8],
]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def ssd_inputs(b, l, h, p, g, n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return dict(
        x=rnd(b, l, h, p),
        dt=0.05 + torch.rand(b, l, h, generator=gen, dtype=dtype) * 0.6,
        A=-(0.2 + torch.rand(h, generator=gen, dtype=dtype) * 1.5),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
    )


def seq_idx_from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None]


def random_lengths(seed: int, total: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    out, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(1, 2 * CHUNK + 3, (1,), generator=gen)))
        out.append(n)
        left -= n
    return out


# ----------------------------------------------------------------------------- SSD


@pytest.mark.parametrize("l", [1, 7, 16, 21])
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (4, 4), (6, 3)])
def test_ssd_chunked_matches_recurrent(l, h, g):
    inp = ssd_inputs(2, l, h, 3, g, 5)
    y = ssd_scan_ref(**inp, chunk_size=CHUNK)
    y_ref = ssd_recurrent_ref(**inp)
    assert y.shape == (2, l, h, 3) and y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-10


@pytest.mark.parametrize("d_shape", ["none", "h", "hp"])
@pytest.mark.parametrize("use_z", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_ssd_options_match_recurrent(d_shape, use_z, softplus):
    b, l, h, p, g, n = 2, 19, 4, 3, 2, 5
    inp = ssd_inputs(b, l, h, p, g, n, seed=1)
    gen = torch.Generator().manual_seed(2)
    kw = {}
    if d_shape != "none":
        kw["D"] = torch.randn(h if d_shape == "h" else (h, p), generator=gen, dtype=torch.float64)
    if use_z:
        kw["z"] = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    if softplus:
        inp["dt"] = torch.randn(b, l, h, generator=gen, dtype=torch.float64)
        kw.update(dt_bias=torch.randn(h, generator=gen, dtype=torch.float64), dt_softplus=True)
    kw["initial_states"] = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    y, fin = ssd_scan_ref(**inp, chunk_size=CHUNK, **kw, return_final_states=True)
    y_ref, fin_ref = ssd_recurrent_ref(**inp, **kw, return_final_states=True)
    assert fin.shape == (b, h, p, n)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(fin, fin_ref) < 1e-10


def test_ssd_dt_limit_clamps_after_softplus():
    inp = ssd_inputs(1, 13, 2, 2, 1, 3, seed=3)
    inp["dt"] = inp["dt"] * 8 - 3
    kw = dict(dt_softplus=True, dt_limit=(0.1, 0.5))
    y = ssd_scan_ref(**inp, chunk_size=4, **kw)
    assert rel_err(y, ssd_recurrent_ref(**inp, **kw)) < 1e-10
    pre = dict(inp, dt=F.softplus(inp["dt"]).clamp(0.1, 0.5))
    assert rel_err(y, ssd_scan_ref(**pre, chunk_size=4)) < 1e-12


def test_ssd_float32_tight_and_low_precision_dtype():
    inp = ssd_inputs(1, 45, 4, 8, 2, 8, dtype=torch.float32, seed=4)
    y, fin = ssd_scan_ref(**inp, chunk_size=16, return_final_states=True)
    y_ref, fin_ref = ssd_recurrent_ref(**{k: v.double() for k, v in inp.items()}, return_final_states=True)
    assert y.dtype == torch.float32 and fin.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(fin, fin_ref) < 1e-5
    y16 = ssd_scan_ref(**{k: v.bfloat16() for k, v in inp.items()}, chunk_size=16)
    assert y16.dtype == torch.bfloat16


@pytest.mark.parametrize("lengths", SEGMENTS + [random_lengths(s, 60) for s in range(3)])
def test_ssd_packed_equals_per_sample(lengths):
    h, p, g, n = 4, 3, 2, 4
    total = sum(lengths)
    inp = ssd_inputs(1, total, h, p, g, n, dtype=torch.float32, seed=5)
    gen = torch.Generator().manual_seed(6)
    D = torch.randn(h, p, generator=gen)
    z = torch.randn(1, total, h, p, generator=gen)
    init = torch.randn(1, h, p, n, generator=gen)
    seq_idx = seq_idx_from_lengths(lengths)
    y, fin = ssd_scan_ref(
        **inp, chunk_size=CHUNK, D=D, z=z, seq_idx=seq_idx, initial_states=init, return_final_states=True
    )
    pieces, start = [], 0
    for i, ln in enumerate(lengths):
        sl = slice(start, start + ln)
        one = {k: (v[:, sl] if k not in ("A",) else v) for k, v in inp.items()}
        y_i, fin_i = ssd_scan_ref(
            **one,
            chunk_size=CHUNK,
            D=D,
            z=z[:, sl],
            initial_states=init if i == 0 else None,  # the initial state is the first sample's
            return_final_states=True,
        )
        pieces.append(y_i)
        start += ln
    assert rel_err(y, torch.cat(pieces, dim=1)) < 1e-5
    assert rel_err(fin, fin_i) < 1e-5  # final state is the last sample's
    y_rec = ssd_recurrent_ref(**inp, D=D, z=z, seq_idx=seq_idx, initial_states=init)
    assert rel_err(y, y_rec) < 1e-5


def test_ssd_packed_batch_rows_with_different_layouts():
    rows = [[5, 8, 1, 10], [24]]
    inp = ssd_inputs(2, 24, 4, 2, 1, 3, seed=7)
    seq_idx = torch.cat([seq_idx_from_lengths(r) for r in rows])
    y = ssd_scan_ref(**inp, chunk_size=CHUNK, seq_idx=seq_idx)
    assert rel_err(y, ssd_recurrent_ref(**inp, seq_idx=seq_idx)) < 1e-10
    assert rel_err(y[1:], ssd_scan_ref(**{k: (v[1:] if k != "A" else v) for k, v in inp.items()}, chunk_size=CHUNK)) < 1e-12


def _perturb(t: torch.Tensor, sl: slice, dim: int = 1) -> torch.Tensor:
    t = t.clone()
    idx = [slice(None)] * t.ndim
    idx[dim] = sl
    t[tuple(idx)] = t[tuple(idx)] * 3.0 + 1.0
    return t


@pytest.mark.parametrize("victim", [0, 2, 3])
def test_ssd_perturbing_one_sample_leaves_others_bit_identical(victim):
    lengths = [3, 8, 6, 13, 2]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    inp = ssd_inputs(1, bounds[-1], 4, 2, 2, 3, dtype=torch.float32, seed=8)
    seq_idx = seq_idx_from_lengths(lengths)
    y = ssd_scan_ref(**inp, chunk_size=CHUNK, seq_idx=seq_idx)
    sl = slice(bounds[victim], bounds[victim + 1])
    bad = {k: (_perturb(v, sl) if k != "A" else v) for k, v in inp.items()}
    y2 = ssd_scan_ref(**bad, chunk_size=CHUNK, seq_idx=seq_idx)
    keep = torch.ones(bounds[-1], dtype=torch.bool)
    keep[sl] = False
    assert torch.equal(y[:, keep], y2[:, keep])
    assert not torch.equal(y[:, sl], y2[:, sl])


def test_ssd_step_iteration_matches_scan():
    b, l, h, p, g, n = 2, 11, 4, 3, 2, 5
    inp = ssd_inputs(b, l, h, p, g, n, seed=9)
    gen = torch.Generator().manual_seed(10)
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    z = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    dt_bias = torch.randn(h, generator=gen, dtype=torch.float64)
    init = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    # Prefill the first 6 tokens with the scan, then decode the rest step by step.
    y_full, fin_full = ssd_scan_ref(
        **inp, chunk_size=4, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_states=init, return_final_states=True
    )
    pre = {k: (v[:, :6] if k != "A" else v) for k, v in inp.items()}
    y_pre, state = ssd_scan_ref(
        **pre, chunk_size=4, D=D, z=z[:, :6], dt_bias=dt_bias, dt_softplus=True, initial_states=init,
        return_final_states=True,
    )
    ys = [y_pre]
    for t in range(6, l):
        y_t, state = ssd_step_ref(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
            D=D, z=z[:, t], dt_bias=dt_bias, dt_softplus=True,
        )
        ys.append(y_t[:, None])
    assert rel_err(torch.cat(ys, dim=1), y_full) < 1e-10
    assert rel_err(state, fin_full) < 1e-10


def test_ssd_gradcheck_with_seq_idx():
    b, l, h, p, g, n = 1, 7, 2, 2, 1, 2
    inp = ssd_inputs(b, l, h, p, g, n, seed=11)
    gen = torch.Generator().manual_seed(12)
    extra = dict(
        D=torch.randn(h, generator=gen, dtype=torch.float64),
        z=torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
        dt_bias=torch.randn(h, generator=gen, dtype=torch.float64) * 0.1,
        initial_states=torch.randn(b, h, p, n, generator=gen, dtype=torch.float64),
    )
    seq_idx = seq_idx_from_lengths([2, 1, 4])  # boundaries inside chunks of 4, length not a multiple
    names = ["x", "dt", "A", "B", "C", *extra]
    tensors = [t.clone().requires_grad_(True) for t in [*inp.values(), *extra.values()]]

    def fn(*args):
        kw = dict(zip(names, args))
        y, fin = ssd_scan_ref(**kw, chunk_size=4, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
        return y, fin

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("steep", [False, True])
@pytest.mark.parametrize("lengths", [None, [3, 9, 1, 14, 6]])
def test_ssd_chunked_gradients_match_recurrent(lengths, steep, monkeypatch):
    """The scan's hand-written backward (`ChunkedScan`) against autograd through the token loop, over
    chunks processed a few at a time (two chunks per group here), with and without boundaries, with
    the skip, an initial state and the final state. `steep`: two heads decay by ~e^-100 over a chunk,
    where a decay factored as exp(s_i) * exp(-s_j) would overflow fp32."""
    from train.ops import ssd_chunked

    b, l, h, p, g, n = 1, 33, 4, 3, 2, 5
    monkeypatch.setattr(ssd_chunked, "_GROUP_ELEMENTS", 2 * h * CHUNK * CHUNK)
    inp = ssd_inputs(b, l, h, p, g, n, seed=14)
    if steep:  # log-decay over a chunk of 8 tokens: about -8 * 0.35 * 40 = -112 for heads 1 and 2
        inp["A"] = torch.tensor([-0.5, -40.0, -45.0, -1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(15)
    d_shape = (h, p) if lengths is None else (h,)  # D per head, or per channel
    inp.update(D=torch.randn(*d_shape, generator=gen, dtype=torch.float64),
               z=torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
               dt_bias=torch.randn(h, generator=gen, dtype=torch.float64) * 0.1,
               initial_states=torch.randn(b, h, p, n, generator=gen, dtype=torch.float64))
    seq_idx = None if lengths is None else seq_idx_from_lengths(lengths)
    weights = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    weights_final = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)

    def grads(fn):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
        y, final = fn(**leaves, chunk_size=CHUNK, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
        ((y * weights).sum() + (final * weights_final).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    chunked, recurrent = grads(ssd_scan_ref), grads(ssd_recurrent_ref)
    for name in inp:
        assert rel_err(chunked[name], recurrent[name]) < 1e-10, name
    kwargs = dict(chunk_size=CHUNK, seq_idx=seq_idx, dt_softplus=True)
    reference = ssd_recurrent_ref(**inp, **kwargs)
    assert rel_err(ssd_scan_ref(**inp, **kwargs), reference) < 1e-10
    # In fp32 too: decays are formed as exp(s_i - s_j), never as a product that could overflow.
    assert rel_err(ssd_scan_ref(**{k: v.float() for k, v in inp.items()}, **kwargs), reference) < 1e-5


def test_ssd_gradients_finite_at_fp32():
    inp = ssd_inputs(1, 40, 4, 4, 2, 4, dtype=torch.float32, seed=13)
    leaves = {k: v.requires_grad_(True) for k, v in inp.items()}
    y = ssd_scan_ref(**leaves, chunk_size=CHUNK, seq_idx=seq_idx_from_lengths([1, 8, 20, 11]))
    y.square().sum().backward()
    for k, v in leaves.items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k


def norm_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("lengths", [None, [300, 500, 224]])
def test_ssd_float32_accurate_under_strong_decay(lengths):
    """The scan GPU kernels are tested against, in fp32 against itself in fp64 on the same values:
    heads decaying by ~e^-0.4..e^-1.6 per token reach a cumulative log-decay of hundreds within a
    chunk of 256, where a decay formed from the fp32 cumsum (exp(s_i - s_j)) errs by ~eps |s| and the
    fp32 row-minus-column gradient sums drift over the chunk: output and gradients of x, dt, B, C then
    erred by ~2e-6 and A's by up to ~1e-4; now all by ~2e-7. With and without boundaries in chunks."""
    b, l, h, p, g, n = 1, 4 * 256, 4, 8, 2, 8
    gen = torch.Generator().manual_seed(30)
    inp = dict(x=torch.randn(b, l, h, p, generator=gen), dt=0.05 + 0.05 * torch.rand(b, l, h, generator=gen),
               A=-(8 + 8 * torch.rand(h, generator=gen)), B=torch.randn(b, l, g, n, generator=gen),
               C=torch.randn(b, l, g, n, generator=gen), z=torch.randn(b, l, h, p, generator=gen))
    weights, weights_final = torch.randn(b, l, h, p, generator=gen), torch.randn(b, h, p, n, generator=gen)
    seq_idx = None if lengths is None else seq_idx_from_lengths(lengths)

    def run(dtype):
        leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in inp.items()}
        y, final = ssd_scan_ref(**leaves, chunk_size=256, seq_idx=seq_idx, return_final_states=True)
        ((y * weights.to(dtype)).sum() + (final * weights_final.to(dtype)).sum()).backward()
        return {"y": y, "final": final, **{k: leaves[k].grad for k in ("x", "dt", "A", "B", "C")}}

    got, ref = run(torch.float32), run(torch.float64)
    assert got["y"].dtype == torch.float32
    for name in ref:
        assert norm_rel_err(got[name], ref[name]) < 1e-6, name


# ----------------------------------------------------------------------------- conv1d


def test_conv1d_matches_torch_conv():
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(2, 6, 13, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    ref = F.conv1d(x, w[:, None], bias, padding=3, groups=6)[..., :13]
    assert rel_err(causal_conv1d_ref(x, w, bias), ref) < 1e-6
    assert rel_err(causal_conv1d_ref(x, w, bias, activation="silu"), F.silu(ref)) < 1e-6
    assert causal_conv1d_ref(x.bfloat16(), w, bias).dtype == torch.bfloat16
    short = x[..., :2]  # shorter than the kernel
    ref_short = F.conv1d(short, w[:, None], bias, padding=3, groups=6)[..., :2]
    assert rel_err(causal_conv1d_ref(short, w, bias), ref_short) < 1e-6


@pytest.mark.parametrize("lengths", SEGMENTS + [random_lengths(s, 40) for s in range(2)])
def test_conv1d_packed_equals_per_sample(lengths):
    gen = torch.Generator().manual_seed(21)
    total = sum(lengths)
    x = torch.randn(1, 5, total, generator=gen)
    w = torch.randn(5, 4, generator=gen)
    bias = torch.randn(5, generator=gen)
    upstream = torch.randn(1, 5, total, generator=gen)

    def run(packed: bool):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]
        xl, wl, bl = leaves
        if packed:
            y = causal_conv1d_ref(xl, wl, bl, seq_idx_from_lengths(lengths), activation="silu")
        else:
            y = torch.cat([causal_conv1d_ref(part, wl, bl, activation="silu")
                           for part in torch.split(xl, lengths, dim=-1)], dim=-1)
        (y * upstream).sum().backward()
        return y, [t.grad for t in leaves]

    (y, grads), (ref, ref_grads) = run(packed=True), run(packed=False)
    assert rel_err(y, ref) < 1e-6
    for grad, ref_grad in zip(grads, ref_grads):  # input, weight and bias gradients
        assert rel_err(grad, ref_grad) < 1e-5


def test_conv1d_perturbing_one_sample_leaves_others_bit_identical():
    lengths = [2, 5, 1, 7]
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(1, 3, 15, generator=gen)
    w = torch.randn(3, 4, generator=gen)
    seq_idx = seq_idx_from_lengths(lengths)
    y = causal_conv1d_ref(x, w, seq_idx=seq_idx)
    y2 = causal_conv1d_ref(_perturb(x, slice(2, 7), dim=2), w, seq_idx=seq_idx)
    keep = torch.ones(15, dtype=torch.bool)
    keep[2:7] = False
    assert torch.equal(y[..., keep], y2[..., keep])


@pytest.mark.parametrize("state_len", [4, 3])  # HF layout (k) and causal_conv1d layout (k - 1)
def test_conv1d_update_iteration_matches_full(state_len):
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(2, 6, 9, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    full = causal_conv1d_ref(x, w, bias, activation="silu")
    state = torch.zeros(2, 6, state_len)
    ys = []
    for t in range(9):
        y_t, state = causal_conv1d_update_ref(x[..., t], state, w, bias, activation="silu")
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=-1), full) < 1e-6
    assert torch.equal(state, x[..., -state_len:])


def test_conv1d_gradcheck_with_seq_idx():
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(1, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    seq_idx = seq_idx_from_lengths([1, 3, 2])
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_ref(*a, seq_idx, activation="silu"), (x, w, bias))


# ----------------------------------------------------------------------------- attention


def naive_attention(q, k, v, causal, scale):
    """Dense per-sample attention with an explicit softmax. q (l, hq, d), k/v (l, hkv, d)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale
    if causal:
        l = q.shape[0]
        s = s.masked_fill(~torch.ones(l, l, dtype=torch.bool).tril(), -math.inf)
    return torch.einsum("hij,jhd->ihd", s.softmax(-1), v.double())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 8, 3], [16, 16]])
def test_varlen_attention_equals_per_sample(causal, hq, hkv, lengths):
    gen = torch.Generator().manual_seed(30)
    total, d = sum(lengths), 8
    q = torch.randn(total, hq, d, generator=gen)
    k = torch.randn(total, hkv, d, generator=gen)
    v = torch.randn(total, hkv, d, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scale = 0.3
    out = varlen_attention_ref(q, k, v, cu, causal=causal, softmax_scale=scale)
    assert out.shape == (total, hq, d)
    ref = torch.cat(
        [naive_attention(q[s:e], k[s:e], v[s:e], causal, scale) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    )
    assert rel_err(out, ref) < 1e-5


def test_varlen_attention_isolation_and_tail_padding():
    gen = torch.Generator().manual_seed(31)
    lengths = [3, 6, 4]
    q, k, v = (torch.randn(15, 2, 4, generator=gen) for _ in range(3))  # 2 tail padding tokens
    cu = torch.tensor([0, 3, 9, 13], dtype=torch.int32)
    out = varlen_attention_ref(q, k, v, cu)
    assert torch.equal(out[13:], torch.zeros_like(out[13:]))
    k2, v2 = _perturb(k, slice(3, 9), dim=0), _perturb(v, slice(3, 9), dim=0)
    out2 = varlen_attention_ref(_perturb(q, slice(3, 9), dim=0), k2, v2, cu)
    assert torch.equal(out[:3], out2[:3]) and torch.equal(out[9:], out2[9:])
    assert sum(lengths) == 13


def test_varlen_attention_gradcheck():
    gen = torch.Generator().manual_seed(33)
    q = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 1, 4, 6], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda *a: varlen_attention_ref(*a, cu), (q, k, v))


def test_attention_with_kv_cache_matches_last_row_of_causal():
    gen = torch.Generator().manual_seed(32)
    b, t, hq, hkv, d = 2, 7, 4, 2, 8
    q = torch.randn(b, t, hq, d, generator=gen)
    k = torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, d, generator=gen)
    out = attention_with_kv_cache_ref(q[:, -1], k, v)
    assert out.shape == (b, hq, d)
    for i in range(b):
        ref = naive_attention(q[i], k[i], v[i], True, d**-0.5)[-1]
        assert rel_err(out[i], ref) < 1e-5
    # cache_seqlens: row 0 has only 4 valid entries, garbage after them is ignored.
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, 4:], v_bad[0, 4:] = 100.0, 100.0
    lens = torch.tensor([4, t])
    out_m = attention_with_kv_cache_ref(q[:, 3], k_bad, v_bad, cache_seqlens=lens)
    assert rel_err(out_m[0], naive_attention(q[0, :4], k[0, :4], v[0, :4], True, d**-0.5)[-1]) < 1e-5


# ----------------------------------------------------------------------------- norms


def test_rms_norm_matches_formula_and_dtype():
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(3, 5, 16, generator=gen)
    w = torch.randn(16, generator=gen)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert rel_err(rms_norm_ref(x, w), ref) < 1e-6
    out = rms_norm_ref(x.bfloat16(), w)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("group_size", [None, 4, 8])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_matches_formula(group_size, norm_before_gate):
    gen = torch.Generator().manual_seed(41)
    d = 16
    x = torch.randn(2, 3, d, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 3, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    gs = group_size or d

    def rms(t):
        tg = t.reshape(2, 3, d // gs, gs)
        return (tg / torch.sqrt(tg.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(2, 3, d)

    gate = z * torch.sigmoid(z)
    ref = rms(x) * w * gate if norm_before_gate else rms(x * gate) * w
    out = gated_rms_norm_ref(x, z, w, eps=1e-6, group_size=group_size, norm_before_gate=norm_before_gate)
    assert rel_err(out, ref) < 1e-12
    assert rel_err(gated_rms_norm_ref(x, None, w, eps=1e-6, group_size=group_size), rms(x) * w) < 1e-12


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("gated", [True, False])
def test_norm_backwards_pass_gradcheck(group_size, gated):
    """The norms keep only their inputs and 1/rms for backward and differentiate by hand: checked
    against finite differences, for x, the gate z and the weight."""
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: gated_rms_norm_ref(a, b if gated else None, c, 1e-6, group_size),
                                    (x, z, w))
    assert torch.autograd.gradcheck(lambda a, c: rms_norm_ref(a, c, 1e-6), (x, w))
    frozen = w.detach()  # a frozen weight gets no gradient, the input still does
    rms_norm_ref(x, frozen).sum().backward()
    assert frozen.grad is None and x.grad is not None


def test_gated_rms_norm_rejects_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm_ref(torch.randn(2, 10), torch.randn(2, 10), torch.ones(10), group_size=4)


def test_queries_over_separate_keys_equal_the_rows_of_full_attention():
    """cu_seqlens_k (context parallelism): a rank's query pieces over their samples' keys give the
    rows full causal attention gives those positions; pieces cut mid-sample included."""
    from train.engines.mcore.layers import context_parallel_pieces

    gen = torch.Generator().manual_seed(0)
    total, cp = 32, 2
    q, k, v = (torch.randn(total, h, 8, generator=gen) for h in (4, 2, 2))
    boundaries = [0, 5, 19, 27, 32]
    full = varlen_attention_ref(q, k, v, torch.tensor(boundaries, dtype=torch.int32))
    for rank in range(cp):
        chunk = total // (2 * cp)
        positions = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)])
        lengths, keys = context_parallel_pieces(boundaries, total, cp, rank)
        index = torch.cat([torch.arange(r.start, r.stop) for r in keys])
        cu_q = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0, *(len(r) for r in keys)]).cumsum(0).to(torch.int32)
        got = varlen_attention_ref(q[positions], k[index], v[index], cu_q, cu_seqlens_k=cu_k)
        torch.testing.assert_close(got, full[positions], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference", [ssd_scan_ref, ssd_recurrent_ref])
def test_initial_states_belong_to_sample_index_zero(reference):
    """As mamba_ssm's kernel: with seq_idx the initial state is carried only while the sample index
    is 0, so a row whose first token has another index (the second row of a packed batch) starts
    from zero; the chunked and recurrent references agree on it."""
    b, l, h, p, g, n = 2, 13, 4, 3, 2, 5
    inp = ssd_inputs(b, l, h, p, g, n, seed=8)
    init = torch.randn(b, h, p, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7, [2] * 9 + [3] * 4], dtype=torch.int32)  # rows over a flat batch
    kwargs = {"chunk_size": CHUNK} if reference is ssd_scan_ref else {}
    with_init = reference(**inp, **kwargs, seq_idx=seq_idx, initial_states=init)
    without = reference(**inp, **kwargs, seq_idx=seq_idx)
    assert rel_err(with_init[1], without[1]) == 0  # row 1 starts at index 2: no initial state
    assert rel_err(with_init[0, :6], without[0, :6]) > 1e-3  # row 0's first sample carries it
    assert rel_err(with_init[0, 6:], without[0, 6:]) == 0  # and only that sample


def test_squared_relu_matches_autograd_of_relu_square():
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(3, 17, generator=gen, dtype=torch.float64)
    x[0, :4] = 0.0  # the kink: gradient 0, as relu's
    upstream = torch.randn(3, 17, generator=gen, dtype=torch.float64)
    ours, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (squared_relu(ours) * upstream).sum().backward()
    (F.relu(ref).square() * upstream).sum().backward()
    assert torch.equal(squared_relu(x), F.relu(x).square())
    assert rel_err(ours.grad, ref.grad) < 1e-15
    assert torch.autograd.gradcheck(squared_relu, (torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True),))
