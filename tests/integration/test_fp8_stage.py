"""A smoke stage in emulated FP8 delayed scaling: close to fp32, and resumes exactly (amax state)."""

from __future__ import annotations

import torch.distributed.checkpoint as dcp

from tests.integration.helpers import read_metrics, run_module

BASE = ["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "optim.schedule=constant",
        "optim.warmup_steps=0", "optim.lr=1e-3", "trainer.save_every=4"]


def test_fp8_emulated_stage_tracks_fp32_and_resumes_exactly(tmp_path):
    def run(name: str, steps: int, precision: str):
        result = run_module([*BASE, f"precision={precision}", f"trainer.max_steps={steps}",
                             f"run.dir={tmp_path / name}"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return read_metrics(tmp_path / name)

    fp32 = run("fp32", 8, "fp32")
    fp8 = run("fp8", 8, "fp8_delayed_emulated")
    assert abs(fp8[-1]["loss"] - fp32[-1]["loss"]) <= 0.10 * fp32[-1]["loss"]
    assert all("fp8_saturated_frac" in m and m["fp8_scale_max"] >= m["fp8_scale_min"] > 0 for m in fp8)

    # Stop after 4 steps, then continue the same run dir to 8: bit-identical to the straight run.
    run("split", 4, "fp8_delayed_emulated")
    split = run("split", 8, "fp8_delayed_emulated")
    assert [m["loss"] for m in split] == [m["loss"] for m in fp8]

    keys = dcp.FileSystemReader(str(tmp_path / "fp8" / "checkpoints" / "step_0000008")).read_metadata().state_dict_metadata
    assert any("amax_history" in k for k in keys) and any(k.endswith("scale") for k in keys)
