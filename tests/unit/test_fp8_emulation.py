"""FP8 delayed scaling without Transformer Engine: TE's scale semantics, quantisation, the Linear swap,
exact resume, and its two GEMMs (emulated in float32, real FP8 through torch._scaled_mm) against each other."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.training.packing import collate_rows
from data_pipelines.training.samples import Sample
from tests.gpu.fp8_tiny_run import CountScaledMm
from train.config.schema import ConfigError, LanguageModelConfig, ModelConfig, OptimConfig, PrecisionConfig
from train.engines.assembly import build_optimizer
from train.model.vlm import VisionLanguageModel
from train.precision import Precision, build_precision
from train.precision.delayed_scaling import DelayedScalingRecipe, DelayedScalingState, quantize
from train.precision.fp8_emulated import Fp8EmulatedLinear
from train.precision.region import fp8_linear_names

CPU = torch.device("cpu")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
F32 = np.float32


# --- scales: TE's delayed-scaling semantics ------------------------------------------------------

def te_reference_scales(amaxes: list[float], length: int, algo: str, margin: int, fp8_max: float) -> list[float]:
    """Scale after each step, written from TE's definition rather than from the implementation:
    a step with amax 0 changes nothing; otherwise the amax is the max of the last `length` nonzero
    amaxes (or the newest), scale = fp8_max * 2**-margin / amax in float32, the previous scale when
    that amax is not finite, float32 max when the quotient overflows."""
    scale, seen, out = F32(1.0), [], []
    for a in map(F32, amaxes):
        if a != 0:
            seen.append(a)
            amax = max(seen[-length:]) if algo == "max" else a
            if np.isfinite(amax):
                with np.errstate(over="ignore"):
                    scale = F32(F32(fp8_max * 2.0 ** -margin) / amax)
                if np.isinf(scale):
                    scale = np.finfo(F32).max
        out.append(float(scale))
    return out


def drive_state(amaxes: list[float], recipe: DelayedScalingRecipe, dtype=E4M3) -> list[float]:
    """Record each step's amax through real quantisations (two micro-batches, the larger last)
    and return the scale after every step."""
    state = DelayedScalingState(recipe, [dtype], CPU)
    scales = []
    for a in amaxes:
        state.quantize(torch.tensor([a / 4, -a / 2]), 0)
        state.quantize(torch.tensor([[a], [0.25 * a]]), 0)
        state.step()
        scales.append(float(state.scale[0]))
    return scales


@pytest.mark.parametrize("algo, expected", [
    ("max", [112.0, 28.0, 28.0, 28.0, 56.0]),
    ("most_recent", [112.0, 28.0, 224.0, 224.0, 56.0]),
])
def test_scales_match_a_hand_computed_table(algo, expected):
    # length 2, margin 1, E4M3 (448): 448/2/2, 448/2/8, then max(8,1) or 1, a zero step changes
    # nothing, then max(1,4) or 4.
    recipe = DelayedScalingRecipe(amax_history_len=2, amax_compute_algo=algo, margin=1)
    assert drive_state([2.0, 8.0, 1.0, 0.0, 4.0], recipe) == expected


SCRIPT = [3.0, 0.5, 0.0, 1000.0, 7.25, 1e-40, 2.0, 0.0, 0.0, 60000.0, 0.1, 0.1, 5.5, 0.03125, 12.0, 1e-3, 448.0,
          0.0, 9.0, 1.5]


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("length", [1, 2, 5, 16])
@pytest.mark.parametrize("margin", [0, 1, 3])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_scales_match_te_reference(algo, length, margin, dtype):
    recipe = DelayedScalingRecipe(amax_history_len=length, amax_compute_algo=algo, margin=margin)
    fp8_max = float(torch.finfo(dtype).max)
    assert drive_state(SCRIPT, recipe, dtype) == te_reference_scales(SCRIPT, length, algo, margin, fp8_max)


def test_history_is_rolled_in_te_layout():
    state = DelayedScalingState(DelayedScalingRecipe(amax_history_len=3), [E4M3], CPU)
    for a in (1.0, 2.0, 0.0, 3.0):
        state.quantize(torch.tensor([a]), 0)
        state.step()
    # Row 0 is the next step's slot; rows 1.. the previous amaxes, oldest first; step 3 skipped.
    assert state.amax_history[:, 0].tolist() == [0.0, 2.0, 3.0]


def test_a_step_quantises_with_the_scale_from_before_it():
    state = DelayedScalingState(DelayedScalingRecipe(amax_history_len=4), [E4M3], CPU)
    q, inv = state.quantize(torch.tensor([0.5, -1.0]), 0)  # step 1: initial scale 1
    assert float(inv) == 1.0 and q.float().tolist() == [0.5, -1.0]
    stats = state.step()
    assert float(stats["fp8_saturated_frac"]) == 0.0 and float(state.scale[0]) == 448.0
    q, inv = state.quantize(torch.tensor([2.0, 0.25]), 0)  # step 2: scale 448 from step 1's amax 1
    assert q.float().tolist() == [448.0, 112.0]  # 2 * 448 saturates at E4M3's 448
    assert (q.float() * inv).tolist() == [1.0, 0.25]
    assert float(state.step()["fp8_saturated_frac"]) == 1.0 and float(state.scale[0]) == 224.0


def test_quantize_saturates_and_rounds_like_a_float8_cast():
    x = torch.tensor([1e6, -1e6, 500.0, 3.3, -0.017, 1e-9])
    for dtype in (E4M3, E5M2):
        limit = torch.finfo(dtype).max
        q = quantize(x, torch.tensor(1.0), dtype).float()
        assert torch.isfinite(q).all() and q[0] == limit and q[1] == -limit
        inside = x.abs() <= limit
        assert torch.equal(q[inside], x[inside].to(dtype).float())  # round-to-nearest-even in range


# --- the FP8 Linear -------------------------------------------------------------------------------

def fp8_linear(recipe: DelayedScalingRecipe, bias: bool = False) -> Fp8EmulatedLinear:
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=bias)
    state = DelayedScalingState(recipe, [recipe.forward_dtype, recipe.forward_dtype, recipe.backward_dtype], CPU)
    module = Fp8EmulatedLinear.from_linear(linear, state, (0, 1, 2))
    # One step so the scales are no longer 1.
    module(torch.randn(5, 24)).square().sum().backward()
    state.step()
    module.zero_grad(set_to_none=True)
    return module


@pytest.mark.parametrize("fp8_format, wgrad", [("hybrid", True), ("hybrid", False), ("e4m3", True)])
def test_fp8_linear_forward_and_backward_match_hand_quantised_gemms(fp8_format, wgrad):
    recipe = DelayedScalingRecipe(fp8_format=fp8_format, amax_history_len=4, fp8_wgrad=wgrad)
    module = fp8_linear(recipe, bias=True)
    s_x, s_w, s_g = module.state.scale.tolist()
    x = torch.randn(2, 3, 24, requires_grad=True)
    g = torch.randn(2, 3, 16) * 1e-3
    out = module(x)
    out.backward(g)

    q = lambda t, s, dtype: quantize(t, torch.tensor(s), dtype).float()  # noqa: E731
    xq, wq = q(x.detach(), s_x, E4M3), q(module.weight.detach(), s_w, E4M3)
    gq = q(g, s_g, E5M2 if fp8_format == "hybrid" else E4M3)
    expected_out = (xq @ wq.t()) * (1 / s_x * (1 / s_w)) + module.bias.detach()
    expected_gx = (gq @ wq) * (1 / s_g * (1 / s_w))
    g2, x2 = g.reshape(-1, 16), x.detach().reshape(-1, 24)
    expected_gw = (gq.reshape(-1, 16).t() @ xq.reshape(-1, 24)) * (1 / s_g * (1 / s_x)) if wgrad else g2.t() @ x2
    torch.testing.assert_close(out.detach(), expected_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, expected_gx, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(module.weight.grad, expected_gw, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(module.bias.grad, g2.sum(0))
    # The quantisation is really there: plain GEMMs differ.
    assert not torch.allclose(x.grad, g @ module.weight.detach(), rtol=1e-3, atol=0)


def test_bf16_autocast_quantises_the_incoming_input_and_returns_bf16():
    """As Transformer Engine 2.x: the activation is quantised in the dtype it arrives in (fp32 here),
    not cast to bf16 first; the output comes in the autocast dtype."""
    module = fp8_linear(DelayedScalingRecipe(amax_history_len=4))
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    s_x, s_w, _ = module.state.scale.tolist()
    xq = quantize(x, torch.tensor(s_x), E4M3).float()
    wq = quantize(module.weight.detach(), torch.tensor(s_w), E4M3).float()
    torch.testing.assert_close(out, ((xq @ wq.t()) * (1 / s_x * (1 / s_w))).bfloat16())
    # Casting to bf16 first quantises other values here: the check can tell the two apart.
    assert not torch.equal(quantize(x.bfloat16(), torch.tensor(s_x), E4M3).float(), xq)


# --- the plugin on the real model -----------------------------------------------------------------

LM = LanguageModelConfig(pattern="M*-M-", hidden_size=32, vocab_size=64, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8,
                         mlp_hidden_size=32)


def tiny_model(seed: int = 0, lm: LanguageModelConfig = LM) -> VisionLanguageModel:
    model = VisionLanguageModel(ModelConfig(language_model=lm), image_token_id=10)
    model.reset_parameters(seed)
    return model


def emulated(**overrides) -> Precision:
    return build_precision(PrecisionConfig(name="fp8_delayed_emulated", amax_history_len=4, **overrides), CPU)


def test_region_keeps_first_last_layers_and_the_vision_side():
    model = tiny_model()
    keys, params = list(model.state_dict()), {n: id(p) for n, p in model.named_parameters()}
    precision = emulated()
    precision.convert_model(model)
    assert list(model.state_dict()) == keys  # checkpoints and HF conversion see the same names
    assert {n: id(p) for n, p in model.named_parameters()} == params  # and the same Parameters
    names = precision.fp8_module_names(model)
    layers = "language_model.backbone.layers"
    assert names == [f"{layers}.1.mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [f"{layers}.2.mixer.up_proj", f"{layers}.2.mixer.down_proj", f"{layers}.3.mixer.in_proj",
         f"{layers}.3.mixer.out_proj"]
    # The region itself (a precision config would refuse FP8 on the vision side: ranks skip it on
    # text-only micro-batches, see test_config).
    names = fp8_linear_names(tiny_model(), ["*.mixer.in_proj", "projector"], keep_first_last_layers=0)
    assert f"{layers}.0.mixer.out_proj" in names and f"{layers}.4.mixer.up_proj" in names
    assert not any(n.endswith("in_proj") for n in names)
    assert any(n.startswith("vision_model.") for n in names) and not any(n.startswith("projector") for n in names)


def sample(n: int, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    ids = rng.integers(12, 64, size=n)
    labels = ids.copy()
    labels[:3] = -100
    return Sample(ids, labels, torch.zeros(0, 3, 64, 64, dtype=torch.uint8), "t", f"s{seed}")


# Fixed batches, one micro-batch of two rows per step (the max over micro-batches is covered by
# drive_state above; one keeps this test fast).
STEPS = [[collate_rows([[sample(28, 2 * i)], [sample(30, 2 * i + 1)]], 32, 3)] for i in range(6)]


class Run:
    """Model + AdamW + precision, driven the way the trainer drives them."""

    def __init__(self, precision_cfg: PrecisionConfig, seed: int = 0, lm: LanguageModelConfig = LM):
        self.model = tiny_model(seed, lm)
        self.precision = build_precision(precision_cfg, CPU)
        self.precision.convert_model(self.model)
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=1e-2))

    def step(self, micro_batches) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(b.num_supervised_tokens for b in micro_batches)
        loss_sum = 0.0
        for b in micro_batches:
            with self.precision.autocast():
                loss, _ = self.model(b)
            (loss / total).backward()
            self.precision.after_backward()  # as TrainModule: the gradients' scales update per micro-batch
            loss_sum += float(loss.detach())
        self.optimizer.step()
        self.precision.after_optimizer_step()
        return loss_sum / total

    def checkpoint(self, with_precision: bool = True) -> dict:
        clone = lambda sd: {k: v.clone() for k, v in sd.items()}  # noqa: E731
        return {"model": clone(self.model.state_dict()), "optim": copy.deepcopy(self.optimizer.state_dict()),
                "precision": clone(self.precision.state_dict()) if with_precision else None}

    def resume(self, ckpt: dict) -> "Run":
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optim"])
        if ckpt["precision"] is not None:
            self.precision.load_state_dict(ckpt["precision"])
        return self


FP8_CFG = PrecisionConfig(name="fp8_delayed_emulated", amax_history_len=4)


def test_fp8_emulated_smoke_tracks_fp32_and_resumes_exactly():
    fp32 = Run(PrecisionConfig(name="fp32"))
    fp32_losses = [fp32.step(s) for s in STEPS]
    fp8, half = Run(FP8_CFG), len(STEPS) // 2
    fp8_losses = [fp8.step(s) for s in STEPS[:half]]
    ckpt = fp8.checkpoint()
    fp8_losses += [fp8.step(s) for s in STEPS[half:]]
    assert fp8_losses[-1] < fp8_losses[0]  # it trains
    assert abs(fp8_losses[-1] - fp32_losses[-1]) <= 0.10 * fp32_losses[-1]
    assert fp8_losses != fp32_losses  # FP8 really changed the numerics
    metrics = fp8.precision.step_metrics()
    assert set(metrics) == {"fp8_saturated_frac", "fp8_scale_min", "fp8_scale_max"}
    assert 0.0 <= metrics["fp8_saturated_frac"] <= 1.0 and 1.0 < metrics["fp8_scale_min"] <= metrics["fp8_scale_max"]

    # A fresh process's objects (other init seed), restored mid-run: bit-exact continuation.
    resumed = Run(FP8_CFG, seed=1).resume(ckpt)
    assert [resumed.step(s) for s in STEPS[half:]] == fp8_losses[half:]
    # Without the amax state the continuation differs: that state is what makes resume exact.
    no_fp8_state = Run(FP8_CFG, seed=1).resume({**ckpt, "precision": None})
    assert [no_fp8_state.step(s) for s in STEPS[half:]] != fp8_losses[half:]


def test_state_dict_contract_and_mismatches():
    run = Run(FP8_CFG)
    run.step(STEPS[0])
    state = run.precision.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert all(k.endswith((".amax_history", ".scale")) for k in state)
    name = run.precision.fp8_module_names(run.model)[0]
    assert state[f"{name}.fwd.amax_history"].shape == (4, 2) and state[f"{name}.bwd.scale"].shape == (1,)
    assert state[f"{name}.fwd.amax_history"][-1].gt(0).all()  # the first step's amaxes

    longer = Run(PrecisionConfig(name="fp8_delayed_emulated", amax_history_len=8))
    with pytest.raises(ValueError, match="amax_history_len"):
        longer.precision.load_state_dict(state)
    with pytest.raises(ValueError, match="precision=bf16"):
        build_precision(PrecisionConfig(name="bf16"), CPU).load_state_dict(state)


def test_plain_precisions():
    bf16 = build_precision(PrecisionConfig(name="bf16"), CPU)
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    fp32 = build_precision(PrecisionConfig(name="fp32"), CPU)
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    model = tiny_model()
    assert fp32.convert_model(model) is model and fp32.fp8_module_names(model) == []
    assert fp32.step_metrics() == {} and fp32.state_dict() == {}


@pytest.mark.parametrize("fields, message", [
    ({"margin": -1}, r"precision\.margin"),
    ({"amax_history_len": 0}, r"precision\.amax_history_len"),
    ({"keep_first_last_layers": -2}, r"precision\.keep_first_last_layers"),
    ({"keep_patterns": [" "]}, r"precision\.keep_patterns\[0\]"),
    ({"name": "fp32", "compute_dtype": "bf16"}, r"precision\.compute_dtype"),
    ({"name": "fp8_delayed", "fp8_wgrad": False}, r"precision\.fp8_wgrad"),
    ({"name": "fp8_delayed", "fp8_gemm": "scaled_mm"}, r"precision\.fp8_gemm=scaled_mm .*Transformer Engine"),
    ({"name": "bf16", "fp8_gemm": "scaled_mm"}, r"precision\.fp8_gemm=scaled_mm .*no FP8 GEMMs"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        PrecisionConfig(**{"name": "fp8_delayed_emulated", **fields}).validate("precision")


def test_recipe_composes_with_each_precision():
    from train.config.compose import load_config

    # TE's FP8 GEMMs need multiples of 16: the tiny model's in_proj (196 wide) gets 16 Mamba heads of 4.
    fp8_shapes = ["model.language_model.mamba_num_heads=16", "model.language_model.mamba_head_dim=4"]
    for name in ("fp32", "bf16", "fp8_delayed", "fp8_delayed_emulated"):
        cfg = load_config("stage1_image_sft", ["smoke=cpu", f"precision={name}", *(fp8_shapes if name == "fp8_delayed" else [])])
        assert cfg.precision.name == name
    cfg = load_config("stage1_image_sft", ["smoke=cpu", "precision=fp8_delayed_emulated",
                                           "precision.amax_compute_algo=most_recent", "precision.margin=2"])
    assert (cfg.precision.amax_compute_algo, cfg.precision.margin, cfg.precision.resolved_compute_dtype) == \
        ("most_recent", 2, "fp32")
    assert cfg.precision.fp8_gemm == "emulated"  # the default, from the precision group's file
    cfg = load_config("stage1_image_sft", ["smoke=cpu", "precision=fp8_delayed_emulated", "precision.fp8_gemm=scaled_mm"])
    assert cfg.precision.fp8_gemm == "scaled_mm"
    with pytest.raises(ConfigError, match=r"precision\.fp8_gemm='fused': choose one of \['emulated', 'scaled_mm'\]"):
        load_config("stage1_image_sft", ["smoke=cpu", "precision=fp8_delayed_emulated", "precision.fp8_gemm=fused"])
    assert cfg.precision.keep_patterns == ["language_model.backbone.embeddings", "language_model.lm_head",
                                           "vision_model", "projector"]


def test_a_broken_transformer_engine_never_breaks_import(tmp_path, project_root):
    fake = tmp_path / "transformer_engine"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libtransformer_engine.so: cannot open shared object file')\n")
    code = textwrap.dedent("""
        import torch, train, train.precision, train.loop.trainer
        from train.config.schema import PrecisionConfig
        from train.precision import build_precision
        try:
            build_precision(PrecisionConfig(name="fp8_delayed"), torch.device("cuda"))
        except RuntimeError as err:
            print(err)
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{project_root}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OSError: libtransformer_engine.so" in out.stdout and "fp8_delayed_emulated" in out.stdout


