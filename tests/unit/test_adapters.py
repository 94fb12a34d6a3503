"""LoRA / DoRA adapters (`peft`) on the native engine, through the one assembly: only adapter tensors
train, the base stays bit-identical, checkpoints hold the adapters and resume exactly, and a changed
base is refused."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.packing import collate_rows
from train.checkpoint.files import find_latest
from train.checkpoint.layout import NativeLayout
from train.checkpoint.store import Checkpointer
from train.config.schema import (
    Config,
    ConfigError,
    InitConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    TrainerConfig,
)
from train.engines.assembly import assemble
from train.engines.native.adapters import is_adapter_param
from train.hf.conversion import write_native
from train.loop.train_module import TrainModule
from train.model.vlm import VisionLanguageModel
from train.parallel.distributed import DistInfo
from tests.unit.test_train_module import LM, sample

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
SPECIAL = {st.IMG_CONTEXT: 10}
ALL_LM_ROLES = ["attention_qkv", "attention_output", "mlp_up", "mlp_down", "mamba_in_proj", "mamba_out_proj"]
# PEFT refuses adapters on a Mamba out_proj of a transformers model (its kernel path bypasses them).
EXPORTABLE_ROLES = ALL_LM_ROLES[:-1]


def write_base(dst: Path, seed: int) -> Path:
    """A native model-only checkpoint of the tiny model drawn from `seed`: the base adapters train on."""
    cfg = ModelConfig(language_model=LM)
    model = VisionLanguageModel(cfg, image_token_id=10)
    model.reset_parameters(seed)
    return write_native(dst, cfg, model.state_dict())


def adapter_config(base: Path, method: str = "lora", targets: list[str] = ALL_LM_ROLES) -> Config:
    return Config(stage="t", model=ModelConfig(language_model=LM), init=InitConfig(from_checkpoint=str(base)),
                  peft=PeftConfig(method=method, rank=4, alpha=8.0, targets=targets),
                  optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", clip_grad=0.0),
                  trainer=TrainerConfig(max_steps=10, device="cpu"))


def batches():
    return [[collate_rows([[sample(24, i, 3)]], 32, 3)] for i in range(4)]


def train(assembled, cfg: Config, steps: range) -> list[float]:
    module = TrainModule(assembled.forward_module, assembled.optimizer, cfg, CPU, assembled.precision)
    data = batches()
    return [module.train_step(data[step % len(data)], step).loss for step in steps]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base") / "run", seed=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_alone_and_the_base_stays_bit_identical(base, method):
    cfg = adapter_config(base, method)
    stage = assemble(cfg, CPU, SPECIAL)
    before = copy.deepcopy(stage.model.state_dict())
    trainable = {n for n, p in stage.model.named_parameters() if p.requires_grad}
    # The language model trains its adapters only; the projector (trainable, no adapters) trains whole.
    assert trainable and all(is_adapter_param(n) or n.startswith("projector.") for n in trainable)
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in trainable)
    losses = train(stage, cfg, range(8))
    assert losses[-1] < losses[0] - 0.05, losses
    after = stage.model.state_dict()
    lm_base = [k for k in before if k.startswith("language_model.") and not is_adapter_param(k)]
    assert len(lm_base) >= 15 and all(torch.equal(before[k], after[k]) for k in lm_base)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_model."))
    assert any(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)


def test_adapter_checkpoint_is_small_and_resumes_exactly(base, tmp_path):
    cfg = adapter_config(base)
    cfg.trainable.projector = False  # Stage 3's parts: the language model alone (its adapters)
    stage = assemble(cfg, CPU, SPECIAL)
    train(stage, cfg, range(3))
    root = tmp_path / "checkpoints"
    Checkpointer(root, 1, layout=stage.layout, marker={"adapters": stage.adapters}).save(
        3, stage.model, stage.optimizer, {"step": 3})
    Checkpointer(tmp_path / "full", 1, layout=NativeLayout()).save(3, stage.model, stage.optimizer, {"step": 3})
    size = {name: sum(f.stat().st_size for f in (tmp_path / name / "step_0000003").glob("*.distcp"))
            for name in ("checkpoints", "full")}
    # Adapters and their two Adam moments against the model's weights alone (rank 4 of a 32-wide toy
    # model is a large share of it; on the 12B, rank 16 is under 1%: `train.plan`).
    assert size["checkpoints"] < size["full"] / 3, size
    uninterrupted = train(stage, cfg, range(3, 6))

    resumed = assemble(cfg, CPU, SPECIAL, resume_from=root)
    assert resumed.resumed is not None and resumed.resumed[0] == find_latest(root)
    assert train(resumed, cfg, range(3, 6)) == uninterrupted


def test_resume_refuses_another_base(base, tmp_path):
    cfg = adapter_config(base)
    stage = assemble(cfg, CPU, SPECIAL)
    root = tmp_path / "checkpoints"
    Checkpointer(root, 1, layout=stage.layout, marker={"adapters": stage.adapters}).save(
        0, stage.model, stage.optimizer, {"step": 0})
    other = adapter_config(write_base(tmp_path / "other_base", seed=1))
    with pytest.raises(ConfigError, match="adapters trained on another base"):
        assemble(other, CPU, SPECIAL, resume_from=root)


def test_frozen_language_model_takes_no_adapters_and_the_projector_role_adapts_it(base):
    cfg = adapter_config(base, targets=["attention_qkv", "projector"])
    cfg.trainable.language_model = False
    stage = assemble(cfg, CPU, SPECIAL)
    trainable = [n for n, p in stage.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("projector.") and is_adapter_param(n) for n in trainable)
    assert stage.adapters["modules"] == ["projector.mlp1.1", "projector.mlp1.3"]


def test_config_rules():
    with pytest.raises(ConfigError, match="peft.targets"):
        PeftConfig(method="lora", targets=["qkv"]).validate("peft")
    with pytest.raises(ConfigError, match="peft.rank"):
        PeftConfig(method="lora", rank=0).validate("peft")
    from train.engines.mcore import rules
    from train.engines.native import ENGINE

    cfg = Config(stage="t", peft=PeftConfig(method="lora"))
    cfg.model.impl = "mcore"
    rules.validate(cfg)  # LoRA on megatron-core: tests/integration/test_mcore_adapters.py
    bad = Config(stage="t", peft=PeftConfig(method="dora", dropout=0.1))
    bad.model.impl = "mcore"
    with pytest.raises(ConfigError, match="peft.dropout=0"):
        rules.validate(bad)
    cfg.model.impl, cfg.parallel.data_parallel = "native", "fsdp"
    ENGINE.validate(cfg)  # FSDP2 with adapters: tests/integration/test_data_parallel.py


@pytest.fixture(scope="module")
def trained_lm_adapters(tmp_path_factory):
    """A language-model base imported from a transformers NemotronH directory, LoRA on every role PEFT
    can load on it trained 4 steps and checkpointed as a run: (run dir, the adapted native model, tmp dir)."""
    from tests.unit.test_hf_convert import saved_hf_lm
    from train.checkpoint.files import read_run_config, write_run_config
    from train.config.schema import RunConfig, TrainableConfig, to_dict
    from train.hf.conversion import hf_to_native

    tmp = tmp_path_factory.mktemp("lm_adapters")
    hf_to_native(saved_hf_lm(tmp / "hf"), tmp / "native")
    run_dir = tmp / "run"
    cfg = Config(stage="t", run=RunConfig(dir=str(run_dir)), model=read_run_config(tmp / "native").model,
                 init=InitConfig(from_checkpoint=str(tmp / "native"), allow_random=["vision_model", "projector"]),
                 trainable=TrainableConfig(language_model=True, projector=False),
                 peft=PeftConfig(method="lora", rank=4, alpha=8.0, targets=EXPORTABLE_ROLES),
                 optim=OptimConfig(lr=2e-2, warmup_steps=0, schedule="constant", clip_grad=0.0),
                 trainer=TrainerConfig(max_steps=4, device="cpu"))
    stage = assemble(cfg, CPU, SPECIAL)
    train(stage, cfg, range(4))
    run_dir.mkdir()
    write_run_config(run_dir, to_dict(cfg))
    Checkpointer(run_dir / "checkpoints", 1, layout=stage.layout, marker={"adapters": stage.adapters}).save(
        4, stage.model, stage.optimizer, {"step": 4})
    return run_dir, stage.model.eval(), tmp


def test_export_adapters_load_in_peft_on_the_exported_base_and_merge_equals_the_adapted_model(trained_lm_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train import convert
    from train.api import load_language_model

    run_dir, adapted, tmp = trained_lm_adapters
    ids = torch.randint(12, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = adapted.language_model(ids)  # (B, L, V), adapters unmerged
        base_logits = load_language_model(tmp / "native")(ids)
    assert float((ours - base_logits).norm() / ours.norm()) > 1e-3  # the adapters changed the model

    # A bare export of an adapter checkpoint is refused: it holds no base.
    assert convert.main(["native-to-hf", "--src", str(run_dir), "--dst", str(tmp / "bare"), "--weights-only"]) == 2

    out = tmp / "exported"
    assert convert.main(["native-to-hf", "--src", str(run_dir), "--dst", str(out), "--adapters", "--weights-only"]) == 0
    files = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), out / "adapter").eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, use_cache=False).logits
    assert float((theirs - ours).norm() / ours.norm()) < 1e-4

    merged = tmp / "merged"
    assert convert.main(["native-to-hf", "--src", str(run_dir), "--dst", str(merged), "--merge", "--weights-only"]) == 0
    with torch.no_grad():
        from_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids, use_cache=False).logits
        # Stage hand-off: the next stage starts from the merged weights (`init.from_checkpoint` of an HF
        # directory, converted as a stage converts it) and computes the adapted model.
        next_stage = load_language_model(merged)(ids)
    assert float((from_merged - ours).norm() / ours.norm()) < 1e-4
    assert float((next_stage - ours).norm() / ours.norm()) < 1e-5


def test_next_stage_starts_from_the_adapted_model(trained_lm_adapters):
    """Stage hand-off: `init.from_checkpoint` naming an adapter run's checkpoint merges its adapters
    into its base; the next stage (full fine-tuning here, or adapters again) computes the adapted model."""
    from train.checkpoint.files import read_run_config

    run_dir, adapted, _ = trained_lm_adapters
    cfg = read_run_config(run_dir)
    cfg.init.from_checkpoint, cfg.peft = str(run_dir), PeftConfig()
    ids = torch.randint(12, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    stage = assemble(cfg, CPU, SPECIAL)
    with torch.no_grad():
        ours, theirs = adapted.language_model(ids), stage.model.language_model(ids)
    assert float((theirs - ours).norm() / ours.norm()) < 1e-5


def test_chat_evaluation_and_the_api_load_an_adapter_checkpoint_merged(trained_lm_adapters):
    """chat and `train.evaluate --generation` (the assembly with `weights_from`), lm-eval's export and
    `train.api.load_language_model` take an adapter run's checkpoint: its base with the adapters merged."""
    from train.api import load_language_model
    from train.checkpoint.files import read_run_config
    from train.evaluate.harness import merged_if_adapters

    run_dir, adapted, _ = trained_lm_adapters
    checkpoint = find_latest(run_dir / "checkpoints")
    ids = torch.randint(12, 64, (2, 13), generator=torch.Generator().manual_seed(2))
    chat = assemble(read_run_config(run_dir), CPU, SPECIAL, train=False, weights_from=checkpoint)
    assert chat.adapters is None and not any(is_adapter_param(n) for n, _ in chat.model.named_parameters())
    with torch.no_grad():
        ours = adapted.language_model(ids)
        for theirs in (chat.model.language_model(ids), load_language_model(run_dir)(ids)):
            assert float((theirs - ours).norm() / ours.norm()) < 1e-5
    _, merged, _ = merged_if_adapters(checkpoint)
    assert torch.equal(merged["language_model.backbone.layers.1.mixer.up_proj.weight"],
                       chat.model.state_dict()["language_model.backbone.layers.1.mixer.up_proj.weight"])


