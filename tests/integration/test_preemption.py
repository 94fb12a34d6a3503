"""SIGTERM / SIGUSR1: save at the next step boundary, exit 75, and a rerun resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import env, read_metrics, run_module

ARGS = ["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=30",
        "trainer.save_every=100"]


@pytest.mark.parametrize("async_save", [True])
def test_sigterm_saves_and_exits_75_then_resumes(tmp_path, async_save):
    """SIGUSR1 takes the same path (tests/unit/test_preemption.py checks both set the flag). With
    async saving, the checkpoint is complete before the exit. The synchronous save takes this path
    in tests/integration/test_slurm_cluster.py (SIGTERM from `scancel -s TERM`, then the resume)."""
    run_dir = tmp_path / "run"
    args = [*ARGS, f"trainer.async_save={str(async_save).lower()}"]
    proc = subprocess.Popen([sys.executable, "-m", *args, f"run.dir={run_dir}"], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                               and len(read_metrics(run_dir)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert stopped_at < 30
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:07d}"
    assert not (run_dir / "summary.json").exists()  # unfinished

    resumed = run_module([*args, f"run.dir={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped_at}" in resumed.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 31))