DDP_WORKER = textwrap.dedent("""
    import json, os, sys, torch
    from train.config.schema import ParallelConfig
    from train.parallel.distributed import init_distributed, shutdown
    from train.precision.delayed_scaling import DelayedScalingRecipe, DelayedScalingState
    rank, port = int(sys.argv[1]), sys.argv[2]
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    init_distributed(ParallelConfig(), "cpu")  # the seam's groups: the amaxes reduce over data_context
    state = DelayedScalingState(DelayedScalingRecipe(amax_history_len=2), [torch.float8_e4m3fn, torch.float8_e5m2],
                                torch.device("cpu"))
    state.quantize(torch.tensor([1.0 + rank]), 0)  # the ranks see different amaxes
    state.quantize(torch.tensor([4.0 if rank == 0 else 0.0]), 1)
    stats = state.step()
    print(json.dumps([state.scale.tolist(), state.amax_history.tolist(), float(stats["fp8_saturated_frac"])]))
    shutdown()
""")


def test_amax_is_reduced_over_data_parallel_ranks(tmp_path, project_root):
    env = {**os.environ, "PYTHONPATH": str(project_root)}
    from train.parallel.distributed import free_port

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(rank), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    assert results[0] == results[1] == [[448.0 / 2.0, 57344.0 / 4.0], [[0.0, 0.0], [2.0, 4.0]], 0.0]


