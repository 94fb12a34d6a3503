"""torchrun worker: adapters on the megatron-core engine at a tensor / context / pipeline-parallel
layout equal the native engine's (PEFT), through the one assembly and the real train step.

`worker.py OUT BASE TENSOR MODES [CONTEXT [PIPELINE]]`; a mode is "plain" or "sp" (sequence
parallelism), with "+dora" (DoRA instead of LoRA) or "+bf16" (bf16, the frozen linears cast). Every
rank assembles the same adapter stage twice from the same native base checkpoint: on megatron-core
at the launched layout and on the native engine (PEFT's layers, in-process, no process group). Both
train the same batches; each rank writes, per mode, the largest relative differences it sees
(losses, adapter gradients and weights joined over the tensor-parallel ranks under PEFT's names; a
pipeline stage compares its own), whether the frozen base stayed bit-identical, whether a run
resumed from an adapter checkpoint repeats the uninterrupted losses exactly, and whether that
checkpoint, read as a native adapter run (`load_adapted_model`: what `train.convert --adapters /
--merge` and the stage hand-off read), holds exactly the adapters megatron trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipelines.training import special_tokens as st
from data_pipelines.training.packing import collate_rows
from train.checkpoint.files import write_run_config
from train.checkpoint.store import Checkpointer
from train.config.schema import (
    Config,
    InitConfig,
    LanguageModelConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PeftConfig,
    TrainableConfig,
    TrainerConfig,
    to_dict,
)
from train.engines import resolve_engine
from train.engines.assembly import assemble, load_adapted_model
from train.engines.mcore import weights
from train.engines.native.adapters import is_adapter_param
from train.loop.train_module import TrainModule
from train.parallel.distributed import DistInfo
from tests.unit.test_train_module import sample

# Every role's linear at TP=2 (KV groups, Mamba groups and heads split in two); two layers per stage at PP=2.
LM = LanguageModelConfig(pattern="M*-M", hidden_size=32, vocab_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
                         chunk_size=8, mlp_hidden_size=48)
ROLES = ["attention_qkv", "attention_output", "mlp_up", "mlp_down", "mamba_in_proj", "mamba_out_proj"]
SPECIAL = {st.IMG_CONTEXT: 10}
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def config(base: str, impl: str, tensor: int = 1, sequence_parallel: bool = False, method: str = "lora",
           context: int = 1, pipeline: int = 1) -> Config:
    model = ModelConfig(language_model=LM)
    model.impl = impl
    # The language model alone trains (Stage 3's parts): the batches are text, the projector would see none.
    return Config(stage="t", model=model, init=InitConfig(from_checkpoint=base),
                  trainable=TrainableConfig(projector=False),
                  peft=PeftConfig(method=method, rank=4, alpha=8.0, targets=ROLES),
                  parallel=ParallelConfig(tensor_parallel=tensor, context_parallel=context,
                                          pipeline_parallel=pipeline, sequence_parallel=sequence_parallel),
                  # A large eps: Adam's first steps would otherwise turn float noise in near-zero
                  # gradients (B starts at zero) into whole-lr steps of either sign.
                  optim=OptimConfig(lr=1e-2, eps=1e-3, warmup_steps=0, schedule="constant", clip_grad=1.0),
                  trainer=TrainerConfig(max_steps=10, device="cpu"))


def batches():
    return [[collate_rows([[sample(14, i, 3), sample(18, i + 7, 2)]], 32, 3)] for i in range(4)]


def train(stage, cfg: Config, info: DistInfo, steps: range) -> list[float]:
    module = TrainModule(stage.forward_module, stage.optimizer, cfg, info, stage.precision,
                         stage.engine.step_schedule(stage.forward_module, info, stage.precision))
    data = batches()
    return [module.train_step(data[step % len(data)], step).loss for step in steps]


def mcore_adapters(stage, what: str = "data") -> dict[str, torch.Tensor]:
    """The language model's adapter tensors (or their gradients), whole, under PEFT's native names."""
    lm = stage.model.language_model
    local = {n: getattr(p, what) for n, p in lm.model.named_parameters() if ".lora_" in n}
    return {"language_model." + weights.adapter_native_name(n, lm.cfg): t for n, t in lm.gather_local(local).items()}


def native_adapters(model, what: str = "data") -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors (or gradients) of a native model's language model."""
    return {n: getattr(p, what).detach().clone() for n, p in model.named_parameters()
            if is_adapter_param(n) and n.startswith("language_model.")}


