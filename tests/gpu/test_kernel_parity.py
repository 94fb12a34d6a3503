"""Fused GPU kernels vs their pure-torch twins, forward and backward (marked gpu; skipped without CUDA).

Run with `make test-gpu` (pytest -q -m gpu tests/gpu) after `pip install -e '.[gpu]'`; a backend
whose library is missing is skipped with the install hint (fails under REQUIRE_BACKENDS, see
tests/gpu/__init__.py). Inputs are packed: seq_idx /
cu_seqlens boundaries fall inside SSD chunks, so a kernel that leaked state across samples
fails by O(1). The reference always runs in float32 on the same (already rounded) inputs; the
error measure is max |kernel - ref| / max |ref| per tensor, with per-dtype tolerances (fp32 is
loose because the Triton kernels multiply in TF32).
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor

from train.config.schema import KernelConfig, LanguageModelConfig
from train.model.language_model import HybridLanguageModel
from train.ops import causal_conv1d_ref, gated_rms_norm_ref, rms_norm_ref, ssd_scan_ref, varlen_attention_ref
from tests.gpu import missing_backend
from train.ops.dispatch import KernelUnavailableError, load_backend

pytestmark = pytest.mark.gpu

CUDA = "cuda"
# (forward, backward) bounds on max|kernel - ref| / max|ref|.
OP_TOL = {torch.float32: (5e-3, 1e-2), torch.float16: (1e-2, 3e-2), torch.bfloat16: (3e-2, 6e-2)}


def backend(op: str, name: str) -> Callable[..., Tensor]:
    try:
        return load_backend(op, name)
    except KernelUnavailableError as err:
        missing_backend(str(err))


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert math.isfinite(err) and err <= tol * max(scale, 1e-6), \
        f"{what}: max |diff| {err:.3e} > {tol} * max |ref| {scale:.3e}"


def run(fn: Callable[..., Tensor], inputs: dict[str, Tensor], grad_out: Tensor | None,
        **static) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Output, the gradient of every input, and the upstream gradient used (random when None)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves, **static)
    if grad_out is None:
        grad_out = torch.randn(out.shape, device=out.device)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {k: leaf.grad for k, leaf in leaves.items()}, grad_out


def check_parity(kernel: Callable, ref: Callable, inputs: dict[str, Tensor], dtype: torch.dtype, **static) -> Tensor:
    """Kernel on `inputs` vs the reference on their float32 copies; returns the kernel's output."""
    first = next(iter(inputs.values()))
    ref_out, ref_grads, grad_out = run(ref, {k: v.float() for k, v in inputs.items()}, None, **static)
    out, grads, _ = run(kernel, inputs, grad_out, **static)
    assert out.dtype == first.dtype
    fwd, bwd = OP_TOL[dtype]
    assert_close(out, ref_out, fwd, "output")
    for name in inputs:
        assert_close(grads[name], ref_grads[name], bwd, f"d{name}")
    return out


def packed_seq_idx(rows: list[list[int]]) -> Tensor:
    """(b, l) int32 segment index numbered over the flattened batch, as the packer writes it."""
    ids, segment = [], 0
    for lengths in rows:
        row = []
        for n in lengths:
            row += [segment] * n
            segment += 1
        ids.append(row)
    return torch.tensor(ids, dtype=torch.int32, device=CUDA)


# Chunk 64: boundaries at 37 and 127 (inside chunks 0 and 1), 5 and 69 (inside chunks 0 and 1).
ROWS = [[37, 90, 76], [5, 64, 134]]


