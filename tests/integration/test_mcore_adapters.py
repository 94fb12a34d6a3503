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