def test_fp8_gemm_is_exact_for_values_on_the_e4m3_grid():
    # With scales of 1 and values on the E4M3 grid, the FP8 GEMM equals the plain one exactly.
    recipe = DelayedScalingRecipe(amax_history_len=1)
    state = DelayedScalingState(recipe, [E4M3, E4M3, E5M2], CPU)
    linear = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randint(-8, 9, (8, 16)).float() / 4)
    x = torch.randint(-8, 9, (3, 16)).float() / 8
    assert torch.equal(Fp8EmulatedLinear.from_linear(linear, state, (0, 1, 2))(x), F.linear(x, linear.weight))


def test_scales_update_per_micro_batch_as_transformer_engine():
    """As TE: forward tensors' scales update when the autocast exits, gradients' after their
    backward, so with gradient accumulation the second micro-batch of a step already quantises
    with the scales the first one set (checked against the delayed-scaling rule by hand)."""
    precision = emulated()  # E4M3 forward (max 448), E5M2 gradients (max 57344), margin 0
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    precision.convert_model(model)
    weight = model[0].weight.detach()
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 8, generator=gen) * 3, torch.randn(4, 8, generator=gen) * 5
    g1 = torch.randn(4, 8, generator=gen) * 0.01
    scale = precision.state.scale
    with precision.autocast():
        y1 = model(x1)
    x_scale, w_scale = torch.tensor(448.0) / x1.abs().max(), torch.tensor(448.0) / weight.abs().max()
    assert torch.equal(scale[:2], torch.stack([x_scale, w_scale])) and scale[2] == 1  # gradients: not yet
    y1.backward(g1)
    precision.after_backward()
    assert scale[2] == torch.tensor(57344.0) / g1.abs().max()
    with precision.autocast():  # micro-batch 2, same optimizer step
        y2 = model(x2)
    by_hand = (quantize(x2, x_scale, torch.float8_e4m3fn).float()
               @ quantize(weight, w_scale, torch.float8_e4m3fn).float().t()) * (x_scale.reciprocal() * w_scale.reciprocal())
    assert torch.equal(y2.detach(), by_hand)
    # The window's max: x2's larger amax sets the next scale.
    assert scale[0] == torch.tensor(448.0) / torch.maximum(x1.abs().max(), x2.abs().max())


