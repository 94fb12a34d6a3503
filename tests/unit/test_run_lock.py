"""One trainer per run directory: a second start is refused with one line naming the holder; a
SIGKILLed holder leaves nothing stuck; the pipeline's own nested holds re-enter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from train.loop.run_lock import RunDirBusy, hold_run_dir

HOLD_AND_SLEEP = ("import sys, time\nfrom train.loop.run_lock import hold_run_dir\n"
                  "with hold_run_dir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_live_holder_refuses_others_and_a_killed_one_leaves_nothing_stuck(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_SLEEP, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"run.dir={tmp_path} is in use by pid {holder.pid} on "):
            with hold_run_dir(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_run_dir(tmp_path):  # the kernel dropped the dead holder's lock
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()


def test_nested_holds_in_one_process_and_other_ranks_do_not_lock(tmp_path):
    with hold_run_dir(tmp_path):
        with hold_run_dir(tmp_path / "."):  # the pipeline holds its root while a stage holds its own dir
            with hold_run_dir(tmp_path / "stage1"):
                pass
        with hold_run_dir(tmp_path, rank=1):  # torchrun ranks > 0 share rank 0's hold
            pass
    with hold_run_dir(tmp_path):  # released once the outermost hold ends
        pass


def test_a_second_trainer_on_a_held_run_dir_exits_2_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir):
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "train", "--config-name", "stage3_text_recovery", "smoke=cpu",
                                 f"run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith(f"config error: run.dir={run_dir} is in use by pid "
                                                            f"{os.getpid()}")
    assert not (run_dir / "metrics.jsonl").exists() and time.monotonic() - started < 120
