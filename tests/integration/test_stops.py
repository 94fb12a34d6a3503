"""Runs stop when told, and take nothing with them: signals during start-up stop the run at once,
a killed trainer leaves no decode worker behind, a source with nothing usable ends the run with
its reasons. Every wait is bounded: these tests fail, never hang, when broken."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.helpers import env, run_module
from tests.shard_writer import write_shard


def start(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_sigterm_during_data_warm_up_stops_at_once(tmp_path):
    """A big packer buffer keeps the first step minutes away; SIGTERM then exits 75 within seconds."""
    assert run_module(["data_pipelines.synth", "--out", str(tmp_path / "warm"), "--kind", "video", "--num", "1"],
                      tmp_path).returncode == 0  # warm the import caches only
    run_dir = tmp_path / "run"
    proc = start(["--config-name", "stage2_video_sft", "smoke=cpu", "data.pack_buffer=5000", f"run.dir={run_dir}"],
                 tmp_path)
    try:
        wait_for(lambda: (run_dir / "config.yaml").exists() or proc.poll() is not None, 90, "the stage to start")
        time.sleep(0.5)  # into model build / data warm-up
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-2000:]
    assert time.monotonic() - signalled < 10
    assert "SIGTERM before the first step" in err and "Traceback" not in err
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.timeout(180)
def test_a_killed_trainer_leaves_no_decode_worker(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(["--config-name", "stage1_image_sft", "smoke=cpu", "data.num_workers=2", "trainer.max_steps=500",
                  f"run.dir={run_dir}"], tmp_path)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() or proc.poll() is not None, 120, "the first step")
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) >= 2
        proc.send_signal(signal.SIGKILL)  # as the OOM killer does: no handler runs
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"{len(alive)} decode workers outlived their trainer"
    finally:
        proc.kill()
        for child in psutil.Process().children(recursive=True):
            if child.pid != proc.pid:
                child.kill()


@pytest.mark.timeout(120)
def test_a_stage_over_unusable_data_ends_with_the_reasons(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    too_long = json.dumps({"messages": [{"role": "user", "content": "word " * 2000},
                                        {"role": "assistant", "content": "ok"}]}).encode()
    write_shard(data / "shard-000000.tar", [(f"s{i}", {"json": too_long}) for i in range(20)])
    result = run_module(["train", "--config-name", "stage3_text_recovery", "smoke=cpu",
                         f"data.sources=[{{name:long,path:{data}}}]", "trainer.max_steps=2", f"run.dir={tmp_path / 'r'}"],
                        tmp_path, timeout=100)
    assert result.returncode == 2
    assert "data error: data source 'long'" in result.stderr and "too_long 20" in result.stderr
    assert "Traceback" not in result.stderr
