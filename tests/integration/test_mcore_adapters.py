"""LoRA and DoRA on the megatron-core engine (`peft=lora|dora`, `model.impl=mcore`) on real processes
(torchrun, gloo): at TP=1, TP=2, TP=2 with sequence parallelism, CP=2 and PP=2 it trains as the native
engine's PEFT layers do (losses, adapter gradients and weights), leaves the base bit-identical,
resumes exactly, and writes adapter checkpoints the native readers (export, stage hand-off) read as
a native run's; under bf16 the frozen linears are bf16 on both engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import run_module
from tests.integration.mcore_adapters_worker import LM
from train.config.schema import ModelConfig
from train.hf.conversion import write_native
from train.model.vlm import VisionLanguageModel

WORKER = str(Path(__file__).with_name("mcore_adapters_worker.py"))


@pytest.mark.parametrize("tensor,context,pipeline,modes", [
    (1, 1, 1, "plain,plain+bf16"), (2, 1, 1, "plain,sp,sp+dora"), (1, 2, 1, "plain+dora"), (1, 1, 2, "plain+dora")])
def test_mcore_adapters_equal_native_adapters(tmp_path, tensor, context, pipeline, modes):
    cfg = ModelConfig(language_model=LM)
    model = VisionLanguageModel(cfg, image_token_id=10)
    model.reset_parameters(0)
    base = write_native(tmp_path / "base", cfg, model.state_dict())
    ranks = tensor * context * pipeline
    result = run_module(["torch.distributed.run", "--nproc-per-node", str(ranks), WORKER, str(tmp_path), str(base),
                         str(tensor), modes, str(context), str(pipeline)], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = [json.loads((tmp_path / f"result.{rank}.json").read_text()) for rank in range(ranks)]
    for mode in modes.split(","):
        # Each rank compared all the adapters, or (pipeline stages) its stage's share of them.
        held = [r[mode]["tensors"][0] for r in results]
        total = results[0][mode]["tensors"][1]
        assert (sum(held) if pipeline > 1 else min(held)) == total, (mode, held, total)
    for got in results:
        assert sorted(got) == sorted(modes.split(","))
        for mode, r in got.items():
            assert r["fingerprint"] and r["modules"], (mode, r)
            # The same adapters at the start: bit for bit (DoRA's magnitude, a row norm, summed over ranks).
            assert r["init"] < (1e-6 if "dora" in mode else 1e-12), (mode, r)
            assert r["trained"] > 1e-3, (mode, r)  # B moved off zero: the comparison below means something
            if "bf16" in mode:  # the frozen linears in bf16 beside fp32 adapters, on both engines
                assert r["dtypes"] == ["torch.bfloat16", "torch.float32"] and r["loss"] < 1e-3, (mode, r)
            else:
                assert r["dtypes"] == ["torch.float32"], (mode, r)
                for what in ("loss", "grads", "adapters"):
                    assert r[what] < 1e-5, (mode, what, r)
            assert r["base_identical"] and r["resumed"], (mode, r)
            assert r["read_as_native"] == 0.0, (mode, r)


def test_stage_hand_off_from_an_adapter_run_merged_or_carried_on_tp2_equals_native(tmp_path):
    """The next stage after an adapter run, on megatron-core at TP=2: merging its adapters into the
    base (weights cut per rank from the merged model) and carrying them on (`peft.handoff=carry`) take
    the same steps as the native engine's hand-offs. (The first run's engine does not matter: both
    write PEFT's tensors under native names, test_mcore_adapters_equal_native_adapters.)"""
    stage = ["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "peft=lora", "optim.schedule=constant",
             "logger.progress_bar=false", "trainer.max_steps=2"]
    tp2 = ["torch.distributed.run", "--nproc-per-node", "2", "-m", *stage, "model.impl=mcore",
           "parallel.tensor_parallel=2"]
    first = tmp_path / "first"

    def run(args: list[str], run_dir: Path, *overrides: str) -> list[float]:
        result = run_module([*args, f"run.dir={run_dir}", *overrides], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    run(stage, first)
    for handoff in ("merge", "carry"):
        after = [f"init.from_checkpoint={first}", f"peft.handoff={handoff}"]
        got = run(tp2, tmp_path / f"tp2_{handoff}", *after)
        expected = run(stage, tmp_path / f"native_{handoff}", *after)
        assert got == pytest.approx(expected, rel=1e-5), (handoff, got, expected)
