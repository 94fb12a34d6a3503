"""FP8 delayed scaling emulation: TE's scale semantics, quantisation, the Linear swap, exact resume."""

from __future__ import annotations

import copy
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
from train.config.schema import ConfigError, LanguageModelConfig, ModelConfig, OptimConfig, PrecisionConfig
from train.loop.train_module import build_optimizer
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


def tiny_model(seed: int = 0) -> VisionLanguageModel:
    model = VisionLanguageModel(ModelConfig(language_model=LM), image_token_id=10)
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

    def __init__(self, precision_cfg: PrecisionConfig, seed: int = 0):
        self.model = tiny_model(seed)
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
    assert (fp32.pad_multiple(), bf16.pad_multiple(), emulated().pad_multiple()) == (1, 1, 16)
    assert fp32.step_metrics() == {} and fp32.state_dict() == {}


@pytest.mark.parametrize("fields, message", [
    ({"margin": -1}, r"precision\.margin"),
    ({"amax_history_len": 0}, r"precision\.amax_history_len"),
    ({"keep_first_last_layers": -2}, r"precision\.keep_first_last_layers"),
    ({"keep_patterns": [" "]}, r"precision\.keep_patterns\[0\]"),
    ({"name": "fp32", "compute_dtype": "bf16"}, r"precision\.compute_dtype"),
    ({"name": "fp8_delayed", "fp8_wgrad": False}, r"precision\.fp8_wgrad"),
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
    import json, sys, torch
    from train.precision.delayed_scaling import DelayedScalingRecipe, DelayedScalingState
    rank, init_file = int(sys.argv[1]), sys.argv[2]
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    state = DelayedScalingState(DelayedScalingRecipe(amax_history_len=2), [torch.float8_e4m3fn, torch.float8_e5m2],
                                torch.device("cpu"))
    state.quantize(torch.tensor([1.0 + rank]), 0)  # the ranks see different amaxes
    state.quantize(torch.tensor([4.0 if rank == 0 else 0.0]), 1)
    stats = state.step()
    print(json.dumps([state.scale.tolist(), state.amax_history.tolist(), float(stats["fp8_saturated_frac"])]))
    torch.distributed.destroy_process_group()
""")


def test_amax_is_reduced_over_data_parallel_ranks(tmp_path, project_root):
    env = {**os.environ, "PYTHONPATH": str(project_root)}
    procs = [subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(rank), str(tmp_path / "init")], env=env,
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