def test_carried_adapters_train_on_over_the_same_base_and_export_as_one_adapter(trained_lm_adapters, tmp_path):
    """peft.handoff=carry: the next stage keeps the previous stage's base (same fingerprint, nothing
    merged) and starts from its adapters, trains them on, and exports as one PEFT adapter over that
    base; another rank is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train import convert
    from train.checkpoint.files import read_marker, read_run_config, write_run_config
    from train.config.schema import to_dict
    from train.engines.native.adapters import adapter_state

    run_dir, adapted, _ = trained_lm_adapters
    cfg = read_run_config(run_dir)
    cfg.init.from_checkpoint, cfg.peft.handoff, cfg.run.dir = str(run_dir), "carry", str(tmp_path / "next")
    stage = assemble(cfg, CPU, SPECIAL)
    before = read_marker(find_latest(run_dir / "checkpoints"))["adapters"]
    assert stage.adapters["base_fingerprint"] == before["base_fingerprint"]  # the base, not a merged model
    carried = {k: v.clone() for k, v in adapter_state(stage.model).items()}
    previous = adapter_state(adapted)
    assert carried.keys() == previous.keys() and all(torch.equal(carried[k], previous[k]) for k in carried)
    ids = torch.randint(12, 64, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(stage.model.language_model(ids), adapted.language_model(ids), rtol=1e-5, atol=1e-6)

    train(stage, cfg, range(2))  # trained on: the adapters move on from where they were
    trained = adapter_state(stage.model)
    assert any(not torch.equal(trained[k], carried[k]) for k in carried)
    next_dir = tmp_path / "next"
    next_dir.mkdir()
    write_run_config(next_dir, to_dict(cfg))
    Checkpointer(next_dir / "checkpoints", 1, layout=stage.layout, marker={"adapters": stage.adapters}).save(
        2, stage.model, stage.optimizer, {"step": 2})
    out = tmp_path / "exported"
    assert convert.main(["native-to-hf", "--src", str(next_dir), "--dst", str(out), "--adapters", "--weights-only"]) == 0
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), out / "adapter").eval()
    with torch.no_grad():
        ours, theirs = stage.model.eval().language_model(ids), hf(input_ids=ids, use_cache=False).logits
    assert float((theirs - ours).norm() / ours.norm()) < 1e-4

    cfg.peft.rank = 8
    with pytest.raises(ConfigError, match="peft.rank=8 here, 4 there"):
        assemble(cfg, CPU, SPECIAL)


def test_export_refuses_another_base(trained_lm_adapters, tmp_path, capsys):
    from train import convert

    from train.hf.conversion import read_native

    run_dir, _, tmp = trained_lm_adapters
    cfg, state, _ = read_native(tmp / "native")
    state["language_model.backbone.layers.1.mixer.up_proj.weight"][0, 0] += 1e-3  # the same size, retrained
    other = write_native(tmp_path / "other", cfg.model, state)
    code = convert.main(["native-to-hf", "--src", str(run_dir), "--dst", str(tmp_path / "x"), "--merge",
                         "--base", str(other), "--weights-only"])
    assert code == 2
    assert "fingerprint" in capsys.readouterr().err


def test_plan_counts_the_adapters_peft_builds_and_fits_the_12b_stage1_on_one_gpu():
    from train.engines.native.adapters import apply_adapters
    from train.plan.estimate import ONE_GPU_GIB, format_plan, load_plan_config, make_plan

    tiny = load_plan_config("stage1_image_sft", ["smoke=cpu", "peft=dora", "peft.targets=[attention_qkv,mlp_up,mamba_in_proj,projector]"])
    plan = make_plan(tiny, "stage1_image_sft")
    model = VisionLanguageModel(tiny.model, image_token_id=10)
    apply_adapters(model, tiny.peft, tiny.trainable, seed=0)
    built = sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))
    assert plan["peft"]["adapter_params"] == built
    # Stage 1 trains the language model (adapted) and the projector (adapted here too): nothing whole.
    assert plan["params"]["trainable"] == built

    big = load_plan_config("stage1_image_sft", ["peft=lora", "parallel=single", "model.impl=native"])
    plan = make_plan(big, "stage1_image_sft")
    assert big.data.seq_length == 16384 and big.model.kernels.activation_checkpointing == "layers"
    assert plan["memory_gib"]["total"] < ONE_GPU_GIB
    assert plan["memory_gib"]["optimizer"] < 4  # full fine-tuning: ~140 GiB of Adam state
    assert plan["longest_context_one_gpu"]["tokens"] >= 16384
    assert "longest context on one GPU" in format_plan(plan)
    # The recipe's own layout (megatron-core, TP=4): each GPU holds a quarter of the language model.
    split = make_plan(load_plan_config("stage1_image_sft", ["peft=lora"]), "stage1_image_sft")
    assert split["layout"]["impl"] == "mcore" and split["layout"]["tensor"] == 4
    assert split["peft"]["adapter_params"] == plan["peft"]["adapter_params"]
    assert plan["memory_gib"]["weights"] / 4 < split["memory_gib"]["weights"] < plan["memory_gib"]["weights"] / 2
    assert "longest_context_one_gpu" not in split


def test_bf16_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(base):
    from train.config.schema import PrecisionConfig

    cfg = adapter_config(base)
    cfg.precision = PrecisionConfig(name="bf16")
    stage = assemble(cfg, CPU, SPECIAL)
    params = dict(stage.model.named_parameters())
    base_linear = params["language_model.backbone.layers.2.mixer.up_proj.base_layer.weight"]
    assert base_linear.dtype == torch.bfloat16 and not base_linear.requires_grad
    assert params["language_model.backbone.layers.2.mixer.up_proj.lora_A.default.weight"].dtype == torch.float32
    assert params["language_model.backbone.embeddings.weight"].dtype == torch.float32  # not a linear: kept
    before = {k: v.clone() for k, v in stage.model.state_dict().items() if not is_adapter_param(k)}
    losses = train(stage, cfg, range(4))
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    after = stage.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("projector."))


def test_a_stage_whose_trainable_parts_hold_no_target_trains_them_whole(base):
    """Stage 0 of a `peft=lora` pipeline: the language model is frozen, the projector not targeted."""
    cfg = adapter_config(base, targets=["attention_qkv"])
    cfg.trainable.language_model = False
    stage = assemble(cfg, CPU, SPECIAL, log=lambda message: None)
    assert stage.adapters is None and not any(is_adapter_param(n) for n, _ in stage.model.named_parameters())
    trainable = {n for n, p in stage.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in stage.model.named_parameters() if n.startswith("projector.")}


def test_the_smoke_language_model_is_pre_trained_without_adapters():
    """`peft=lora` on a smoke pipeline is for its stages: the embedded LM Stage 0 starts from (cached
    under a key without peft) is trained whole, so its checkpoint holds plain linears."""
    from train.loop.embedded_lm import pretraining_config

    cfg = Config(stage="t", peft=PeftConfig(method="lora"))
    cfg.data.synth_dir = "runs/synth_data"
    assert not pretraining_config(cfg).peft.enabled and cfg.peft.enabled