def ssd_inputs(dtype: torch.dtype) -> dict[str, Tensor]:
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 203, 4, 64, 2, 64
    dt0 = torch.empty(h, device=CUDA).uniform_(0.01, 0.1)
    return {
        "x": torch.randn(b, l, h, p, device=CUDA).to(dtype),
        "dt": (0.5 * torch.randn(b, l, h, device=CUDA)).to(dtype),
        "A": -torch.arange(1, h + 1, dtype=torch.float32, device=CUDA),
        "B": torch.randn(b, l, g, n, device=CUDA).to(dtype),
        "C": torch.randn(b, l, g, n, device=CUDA).to(dtype),
        "D": torch.ones(h, device=CUDA) + 0.1 * torch.randn(h, device=CUDA),
        "z": torch.randn(b, l, h, p, device=CUDA).to(dtype),
        "dt_bias": dt0 + torch.log(-torch.expm1(-dt0)),  # softplus^-1, as the model initialises it
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_scan_matches_reference(dtype):
    kernel = backend("ssd", "mamba_ssm")
    check_parity(kernel, ssd_scan_ref, ssd_inputs(dtype), dtype, chunk_size=64, seq_idx=packed_seq_idx(ROWS),
                 dt_softplus=True, dt_limit=(1e-3, math.inf))


def test_ssd_scan_packed_equals_per_sample():
    kernel = backend("ssd", "mamba_ssm")
    inputs = ssd_inputs(torch.float32)
    static = dict(chunk_size=64, dt_softplus=True, dt_limit=(1e-3, math.inf))
    packed = kernel(**inputs, seq_idx=packed_seq_idx(ROWS), **static)
    for r, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            alone = {k: v[r:r + 1, start:start + n] if v.ndim > 1 else v for k, v in inputs.items()}
            assert_close(packed[r:r + 1, start:start + n], kernel(**alone, **static), OP_TOL[torch.float32][0],
                         f"row {r} sample at {start}")
            start += n


def test_ssd_scan_final_states_match_reference():
    kernel = backend("ssd", "mamba_ssm")
    inputs = ssd_inputs(torch.float32)
    static = dict(chunk_size=64, dt_softplus=True, return_final_states=True)
    y, state = kernel(**inputs, **static)
    y_ref, state_ref = ssd_scan_ref(**inputs, **static)
    assert state.dtype == torch.float32
    assert_close(y, y_ref, OP_TOL[torch.float32][0], "y")
    assert_close(state, state_ref, OP_TOL[torch.float32][0], "final state")


def _conv_on_slice(fn: Callable) -> Callable:
    # The model's layout: x is a channel slice of in_proj's (b, l, width) output, transposed to
    # (b, d, l); width 100 is not a multiple of 8, so the kernel wrapper must re-lay it out.
    def call(wide: Tensor, weight: Tensor, bias: Tensor, **kw) -> Tensor:
        return fn(wide[..., 8:8 + weight.shape[0]].transpose(1, 2), weight, bias, **kw)
    return call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_causal_conv1d_matches_reference(dtype, packed):
    kernel = backend("conv1d", "causal_conv1d")
    torch.manual_seed(1)
    b, l, d, k = 2, 203, 64, 4
    inputs = {
        "wide": torch.randn(b, l, 100, device=CUDA).to(dtype),
        "weight": 0.5 * torch.randn(d, k, device=CUDA),  # float32 params under bf16 autocast
        "bias": 0.1 * torch.randn(d, device=CUDA),
    }
    seq_idx = packed_seq_idx(ROWS) if packed else None
    check_parity(_conv_on_slice(kernel), _conv_on_slice(causal_conv1d_ref), inputs, dtype, seq_idx=seq_idx,
                 activation="silu")


def test_causal_conv1d_packed_equals_per_sample():
    kernel = backend("conv1d", "causal_conv1d")
    torch.manual_seed(2)
    x = torch.randn(2, 64, 203, device=CUDA)
    weight, bias = torch.randn(64, 4, device=CUDA), torch.randn(64, device=CUDA)
    packed = kernel(x, weight, bias, packed_seq_idx(ROWS), activation="silu")
    for r, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            alone = kernel(x[r:r + 1, :, start:start + n].contiguous(), weight, bias, activation="silu")
            assert torch.allclose(packed[r:r + 1, :, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


@pytest.mark.parametrize("name", ["flash_attn", "torch_varlen", "transformer_engine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# Both end before the 300 tokens: the padded tail must come back as exact zeros (the model tests
# below cover rows without a tail).
@pytest.mark.parametrize("bounds", [[0, 17, 100, 101, 230, 283], [0, 64, 250]], ids=["packed", "padded_tail"])
def test_varlen_attention_matches_reference(name, dtype, bounds):
    kernel = backend("attention", name)
    torch.manual_seed(3)
    total, hq, hkv, d = 300, 8, 2, 64
    inputs = {key: torch.randn(total, heads, d, device=CUDA).to(dtype)
              for key, heads in (("q", hq), ("k", hkv), ("v", hkv))}
    cu = torch.tensor(bounds, dtype=torch.int32, device=CUDA)
    out = check_parity(kernel, varlen_attention_ref, inputs, dtype, cu_seqlens=cu, causal=True)
    tail = out[bounds[-1]:]
    assert tail.shape[0] == total - bounds[-1] > 0 and torch.count_nonzero(tail) == 0


@pytest.mark.parametrize("name", ["flash_attn", "torch_varlen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_with_separate_key_boundaries_matches_reference(name, dtype):
    """Context parallelism's query pieces over their samples' keys (bottom-right causal alignment)."""
    kernel = backend("attention", name)
    torch.manual_seed(5)
    hq, hkv, d = 8, 2, 64
    q_lengths, k_lengths = [40, 7, 64, 1], [40, 100, 64, 230]
    inputs = {"q": torch.randn(sum(q_lengths), hq, d, device=CUDA).to(dtype),
              "k": torch.randn(sum(k_lengths), hkv, d, device=CUDA).to(dtype),
              "v": torch.randn(sum(k_lengths), hkv, d, device=CUDA).to(dtype)}
    cu_q = torch.tensor([0, *q_lengths], device=CUDA).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *k_lengths], device=CUDA).cumsum(0).to(torch.int32)
    check_parity(kernel, varlen_attention_ref, inputs, dtype, cu_seqlens=cu_q, causal=True, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_matches_reference(dtype, norm_before_gate):
    kernel = backend("gated_norm", "mamba_ssm")
    torch.manual_seed(4)
    inputs = {
        "x": torch.randn(2, 37, 256, device=CUDA).to(dtype),
        "z": torch.randn(2, 37, 256, device=CUDA).to(dtype),
        "weight": 1 + 0.1 * torch.randn(256, device=CUDA),
    }
    check_parity(kernel, gated_rms_norm_ref, inputs, dtype, eps=1e-5, group_size=128,
                 norm_before_gate=norm_before_gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype):
    kernel = backend("rms_norm", "mamba_ssm")
    torch.manual_seed(5)
    inputs = {"x": torch.randn(2, 37, 320, device=CUDA).to(dtype), "weight": 1 + 0.1 * torch.randn(320, device=CUDA)}
    check_parity(kernel, rms_norm_ref, inputs, dtype, eps=1e-5)


# --- whole model: the torch model vs the same weights with fused kernels -----------------------

LM = LanguageModelConfig(pattern="M-M*M-M*", hidden_size=64, vocab_size=256, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
                         ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=32, mlp_hidden_size=128)
# (b=2, l=150) rows; samples end at 37 and 100 (inside chunks) in row 0, at 190 in row 1.
CU_SEQLENS = [0, 37, 100, 150, 190, 300]
MODEL_TOL = {torch.float32: (1e-2, 3e-2), torch.bfloat16: (5e-2, 1e-1)}
MAMBA_FUSED = dict(ssd="mamba_ssm", conv1d="causal_conv1d", gated_norm="mamba_ssm", rms_norm="mamba_ssm")


def build(kernels: KernelConfig, state: dict | None = None) -> HybridLanguageModel:
    try:
        model = HybridLanguageModel(LM, kernels)
    except KernelUnavailableError as err:
        missing_backend(str(err))
    if state is None:
        model.reset_parameters(torch.Generator().manual_seed(0))
    else:
        model.load_state_dict(state)  # strict: the kernels change no parameter name
    return model.to(CUDA)


def model_forward_backward(model: HybridLanguageModel, autocast: bool) -> tuple[Tensor, dict[str, Tensor]]:
    torch.manual_seed(6)
    ids = torch.randint(0, LM.vocab_size, (2, 150), device=CUDA)
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=CUDA)
    with torch.autocast(CUDA, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, cu_seqlens=cu)
    grad_out = torch.randn(logits.shape, device=CUDA)
    (logits.float() * grad_out).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("kernels", "autocast"), [
    (KernelConfig(**MAMBA_FUSED), False),
    (KernelConfig(**MAMBA_FUSED, attention="flash_attn"), True),
    (KernelConfig(**MAMBA_FUSED, attention="transformer_engine"), True),
    (KernelConfig(attention="torch_varlen"), True),  # needs nothing but the image's torch
], ids=["fp32_mamba_kernels", "bf16_all_fused_flash_attn", "bf16_all_fused_transformer_engine",
        "bf16_torch_varlen_attention"])
def test_tiny_model_with_fused_kernels_matches_torch_model(kernels, autocast):
    reference = build(KernelConfig())
    fused = build(kernels, {k: v.cpu() for k, v in reference.state_dict().items()})
    logits_ref, grads_ref = model_forward_backward(reference, autocast)
    logits, grads = model_forward_backward(fused, autocast)
    fwd, bwd = MODEL_TOL[torch.bfloat16 if autocast else torch.float32]
    assert_close(logits, logits_ref, fwd, "logits")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], bwd, f"grad {name}")


def test_activation_checkpointing_with_fused_kernels():
    kernels = dict(MAMBA_FUSED, attention="flash_attn")
    plain = build(KernelConfig(**kernels))
    checkpointed = build(KernelConfig(**kernels, activation_checkpointing="layers"),
                         {k: v.cpu() for k, v in plain.state_dict().items()})
    logits_a, grads_a = model_forward_backward(plain, autocast=True)
    logits_b, grads_b = model_forward_backward(checkpointed, autocast=True)
    # Recompute reruns the same kernels; backward ones may sum atomically in another order.
    assert_close(logits_b, logits_a, 1e-3, "logits")
    for name, grad in grads_a.items():
        assert_close(grads_b[name], grad, 1e-2, f"grad {name}")
