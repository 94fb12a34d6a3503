"""`python -m train.plan`: exact parameter counts of real recipes, memory arithmetic, no data needed."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from train.plan import __main__ as plan
from train.config.schema import ConfigError
from train.plan import estimate

GIB = 2**30
# The published Nemotron Nano 12B v2 language model, written out here (not read from our yaml).
NANO_12B = dict(
    hybrid_override_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    hidden_size=5120, vocab_size=131072, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    mamba_num_heads=128, mamba_head_dim=80, ssm_state_size=128, n_groups=8, conv_kernel=4, intermediate_size=20480,
)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan1")
    # The recipe's data lives on a cluster; plan must not look for it. One GPU, native engine: the
    # whole model's arithmetic (the recipe's own layout is tested below).
    assert plan.main(["--config-name", "stage1_image_sft", "--out", str(out), "parallel=single",
                      "data.sources=[{name:x,path:/nonexistent/shards,weight:1.0}]"]) == 0
    return json.loads((out / "plan.json").read_text())


def test_stage1_language_model_params_equal_transformers_12b(stage1):
    with torch.device("meta"):
        hf = NemotronHForCausalLM(NemotronHConfig(**NANO_12B))
    assert stage1["params"]["language_model"] == sum(p.numel() for p in hf.parameters()) == 12_310_001_152


def test_stage1_vision_and_projector_params_equal_the_published_shapes(stage1):
    from transformers import RadioConfig, RadioModel

    with torch.device("meta"):
        radio = RadioModel(RadioConfig())  # transformers' defaults are C-RADIOv2-H (ViT-H/16)
    assert stage1["params"]["vision_model"] == sum(p.numel() for p in radio.parameters()) == 651_727_360
    # Projector: RMSNorm(4 * 1280) -> Linear(5120, 20480) -> squared ReLU -> Linear(20480, 5120).
    assert stage1["params"]["projector"] == 5120 + 5120 * 20480 + 20480 * 5120 == 209_720_320


def test_stage1_totals_and_memory_arithmetic(stage1):
    p, mem = stage1["params"], stage1["memory_gib"]
    assert p["total"] == p["language_model"] + p["vision_model"] + p["projector"]
    assert stage1["trainable_parts"] == {"language_model": True, "vision_model": False, "projector": True}
    assert p["trainable"] == p["language_model"] + p["projector"]
    # bf16 recipe: 2 B weights for every parameter; 4 B gradients and 12 B fp32 master + Adam per trainable one.
    assert mem["weights"] == pytest.approx(2 * p["total"] / GIB)
    assert mem["gradients"] == pytest.approx(4 * p["trainable"] / GIB)
    assert mem["optimizer"] == pytest.approx(12 * p["trainable"] / GIB)
    assert mem["total"] == pytest.approx(mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"])
    acts = stage1["activations_gib"]
    assert acts["vision_model"] == 0  # frozen ViT: no graph, nothing stored
    assert acts["projector"] > 0 and set(acts["language_model"]) >= {"mamba", "attention", "mlp", "head_and_loss"}
    assert mem["activations"] == pytest.approx(sum(acts["language_model"].values()) + acts["projector"])
    assert stage1["assumptions"]["tokens_per_micro_batch"] == 16384


def test_projector_only_stage_and_activation_scaling(tmp_path):
    cfg = estimate.load_plan_config("stage0_projector_warmup", [])
    result = estimate.make_plan(cfg, "stage0_projector_warmup")
    assert result["params"]["trainable"] == result["params"]["projector"]
    longer = estimate.make_plan(estimate.load_plan_config("stage0_projector_warmup", ["data.seq_length=32768"]), "x")
    for kind in ("mamba", "attention", "mlp"):
        ratio = longer["activations_gib"]["language_model"][kind] / result["activations_gib"]["language_model"][kind]
        assert ratio == pytest.approx(2.0)
    # Without layer checkpointing every layer keeps its full set of tensors: far more memory.
    full = estimate.make_plan(estimate.load_plan_config("stage0_projector_warmup", ["model.kernels.activation_checkpointing=none"]), "x")
    assert full["memory_gib"]["activations"] > 3 * result["memory_gib"]["activations"]


def test_plan_cli_writes_to_run_dir_and_reports_config_errors(tmp_path, capsys):
    assert plan.main(["--config-name", "stage3_text_recovery", f"run.dir={tmp_path}/run", "model=tiny"]) == 0
    written = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert written["model"] == "tiny" and written["params"]["language_model"] > 0
    assert "language_model" in capsys.readouterr().out
    assert plan.main(["--config-name", "stage1_image_sft", "model.vision.patch_size=7"]) == 2
    assert "model.vision.image_size" in capsys.readouterr().err


def test_plan_lists_the_fp8_region(tmp_path):
    assert plan.main(["--config-name", "stage1_image_sft", "--out", str(tmp_path), "precision=fp8_delayed_emulated"]) == 0
    names = json.loads((tmp_path / "plan.json").read_text())["fp8_modules"]
    assert names and all(n.startswith("language_model.backbone.layers.") for n in names)
    layers = {int(n.split(".")[3]) for n in names}
    assert 0 not in layers and 61 not in layers  # first and last layer kept in BF16
    assert plan.main(["--config-name", "stage1_image_sft", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["fp8_modules"] == []


def test_12b_recipes_fit_80gb_gpus_with_their_layouts(tmp_path):
    """Stages 1, 2 and 4 name megatron-core layouts that fit 80 GB GPUs; Stage 4 at 311,296 tokens
    only with its context parallelism: on one GPU it stays far above."""
    for recipe in ("stage1_image_sft", "stage2_video_sft", "stage4_long_context"):
        cfg = estimate.load_plan_config(recipe, [])
        assert cfg.model.impl == "mcore" and cfg.parallel.tensor_parallel > 1
        result = estimate.make_plan(cfg, recipe)
        assert result["memory_gib"]["total"] <= 80, (recipe, result["memory_gib"])
    long = estimate.make_plan(estimate.load_plan_config("stage4_long_context", []), "s4")
    assert long["layout"]["context"] == 4 and long["layout"]["world_size"] == 32
    assert long["assumptions"]["tokens_per_micro_batch"] == 311296
    single = estimate.make_plan(estimate.load_plan_config("stage4_long_context", ["parallel=single"]), "s4")
    assert single["layout"]["world_size"] == 1 and single["memory_gib"]["total"] > 5 * long["memory_gib"]["total"]


def test_plan_follows_the_layout_and_world_size():
    cfg = estimate.load_plan_config("stage1_image_sft", ["parallel.distributed_optimizer=true"])
    one_replica = estimate.make_plan(cfg, "s1")
    two_replicas = estimate.make_plan(cfg, "s1", world_size=8)
    assert two_replicas["layout"]["data"] == 2
    # The distributed optimizer halves the optimizer state over 2 replicas; the rest is per GPU.
    assert abs(two_replicas["memory_gib"]["optimizer"] * 2 - one_replica["memory_gib"]["optimizer"]) < 1e-6
    assert two_replicas["memory_gib"]["weights"] == one_replica["memory_gib"]["weights"]
    with pytest.raises(ConfigError, match="world-size"):
        estimate.make_plan(cfg, "s1", world_size=6)


def test_measure_runs_real_steps_beside_the_estimate(tmp_path, capsys):
    from train.plan import __main__ as plan_cli

    assert plan_cli.main(["--config-name", "stage3_text_recovery", "--out", str(tmp_path), "--measure", "smoke=cpu",
                          "data.seq_length=512"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "plan.json").read_text())
    measured = saved["measured"]
    assert measured["device"] == "cpu" and measured["tokens_per_step"] == 2 * 512  # micro_batch_size x seq_length
    assert measured["step_seconds"] > 0 and measured["tokens_per_second"] == pytest.approx(1024 / measured["step_seconds"])
    assert measured["peak_memory_gib"] > saved["memory_gib"]["weights"]  # the process holds at least the weights
    assert "s/step" in printed and "estimated" in printed
