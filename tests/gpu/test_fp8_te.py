"""Transformer Engine's FP8 delayed scaling against the emulation (needs CUDA sm89+ and TE)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.gpu import import_backend
from tests.gpu.fp8_tiny_run import LM, STEPS, Run
from train.config.schema import ModelConfig, PrecisionConfig
from train.model.vlm import VisionLanguageModel
from train.precision import build_precision

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _needs_fp8_gpu():
    import_backend("transformer_engine.pytorch", "(needs Transformer Engine: pip install -e '.[te-cu12]' or '.[te-cu13]')")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def cfg(name: str, **fields) -> PrecisionConfig:
    # bf16 compute on both sides: TE quantises the bf16-cast input, as the emulation then does.
    return PrecisionConfig(name=name, compute_dtype="bf16", **fields)


@pytest.mark.parametrize("algo, fp8_format, margin", [("max", "hybrid", 0), ("most_recent", "e4m3", 1)])
def test_te_linear_records_the_same_amaxes_and_scales_as_the_emulation(algo, fp8_format, margin):
    fields = dict(amax_history_len=3, amax_compute_algo=algo, fp8_format=fp8_format, margin=margin,
                  keep_patterns=[], keep_first_last_layers=0)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 48, bias=False)).to(CUDA)
    runs = {}
    for name in ("fp8_delayed", "fp8_delayed_emulated"):
        model = copy.deepcopy(base)
        precision = build_precision(cfg(name, **fields), CUDA)
        precision.convert_model(model)
        assert precision.fp8_module_names(model) == ["0", "2"]
        assert list(model.state_dict()) == list(base.state_dict())  # no TE _extra_state among the keys
        runs[name] = (model, precision)

    gen = torch.Generator(device="cuda").manual_seed(1)
    grad = torch.randn(32, 48, device=CUDA, generator=gen).bfloat16()
    # Magnitudes jump so that some steps saturate under the delayed scales.
    for step, magnitude in enumerate([1.0, 1.0, 8.0, 0.5, 0.5, 30.0]):
        x = torch.randn(32, 64, device=CUDA, generator=gen) * magnitude
        outs, grads, metrics = {}, {}, {}
        for name, (model, precision) in runs.items():
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            with precision.autocast():
                out = model(xi)
            out.backward(grad)
            precision.after_backward()  # both update per micro-batch, as TE does
            precision.after_optimizer_step()
            outs[name], grads[name], metrics[name] = out.detach(), xi.grad, precision.step_metrics()
        te_state, emu_state = (runs[n][1].state_dict() for n in ("fp8_delayed", "fp8_delayed_emulated"))
        for key, emu in emu_state.items():
            slots = emu.shape[-1]
            torch.testing.assert_close(te_state[key][..., :slots], emu, rtol=1e-6, atol=0, msg=f"step {step} {key}")
        assert rel_err(outs["fp8_delayed"], outs["fp8_delayed_emulated"]) < 1e-2
        assert rel_err(grads["fp8_delayed"], grads["fp8_delayed_emulated"]) < 2e-2
        assert metrics["fp8_delayed"] == pytest.approx(metrics["fp8_delayed_emulated"], rel=1e-6)


def test_tiny_model_trains_alike_under_te_and_emulation_and_te_resumes():
    fields = dict(amax_history_len=8)
    te_run, emu_run = Run(cfg("fp8_delayed", **fields), CUDA), Run(cfg("fp8_delayed_emulated", **fields), CUDA)
    assert te_run.precision.fp8_module_names(te_run.model) == emu_run.precision.fp8_module_names(emu_run.model)
    half = len(STEPS) // 2
    te_losses = [te_run.step(b) for b in STEPS[:half]]
    ckpt = {"model": {k: v.clone() for k, v in te_run.model.state_dict().items()},
            "optim": copy.deepcopy(te_run.optimizer.state_dict()),
            "precision": {k: v.clone() for k, v in te_run.precision.state_dict().items()}}
    te_losses += [te_run.step(b) for b in STEPS[half:]]
    emu_losses = [emu_run.step(b) for b in STEPS]
    np.testing.assert_allclose(te_losses, emu_losses, rtol=2e-2)
    te_state, emu_state = te_run.precision.state_dict(), emu_run.precision.state_dict()
    for key, emu in emu_state.items():
        torch.testing.assert_close(te_state[key][..., :emu.shape[-1]], emu, rtol=0.1, atol=0, msg=key)

    resumed = Run(cfg("fp8_delayed", **fields), CUDA, seed=1)
    resumed.model.load_state_dict(ckpt["model"])
    resumed.optimizer.load_state_dict(ckpt["optim"])
    resumed.precision.load_state_dict(ckpt["precision"])
    np.testing.assert_allclose([resumed.step(b) for b in STEPS[half:]], te_losses[half:], rtol=1e-5)


@pytest.mark.parametrize("name", ["fp8_delayed", "fp8_delayed_emulated"])
def test_layer_recompute_reruns_inside_fp8_with_the_forward_scales(name):
    """activation_checkpointing=layers: TE's checkpoint (and the emulation's twin) rerun each layer
    in FP8 with the scales of its forward, so two micro-batches give the stored run's gradients."""
    from train.config.schema import KernelConfig
    from train.precision import build_precision

    grads = {}
    for mode in ("none", "layers"):
        model = VisionLanguageModel(ModelConfig(language_model=LM, kernels=KernelConfig(activation_checkpointing=mode)),
                                    image_token_id=10)
        model.reset_parameters(0)
        precision = build_precision(PrecisionConfig(name=name, amax_history_len=4, keep_first_last_layers=0),
                                    torch.device(CUDA))
        model = precision.convert_model(model.to(CUDA))
        for batch in STEPS[:2]:
            with precision.autocast():
                loss, _ = model(batch.to(CUDA))
            loss.backward()
            precision.after_backward()
        grads[mode] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    for key, expected in grads["none"].items():
        got = grads["layers"][key]
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max().clamp(min=1e-12), key
