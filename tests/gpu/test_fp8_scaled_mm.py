"""Real FP8 GEMMs without Transformer Engine (precision.fp8_gemm=scaled_mm: torch._scaled_mm, cuBLASLt)
against the emulated GEMMs on CUDA (needs compute capability 8.9+; marked gpu).

Both GEMMs consume the same quantised operands (the shared delayed-scaling state quantises before
either runs), and every product of two FP8 values is exact, so they differ only in accumulation.
cuBLASLt's FP8 kernels accumulate on the tensor cores with fewer bits than float32 (about 14 on
Hopper, DeepSeek-V3 section 3.3.2) and, without `use_fast_accum`, periodically promote the partial
sums to float32. The per-element bound below, 2**-9 of sum_k |a_ik b_kj| (32 additions at 2**-14
between promotions) plus one rounding step of the output dtype, is deliberately loose; the
aggregate relative error of a whole output is the sharp check (about 1e-4 expected for random
operands, asserted below 2e-3).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from tests.gpu.fp8_tiny_run import STEPS, CountScaledMm, Run
from train.config.schema import PrecisionConfig
from train.precision.delayed_scaling import DelayedScalingRecipe, DelayedScalingState, quantize
from train.precision.fp8_emulated import Fp8EmulatedLinear
from train.precision.fp8_gemm import emulated_gemm, scaled_mm_gemm

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
TENSOR_CORE_ACCUMULATION = 2.0 ** -9


@pytest.fixture(autouse=True)
def _needs_fp8_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs (torch._scaled_mm) need compute capability 8.9+")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def assert_gemms_agree(real: torch.Tensor, emulated: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv: float,
                       what: str) -> None:
    """a (M, K), b (K, N): the float32 values of the FP8 operands both GEMMs consumed."""
    magnitude = (a.double().abs() @ b.double().abs()) * inv
    bound = TENSOR_CORE_ACCUMULATION * magnitude
    if real.dtype != torch.float32:
        bound = bound + torch.finfo(real.dtype).eps * emulated.double().abs() + torch.finfo(real.dtype).tiny
    gap = (real.double() - emulated.double()).abs()
    assert (gap <= bound).all(), f"{what}: gap {float((gap - bound).max()):.3g} over the bound"
    # In aggregate far tighter than the worst case: a wrong scale or operand shows up here.
    assert rel_err(real, emulated) < (2e-3 if real.dtype == torch.float32 else 6e-3), what


@pytest.mark.parametrize("pair", [(E4M3, E4M3), (E5M2, E4M3)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(200, 512, 384), (48, 200, 64)])  # M is free; K=200 is zero-padded to 208
def test_scaled_mm_gemm_agrees_with_the_emulated_gemm(pair, out_dtype, m, k, n):
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(m, k, device=CUDA, generator=gen) * 40).to(pair[0])
    b = (torch.randn(n, k, device=CUDA, generator=gen) * 3).to(pair[1]).t()  # (K, N): a weight's transpose
    a_inv, b_inv = torch.tensor(1 / 64, device=CUDA), torch.tensor(1 / 8, device=CUDA)
    with CountScaledMm() as mode:
        real = scaled_mm_gemm(a, b, a_inv, b_inv, out_dtype)
    assert mode.calls == 1 and real.dtype == out_dtype and real.shape == (m, n)
    emulated = emulated_gemm(a, b, a_inv, b_inv, out_dtype)
    assert_gemms_agree(real, emulated, a.float(), b.float(), 1 / 512, f"{pair} -> {out_dtype}")


def quantized(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """t's FP8 values under `scale` as float32 (..., K) -> (-1, K)."""
    return quantize(t, torch.tensor(scale, device=t.device), dtype).float().reshape(-1, t.shape[-1])


@pytest.mark.parametrize("fp8_format, bias, bf16", [("hybrid", False, True), ("hybrid", True, False),
                                                    ("e4m3", False, True)])
