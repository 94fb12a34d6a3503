"""Held-out losses do not depend on the world size: 1 rank and 2 ranks (torchrun, gloo) evaluate
the same weights to the same values."""

from __future__ import annotations

import json

from tests.integration.helpers import read_metrics, run_module

# One step at a learning rate too small to move any fp32 weight: both runs evaluate the initial
# weights, whatever batches their ranks trained on.
ARGS = ["--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=1", "optim.lr=1e-30",
        "optim.min_lr=1e-30", "optim.warmup_steps=1", "trainer.eval_samples=12"]


def test_validation_is_the_same_on_one_and_two_ranks(tmp_path):
    one = run_module(["train", *ARGS, "run.dir=runs/one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_module(["torch.distributed.run", "--nproc-per-node", "2", "-m", "train", *ARGS, "run.dir=runs/two"],
                     tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (read_metrics(tmp_path / "runs" / name)[-1] for name in ("one", "two"))
    val = sorted(k for k in a if k.startswith("val/"))
    assert val == ["val/loss", "val/monitor_code_reasoning/loss", "val/synth_text/loss"]
    assert val == sorted(k for k in b if k.startswith("val/"))
    for key in val:
        assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a[key], b[key])
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["val"]["synth_text/loss"] == b["val/synth_text/loss"]