def relative(got: dict, expected: dict) -> float:
    """Over the tensors `got` holds: all of `expected`'s, or a pipeline stage's share of them."""
    assert got and set(got) <= set(expected), sorted(set(got) - set(expected))[:4]
    return max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max().clamp(min=1e-12)) for k in got)


def frozen(stage) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in stage.model.named_parameters() if not p.requires_grad}


def check_mode(base: str, out: Path, mode: str, info: DistInfo, layout_sizes: tuple[int, int, int]) -> dict:
    tensor, context, pipeline = layout_sizes
    layout, *options = mode.split("+")
    method = "dora" if "dora" in options else "lora"
    cfg = config(base, "mcore", tensor, layout == "sp", method, context, pipeline)
    native_cfg = config(base, "native", method=method)
    if "bf16" in options:  # the frozen linears cast to bf16 (peft.base_dtype=compute), the adapters fp32
        cfg.precision.name = native_cfg.precision.name = "bf16"
    resolve_engine("mcore").validate(cfg)
    stage = assemble(cfg, info, SPECIAL)
    native = assemble(native_cfg, CPU, SPECIAL)
    result = {"fingerprint": stage.adapters["base_fingerprint"] == native.adapters["base_fingerprint"],
              "modules": sorted(stage.adapters["modules"]) == sorted(native.adapters["modules"]),
              "init": relative(mcore_adapters(stage), native_adapters(native.model)),
              # This pipeline stage's adapter tensors, of the native model's.
              "tensors": [len(mcore_adapters(stage)), len(native_adapters(native.model))],
              "dtypes": sorted({str(p.dtype) for n, p in stage.model.language_model.named_parameters()
                                if n.endswith(("linear_qkv.weight", "linear_fc2.weight", "in_proj.weight"))
                                or ".lora_" in n})}
    base_before = frozen(stage)
    losses = train(stage, cfg, info, range(3))
    expected = train(native, native_cfg, CPU, range(3))
    result["loss"] = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
    result["grads"] = relative(mcore_adapters(stage, "grad"), native_adapters(native.model, "grad"))
    result["adapters"] = relative(mcore_adapters(stage), native_adapters(native.model))
    result["trained"] = float(max(t.abs().max() for n, t in mcore_adapters(stage).items() if ".lora_B." in n))
    after = frozen(stage)
    result["base_identical"] = base_before.keys() == after.keys() and all(
        torch.equal(base_before[k], after[k]) for k in after)

    # Resume: an adapter checkpoint at step 3, then two more steps either way.
    run_dir = out / f"run_{mode}"
    root = run_dir / "checkpoints"
    Checkpointer(root, 1, layout=stage.layout, marker={"adapters": stage.adapters}).save(
        3, stage.model, stage.optimizer, {"step": 3})
    saved = mcore_adapters(stage)
    uninterrupted = train(stage, cfg, info, range(3, 5))
    resumed = assemble(cfg, info, SPECIAL, resume_from=root)
    result["resumed"] = resumed.resumed is not None and train(resumed, cfg, info, range(3, 5)) == uninterrupted
    # Read as a native adapter run (export, stage hand-off): PEFT's layers on the native base.
    if info.rank == 0:
        write_run_config(run_dir, to_dict(cfg))
    dist.barrier()
    _, adapted, _ = load_adapted_model(root / "step_0000003", log=lambda _: None)
    result["read_as_native"] = relative(saved, native_adapters(adapted))
    return result


def main(out: str, base: str, tensor: int, modes: list[str], context: int = 1, pipeline: int = 1) -> None:
    cfg = config(base, "mcore", tensor, context=context, pipeline=pipeline)
    info = resolve_engine("mcore").init_distributed(cfg)
    results = {mode: check_mode(base, Path(out), mode, info, (tensor, context, pipeline)) for mode in modes}
    with open(f"{out}/result.{info.rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(","), *map(int, sys.argv[5:7]))