def test_fp8_layer_recompute_uses_the_scales_of_its_forward():
    """With layers recomputed in backward, the scales have moved on (they update when the autocast
    exits) before the rerun: it must quantise as its forward did, so gradients equal those of the
    run that stored every activation, micro-batch after micro-batch."""
    from train.config.schema import KernelConfig

    grads = {}
    for mode in ("none", "layers"):
        model = VisionLanguageModel(ModelConfig(language_model=LM, kernels=KernelConfig(activation_checkpointing=mode)),
                                    image_token_id=10)
        model.reset_parameters(0)
        precision = emulated(keep_first_last_layers=0)
        precision.convert_model(model)
        for batch in (STEPS[0][0], STEPS[1][0]):  # two micro-batches: the second starts from moved scales
            with precision.autocast():
                loss, _ = model(batch)
            loss.backward()
            precision.after_backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads[mode]["scales"] = precision.state.scale.clone()  # and the reruns recorded no amax
    assert grads["none"].keys() == grads["layers"].keys()
    for name in grads["none"]:
        assert torch.equal(grads["none"][name], grads["layers"][name]), name



# --- the two GEMMs: emulated (float32) and real FP8 (torch._scaled_mm, which runs on CPU too) --------

def gemm_gap_bound(a: torch.Tensor, b: torch.Tensor, inv: float, out_dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """How far the two GEMMs of the same FP8 operands a (M, K), b (K, N) (as float32 values) may differ.

    Every product of two FP8 values is exact in float32, so each GEMM differs from the exact sum only
    by its float32 accumulation (at most K * u * sum_k |a_ik b_kj|, u = 2**-24, whatever the order)
    and the scale multiply (u relative): the two together at most twice that. An out_dtype coarser
    than float32 rounds each once more, so their results may also sit one of its steps apart
    (eps * |value|); a bias joins in float32 before that rounding.
    """
    u = 2.0 ** -24
    magnitude = (a.double().abs() @ b.double().abs()) * inv
    exact = (a.double() @ b.double()) * inv + (0 if bias is None else bias.double())
    bound = 2 * (a.shape[1] + 2) * u * magnitude
    if out_dtype != torch.float32:
        bound = bound + torch.finfo(out_dtype).eps * exact.abs() + torch.finfo(out_dtype).tiny
    return bound


def assert_within(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    gap = (got.double() - expected.double()).abs()
    assert (gap <= bound).all(), f"{what}: gap {float((gap - bound).max()):.3g} over the bound"


@pytest.mark.parametrize("pair", [(E4M3, E4M3), (E5M2, E4M3)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_gemm_agrees_with_the_emulated_gemm(pair, out_dtype):
    from train.precision.fp8_gemm import emulated_gemm, scaled_mm_gemm

    gen = torch.Generator().manual_seed(0)
    # K = 37: not a multiple of 16, so the zero padding of the inner dim is exercised too.
    a = (torch.randn(9, 37, generator=gen) * 40).to(pair[0])
    b = (torch.randn(48, 37, generator=gen) * 3).to(pair[1]).t()  # (K, N), the transpose of a weight
    a_inv, b_inv = torch.tensor(1 / 64), torch.tensor(1 / 8)
    emulated = emulated_gemm(a, b, a_inv, b_inv, out_dtype)
    with CountScaledMm() as mode:
        real = scaled_mm_gemm(a, b, a_inv, b_inv, out_dtype)
    assert mode.calls == 1 and real.dtype == emulated.dtype == out_dtype and real.shape == (9, 48)
    assert_within(real, emulated, gemm_gap_bound(a.float(), b.float(), 1 / 512, out_dtype), "gemm")


def linear_pair(recipe: DelayedScalingRecipe, bias: bool) -> dict[str, Fp8EmulatedLinear]:
    """The same Linear (shared Parameters) under both GEMMs, each with its own scaling state."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=bias)
    dtypes = [recipe.forward_dtype, recipe.forward_dtype, recipe.backward_dtype]
    return {gemm: Fp8EmulatedLinear.from_linear(linear, DelayedScalingState(recipe, dtypes, CPU), (0, 1, 2), gemm)
            for gemm in ("emulated", "scaled_mm")}


@pytest.mark.parametrize("fp8_format, wgrad, bias, bf16", [
    ("hybrid", True, True, False), ("hybrid", True, False, True), ("e4m3", False, True, False)])
def test_scaled_mm_linear_agrees_with_the_emulation_and_keeps_the_same_state(fp8_format, wgrad, bias, bf16):
    """Both GEMMs consume identical quantised operands, so forward output, input and weight
    gradients agree within the accumulation bound, and the scaling state (amaxes are recorded
    before any GEMM) stays bit-identical step after step."""
    recipe = DelayedScalingRecipe(fp8_format=fp8_format, amax_history_len=3, fp8_wgrad=wgrad)
    modules = linear_pair(recipe, bias)
    weight, b = modules["emulated"].weight, modules["emulated"].bias
    out_dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(1)
    for step, magnitude in enumerate([1.0, 6.0, 0.5]):  # the jump in magnitude saturates step 1
        x = torch.randn(2, 5, 32, generator=gen) * magnitude  # 10 tokens: the wgrad GEMM's K gets padded
        g = torch.randn(2, 5, 48, generator=gen) * 1e-3
        s_x, s_w, s_g = modules["emulated"].state.scale.tolist()  # the scales this step quantises with
        results = {}
        for gemm, module in modules.items():
            weight.grad = None
            xi = x.clone().requires_grad_()
            with CountScaledMm() as mode:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = module(xi)
                out.backward(g.to(out.dtype))
            assert mode.calls == (3 if wgrad else 2) * (gemm == "scaled_mm"), gemm
            results[gemm] = out.detach(), xi.grad, weight.grad.clone()
            module.state.step()
        state_e, state_s = modules["emulated"].state, modules["scaled_mm"].state
        assert torch.equal(state_e.amax_history, state_s.amax_history), step
        assert torch.equal(state_e.scale, state_s.scale), step

        # The operands both GEMMs consumed, as float32 values.
        q = lambda t, s, dtype: quantize(t, torch.tensor(s), dtype).float().reshape(-1, t.shape[-1])  # noqa: E731
        xq, wq, gq = q(x, s_x, E4M3), q(weight.detach(), s_w, E4M3), q(g, s_g, recipe.backward_dtype)
        (out_e, gx_e, gw_e), (out_s, gx_s, gw_s) = results["emulated"], results["scaled_mm"]
        assert out_s.dtype == out_e.dtype == out_dtype
        bias_value = None if b is None else b.detach()
        assert_within(out_s.reshape(-1, 48), out_e.reshape(-1, 48),
                      gemm_gap_bound(xq, wq.t(), 1 / s_x / s_w, out_dtype, bias_value), f"step {step} output")
        assert_within(gx_s.reshape(-1, 32), gx_e.reshape(-1, 32),
                      gemm_gap_bound(gq, wq, 1 / s_g / s_w, torch.float32), f"step {step} input gradient")
        if wgrad:
            bound = gemm_gap_bound(gq.t(), xq, 1 / s_g / s_x, torch.float32)
        else:  # both run the same float32 GEMM on unquantised tensors
            bound = torch.zeros(())
        assert_within(gw_s, gw_e, bound, f"step {step} weight gradient")
    assert float(state_e.scale[0]) != 1.0 and state_e.amax_history.abs().sum() > 0  # FP8 really ran


# Every FP8 Linear of this LM has in/out features divisible by 16 (Mamba in_proj: 2 * 32 + 2 * 8 + 16 = 96).
LM16 = dataclasses.replace(LM, mamba_num_heads=16, mamba_head_dim=2)
SCALED_MM_CFG = dataclasses.replace(FP8_CFG, fp8_gemm="scaled_mm")


def test_scaled_mm_trains_like_the_emulation_with_the_same_state_and_resumes_exactly():
    emulated_run, scaled_run = Run(FP8_CFG, lm=LM16), Run(SCALED_MM_CFG, lm=LM16)
    names = scaled_run.precision.fp8_module_names(scaled_run.model)
    assert names and names == emulated_run.precision.fp8_module_names(emulated_run.model)
    assert all(scaled_run.model.get_submodule(n).gemm_name == "scaled_mm" for n in names)
    with CountScaledMm() as mode:
        scaled_losses = [scaled_run.step(STEPS[0])]
    assert mode.calls == 3 * len(names)  # forward, input gradient and weight gradient of each FP8 Linear
    ckpt = scaled_run.checkpoint()
    scaled_losses += [scaled_run.step(s) for s in STEPS[1:3]]
    emulated_losses = [emulated_run.step(s) for s in STEPS[:3]]
    # Accumulation order only: the first layers' amaxes agree exactly, later ones to float32 rounding.
    np.testing.assert_allclose(scaled_losses, emulated_losses, rtol=1e-4)
    state_s, state_e = scaled_run.precision.state_dict(), emulated_run.precision.state_dict()
    assert state_s.keys() == state_e.keys()
    assert all(("amax_history" in k) != k.endswith(".scale") for k in state_s)
    for key in state_s:
        torch.testing.assert_close(state_s[key], state_e[key], rtol=1e-4, atol=0, msg=key)
        assert state_s[key].ne(0 if "amax_history" in key else 1).any(), key  # FP8 state really moved

    resumed = Run(SCALED_MM_CFG, seed=1, lm=LM16).resume(ckpt)
    assert [resumed.step(s) for s in STEPS[1:3]] == scaled_losses[1:]
    # One checkpoint format: the emulated run's FP8 state loads into the scaled_mm plugin as is.
    resumed.precision.load_state_dict(state_e)
    assert all(torch.equal(v, state_e[k]) for k, v in resumed.precision.state_dict().items())


def test_scaled_mm_refuses_linears_it_cannot_run_at_build_time():
    precision = build_precision(SCALED_MM_CFG, CPU)
    with pytest.raises(ConfigError, match=r"fp8_gemm=scaled_mm: .*divisible by 16.*mixer\.in_proj \(82x32\).*"
                                          r"precision\.keep_patterns or set precision\.fp8_gemm=emulated"):
        precision.convert_model(tiny_model())  # LM's Mamba in_proj is 82 wide
    # Kept out of FP8, the same model converts.
    keep = dataclasses.replace(SCALED_MM_CFG, keep_patterns=[*SCALED_MM_CFG.keep_patterns, "*.mixer.in_proj"])
    model = build_precision(keep, CPU).convert_model(tiny_model())
    assert "fp8_gemm=scaled_mm" in repr(model)
