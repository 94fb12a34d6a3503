from __future__ import annotations

import sys

import pytest

from train.config.compose import list_recipes, load_config
from train.config.schema import ConfigError

RECIPES = ["stage0_projector_warmup", "stage1_image_sft", "stage2_video_sft", "stage3_text_recovery",
           "stage4_long_context"]


def test_all_five_recipes_exist():
    assert list_recipes() == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("smoke", ["cpu", "gpu"])
def test_every_recipe_composes_with_smoke(recipe, smoke):
    cfg = load_config(recipe, [f"smoke={smoke}"])
    assert cfg.stage == recipe
    assert cfg.model.name == "tiny"
    assert cfg.data.synth_dir and all("synth" in s.path for s in cfg.data.sources)
    assert cfg.precision.name == ("fp32" if smoke == "cpu" else "bf16")


@pytest.mark.parametrize("recipe", RECIPES)
def test_real_recipe_without_data_names_the_missing_path(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HVL_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.path"):
        load_config(recipe)


def test_real_recipes_carry_published_settings(tmp_path, monkeypatch):
    from train.config.compose import compose_raw

    raw = {r: compose_raw(r) for r in RECIPES}
    assert [raw[r]["data"]["seq_length"] for r in RECIPES] == [16384, 16384, 49152, 49152, 311296]
    lm = raw["stage1_image_sft"]["model"]["language_model"]
    assert len(lm["pattern"]) == 62
    assert (lm["pattern"].count("M"), lm["pattern"].count("-"), lm["pattern"].count("*")) == (28, 28, 6)
    assert (lm["hidden_size"], lm["num_attention_heads"], lm["num_key_value_heads"], lm["head_dim"]) == (5120, 40, 8, 128)
    assert (lm["mamba_num_heads"], lm["mamba_head_dim"], lm["ssm_state_size"], lm["n_groups"]) == (128, 80, 128, 8)
    assert lm["mlp_hidden_size"] == 20480
    data2 = raw["stage2_video_sft"]["data"]
    assert (data2["tile_size"], data2["max_tiles"], data2["video_fps"], data2["max_frames"]) == (512, 12, 2.0, 128)
    trainable = {r: raw[r]["trainable"] for r in RECIPES}
    assert trainable["stage0_projector_warmup"] == {"language_model": False, "vision_model": False, "projector": True}
    assert trainable["stage3_text_recovery"] == {"language_model": True, "vision_model": False, "projector": False}
    assert all(raw[r]["optim"]["warmup_steps"] > 0 for r in RECIPES)


def test_nano12b_tokens_per_tile_and_projector_width():
    from train.config.compose import compose_raw
    from train.config.schema import ModelConfig, from_dict

    model = from_dict(ModelConfig, compose_raw("stage1_image_sft")["model"])
    assert model.vision.patches_per_side ** 2 == 1024
    assert model.tokens_per_tile == 256


@pytest.mark.parametrize("override, field", [
    ("+model.language_model.nonsense=3", "model.language_model.nonsense"),
    ("optim.lr=-1", "optim.lr"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("model.language_model.pattern=MX", "model.language_model.pattern"),
    ("optim.schedule=linear", "optim.schedule"),
    ("trainer.micro_batch_size=two", "trainer.micro_batch_size"),
    ("data.max_tiles=0", "data.max_tiles"),
    ("model.language_model.vocab_size=10", "model.language_model.vocab_size=10 is too small"),
    ("optim.beta2=1.5", "optim.beta1/beta2"),
])
def test_invalid_override_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("stage1_image_sft", ["smoke=cpu", override])


def test_nonexistent_data_path_fails_before_compute():
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.path.*does not exist"):
        load_config("stage1_image_sft", ["smoke=cpu", "data.synth_dir=null", "data.tokenizer=/",
                                         "data.sources=[{name:mine,path:/no/such/shards,weight:1.0}]"])


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="no recipe named"):
        load_config("stage9")


def test_schema_fields_absent_from_yaml_can_be_overridden():
    cfg = load_config("stage1_image_sft", ["smoke=cpu", "trainer.deterministic=false", "data.loss_on_think=false"])
    assert cfg.trainer.deterministic is False and cfg.data.loss_on_think is False


def test_readme_override_example_composes_on_a_smoke_run():
    # The README's example overrides, as written, on top of smoke=cpu: the smoke schedule's floor is a
    # fraction of lr (min_lr_ratio), so a lower lr moves it along instead of failing min_lr <= lr.
    cfg = load_config("stage1_image_sft", ["smoke=cpu", "trainer.max_steps=100", "optim.lr=1e-5", "seed=3",
                                           "precision=bf16"])
    assert (cfg.seed, cfg.optim.lr, cfg.precision.name) == (3, 1e-5, "bf16")
    assert cfg.optim.floor_lr == pytest.approx(1e-6)
    # An explicit min_lr takes over from the ratio, and must still be <= lr.
    assert load_config("stage1_image_sft", ["smoke=cpu", "optim.min_lr=1e-6"]).optim.floor_lr == 1e-6
    with pytest.raises(ConfigError, match=r"optim\.min_lr=0\.1 must be in \[0, optim\.lr=0\.01\]"):
        load_config("stage1_image_sft", ["smoke=cpu", "optim.lr=1e-2", "optim.min_lr=0.1"])


def test_fp8_on_mcore_is_megatrons_own_with_our_settings():
    """precision=fp8_delayed on model.impl=mcore: checked up front, then mapped field for field onto
    megatron's config (which runs delayed scaling over the whole hybrid stack)."""
    import torch

    from train.config.compose import load_config
    from train.config.schema import LanguageModelConfig, ParallelConfig, PrecisionConfig
    from train.engines.mcore.model import transformer_config

    base = ["smoke=cpu", "model.impl=mcore", "trainer.device=cuda", "model.kernels.attention=transformer_engine"]
    with pytest.raises(ConfigError, match="set model.kernels.attention=transformer_engine"):
        load_config("stage3_text_recovery", ["smoke=cpu", "model.impl=mcore", "precision=fp8_delayed"])
    with pytest.raises(ConfigError, match="keep_first_last_layers=0"):
        load_config("stage3_text_recovery", [*base, "precision=fp8_delayed"])
    with pytest.raises(ConfigError, match="leave keep_patterns"):
        load_config("stage3_text_recovery", [*base, "precision=fp8_delayed", "precision.keep_first_last_layers=0",
                                             "precision.keep_patterns=[language_model.backbone.embeddings,language_model.lm_head,"
                                             "vision_model,projector,language_model.backbone.layers.0]"])
    with pytest.raises(ConfigError, match="use precision=fp8_delayed"):
        load_config("stage3_text_recovery", ["smoke=cpu", "model.impl=mcore", "precision=fp8_delayed_emulated"])

    ours = PrecisionConfig(name="fp8_delayed", fp8_format="e4m3", margin=2, amax_history_len=16,
                           amax_compute_algo="max", keep_first_last_layers=0)
    config = transformer_config(LanguageModelConfig(pattern="M-M*M-M-"), ParallelConfig(), torch.float32,
                                torch.device("cpu"), ours)
    assert (config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo, config.fp8_wgrad) == ("e4m3", "delayed", 2, 16, "max", True)
    plain = transformer_config(LanguageModelConfig(pattern="M-M*M-M-"), ParallelConfig(), torch.float32,
                               torch.device("cpu"), PrecisionConfig(name="bf16"))
    assert plain.fp8 is None


def test_unknown_plain_override_lists_valid_fields():
    with pytest.raises(ConfigError, match=r"unknown field trainer\.nonsense.*max_steps"):
        load_config("stage1_image_sft", ["smoke=cpu", "trainer.nonsense=1"])


def test_mcore_layouts_are_checked_before_any_compute():
    from train.config.compose import load_config

    base = ["smoke=cpu", "model.impl=mcore"]
    with pytest.raises(ConfigError, match="model.impl=mcore"):
        load_config("stage3_text_recovery", ["smoke=cpu", "parallel.tensor_parallel=2"])  # native engine
    with pytest.raises(ConfigError, match="mamba_num_heads=4 must be a multiple of parallel.tensor_parallel=8"):
        load_config("stage3_text_recovery", [*base, "parallel.tensor_parallel=8"])
    with pytest.raises(ConfigError, match="pipeline_parallel=3 must divide the 8 layers"):
        load_config("stage3_text_recovery", [*base, "parallel.pipeline_parallel=3"])
    assert load_config("stage3_text_recovery", [*base, "parallel.pipeline_parallel=2"]).parallel.pipeline_parallel == 2
    with pytest.raises(ConfigError, match="virtual_pipeline_parallel"):
        load_config("stage3_text_recovery", [*base, "parallel.virtual_pipeline_parallel=2"])
    with pytest.raises(ConfigError, match="sequence_parallel=true splits"):
        load_config("stage3_text_recovery", [*base, "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="equal slices"):
        load_config("stage3_text_recovery", [*base, "parallel.context_parallel=2", "trainer.micro_batch_size=1",
                                             "data.pad_multiple=2", "data.smoke_seq_length=1026"])
    cfg = load_config("stage3_text_recovery", [*base, "parallel.tensor_parallel=2", "parallel.context_parallel=2"])
    assert cfg.model.impl == "mcore" and cfg.parallel.context_parallel == 2


def test_fused_attention_is_checked_against_the_compute_dtype_not_the_precision_name():
    """fp8_delayed_emulated computes in fp32 unless told otherwise: flash-attn cannot run there."""
    from train.config.compose import load_config

    gpu = ["smoke=gpu", "model.kernels.ssd=torch", "model.kernels.conv1d=torch", "model.kernels.gated_norm=torch",
           "model.kernels.rms_norm=torch", "model.kernels.attention=flash_attn"]
    with pytest.raises(ConfigError, match=r"attention=flash_attn .*precision=fp8_delayed_emulated computes in fp32"):
        load_config("stage3_text_recovery", [*gpu, "precision=fp8_delayed_emulated"])
    cfg = load_config("stage3_text_recovery", [*gpu, "precision=fp8_delayed_emulated", "precision.compute_dtype=bf16"])
    assert cfg.precision.resolved_compute_dtype == "bf16"


def test_gpu_kernel_preconditions_are_checked_at_config_time():
    from train.config.compose import load_config

    gpu = ["smoke=gpu", "model.kernels.conv1d=causal_conv1d"]  # + mamba_ssm norms, torch_varlen, bf16
    load_config("stage3_text_recovery", gpu)  # the tiny model meets them
    # 3 heads of 4 channels: z is 12 wide, so the conv input after it would start misaligned.
    with pytest.raises(ConfigError, match="offset \\(mamba_num_heads \\* mamba_head_dim = 12\\) must be a multiple"):
        load_config("stage3_text_recovery", [*gpu, "model.language_model.mamba_num_heads=3",
                                             "model.language_model.mamba_head_dim=4",
                                             "model.language_model.n_groups=1",
                                             "model.language_model.ssm_state_size=14"])
    with pytest.raises(ConfigError, match="groups of at most 16384 channels"):
        load_config("stage3_text_recovery", [*gpu, "model.language_model.mamba_num_heads=256",
                                             "model.language_model.mamba_head_dim=128",
                                             "model.language_model.n_groups=1"])
    with pytest.raises(ConfigError, match="multiples of 16: model.language_model has"):
        load_config("stage3_text_recovery", [*gpu, "precision=fp8_delayed", "model.language_model.hidden_size=72"])


def test_fp8_refuses_modules_that_some_ranks_skip():
    from train.config.compose import load_config

    base = ["smoke=cpu", "precision=fp8_delayed_emulated"]
    load_config("stage1_image_sft", base)  # the default keeps vision and projector in BF16
    with pytest.raises(ConfigError, match=r"keep \['vision_model'\] out of FP8"):
        load_config("stage1_image_sft", [*base, "precision.keep_patterns=[language_model.lm_head,projector]"])


def test_logger_choices_tensorboard_alone_or_beside_wandb():
    default = load_config("stage1_image_sft", [], check_paths=False)  # the recipes' default: wandb offline, no TensorBoard
    assert (default.logger.wandb.mode, default.logger.tensorboard) == ("offline", False)
    alone = load_config("stage1_image_sft", ["logger=tensorboard"], check_paths=False)
    assert (alone.logger.wandb.mode, alone.logger.tensorboard) == ("disabled", True)
    # logger=X on the command line wins over smoke=cpu's logger=none.
    both = load_config("stage1_image_sft", ["smoke=cpu", "logger=wandb_offline", "logger.tensorboard=true",
                                            "logger.wandb.mode=online", "logger.wandb.entity=my-team"])
    assert (both.logger.wandb.mode, both.logger.wandb.entity, both.logger.tensorboard) == ("online", "my-team", True)


def test_a_missing_logger_package_stops_the_run_at_start(tmp_path, monkeypatch, capsys):
    from train.__main__ import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # Python's own mark of a package that cannot import
    run_dir = tmp_path / "run"
    assert main(["--config-name", "stage3_text_recovery", "smoke=cpu", "logger=tensorboard", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "logger.tensorboard=true needs the tensorboard package" in err and "pip install 'tensorboard'" in err
    assert not (run_dir / "config.yaml").exists()  # stopped before the stage began