def test_scaled_mm_linear_agrees_with_the_emulation_and_keeps_the_same_state(fp8_format, bias, bf16):
    recipe = DelayedScalingRecipe(fp8_format=fp8_format, amax_history_len=3)
    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=bias).to(CUDA)
    dtypes = [recipe.forward_dtype, recipe.forward_dtype, recipe.backward_dtype]
    modules = {gemm: Fp8EmulatedLinear.from_linear(linear, DelayedScalingState(recipe, dtypes, CUDA), (0, 1, 2), gemm)
               for gemm in ("emulated", "scaled_mm")}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for step, magnitude in enumerate([1.0, 6.0, 0.5]):
        x = torch.randn(4, 100, 256, device=CUDA, generator=gen) * magnitude  # 400 tokens
        g = torch.randn(4, 100, 384, device=CUDA, generator=gen) * 1e-3
        s_x, s_w, s_g = modules["emulated"].state.scale.tolist()
        results = {}
        for gemm, module in modules.items():
            linear.weight.grad = None
            xi = x.clone().requires_grad_()
            with CountScaledMm() as mode:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    out = module(xi)
                out.backward(g.to(out.dtype))
            assert mode.calls == 3 * (gemm == "scaled_mm"), gemm
            results[gemm] = out.detach(), xi.grad, linear.weight.grad.clone()
            module.state.step()
        emu, real = modules["emulated"].state, modules["scaled_mm"].state
        assert torch.equal(emu.amax_history, real.amax_history) and torch.equal(emu.scale, real.scale), step

        # The operands both GEMMs consumed, as float32 values.
        xq, wq, gq = quantized(x, s_x, E4M3), quantized(linear.weight.detach(), s_w, E4M3), \
            quantized(g, s_g, recipe.backward_dtype)
        (out_e, gx_e, gw_e), (out_s, gx_s, gw_s) = results["emulated"], results["scaled_mm"]
        if bias:  # the bias joins both in float32: compare the products
            out_e, out_s = out_e - linear.bias.detach(), out_s - linear.bias.detach()
        assert_gemms_agree(out_s.reshape(-1, 384), out_e.reshape(-1, 384), xq, wq.t(), 1 / s_x / s_w, "output")
        assert_gemms_agree(gx_s.reshape(-1, 256), gx_e.reshape(-1, 256), gq, wq, 1 / s_g / s_w, "input gradient")
        assert_gemms_agree(gw_s, gw_e, gq.t(), xq, 1 / s_g / s_x, "weight gradient")
    assert float(emu.scale[0]) != 1.0 and emu.amax_history.abs().sum() > 0


def test_tiny_model_trains_alike_under_both_gemms_and_scaled_mm_resumes():
    emulated_cfg = PrecisionConfig(name="fp8_delayed_emulated", compute_dtype="bf16", amax_history_len=8)
    scaled_cfg = dataclasses.replace(emulated_cfg, fp8_gemm="scaled_mm")
    emu_run, real_run = Run(emulated_cfg, CUDA), Run(scaled_cfg, CUDA)
    names = real_run.precision.fp8_module_names(real_run.model)
    assert names and names == emu_run.precision.fp8_module_names(emu_run.model)
    half = len(STEPS) // 2
    with CountScaledMm() as mode:
        real_losses = [real_run.step(STEPS[0])]
    assert mode.calls == 3 * len(names)
    emu_losses = [emu_run.step(STEPS[0])]
    # After one step from the same weights the amaxes differ only where a bf16 activation or gradient
    # rounded the other way (a step of 2**-8, a few layers deep); later the weights drift apart too.
    real_state, emu_state = real_run.precision.state_dict(), emu_run.precision.state_dict()
    assert real_state.keys() == emu_state.keys()
    for key, emu in emu_state.items():
        torch.testing.assert_close(real_state[key], emu, rtol=2e-2, atol=0, msg=key)
        assert real_state[key].ne(0 if "amax_history" in key else 1).any(), key  # FP8 really ran
    real_losses += [real_run.step(b) for b in STEPS[1:half]]
    ckpt = {"model": {k: v.clone() for k, v in real_run.model.state_dict().items()},
            "optim": copy.deepcopy(real_run.optimizer.state_dict()),
            "precision": {k: v.clone() for k, v in real_run.precision.state_dict().items()}}
    real_losses += [real_run.step(b) for b in STEPS[half:]]
    emu_losses += [emu_run.step(b) for b in STEPS[1:]]
    np.testing.assert_allclose(real_losses, emu_losses, rtol=1e-2)

    resumed = Run(scaled_cfg, CUDA, seed=1)
    resumed.model.load_state_dict(ckpt["model"])
    resumed.optimizer.load_state_dict(ckpt["optim"])
    resumed.precision.load_state_dict(ckpt["precision"])
    np.testing.assert_allclose([resumed.step(b) for b in STEPS[half:]], real_losses[half:], rtol=1e-5)
