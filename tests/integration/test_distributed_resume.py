"""Two processes under torchrun (gloo): SIGKILL mid-stage, rerun, same losses as uninterrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import env, read_metrics, run_module

TORCHRUN = ["torch.distributed.run", "--nproc-per-node", "2", "-m"]
ARGS = ["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=8",
        "trainer.save_every=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The two-rank run without a stop (saving in the background changes no step)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    reference = run_module([*TORCHRUN, *ARGS, f"run.dir={cwd / 'clean'}"], cwd)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return cwd / "clean"


def test_sigkilled_two_rank_run_resumes_exactly(tmp_path, uninterrupted):
    """Killed while its shards are written in the background (own gloo group): same losses as a plain
    run. (Synchronous two-rank saves resume in the test below; a killed synchronous one in
    test_stage_resume.)"""
    killed, clean = tmp_path / "killed", uninterrupted
    killed_args = [*ARGS, "trainer.async_save=true", f"run.dir={killed}"]
    proc = subprocess.Popen([sys.executable, "-m", *TORCHRUN, *killed_args], cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((killed / "metrics.jsonl").exists()
                                               and len(read_metrics(killed)) >= 5 and latest.exists()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
    proc.wait()
    assert latest.read_text().strip() in ("step_0000003", "step_0000006")

    resumed = run_module([*TORCHRUN, *killed_args], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in read_metrics(killed)] == list(range(1, 9))
    assert [m["loss"] for m in read_metrics(killed)] == [m["loss"] for m in read_metrics(clean)]


def test_two_rank_checkpoint_resumes_on_one_rank_and_back(tmp_path):
    run_dir = tmp_path / "run"
    steps = lambda n: [f"trainer.max_steps={n}", "optim.schedule=constant", f"run.dir={run_dir}"]  # noqa: E731
    first = run_module([*TORCHRUN, *ARGS, *steps(3)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    one = run_module([*ARGS, *steps(5)], tmp_path)  # plain python: 1 rank
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resharded the data position from 2 to 1 ranks" in one.stdout
    back = run_module([*TORCHRUN, *ARGS, *steps(7)], tmp_path)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "resharded the data position from 1 to 2 ranks" in back.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 8))
