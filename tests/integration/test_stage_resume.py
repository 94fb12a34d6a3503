"""One stage alone: kill it mid-run, rerun the same command, and it continues where it stopped."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import env, read_metrics, run_module

ARGS = ["train", "--config-name", "stage1_image_sft", "smoke=cpu", "trainer.max_steps=12", "trainer.save_every=4",
        "trainer.eval_every=4"]


def val_records(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if k.startswith("val/") or k == "step"} for m in read_metrics(run_dir)
            if any(k.startswith("val/") for k in m)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The stage run once without a stop (inline decode, synchronous saves): what every killed and
    resumed variant must reproduce, since neither decode workers nor async saves change a step."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    result = run_module([*ARGS, f"run.dir={cwd / 'clean'}"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "clean"


@pytest.mark.parametrize("workers, async_save", [(0, False), (2, True)])
def test_killed_stage_resumes_from_latest_checkpoint(tmp_path, uninterrupted, workers, async_save):
    """Same losses as an uninterrupted run: inline with synchronous saves, and with 2 decode worker
    processes while the checkpoint shards are written in the background."""
    killed, clean = tmp_path / "killed", uninterrupted
    args = [*ARGS, f"data.num_workers={workers}", f"trainer.async_save={str(async_save).lower()}"]
    proc = subprocess.Popen([sys.executable, "-m", *args, f"run.dir={killed}"], cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        # An async checkpoint becomes `latest` a moment after its step: wait for it too.
        if (killed / "metrics.jsonl").exists() and len(read_metrics(killed)) >= 6 and latest.exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_step = int(latest.read_text().strip().split("_")[1])
    assert resume_step in (4, 8)  # killed mid-run, with a complete checkpoint behind it

    resumed = run_module([*args, f"run.dir={killed}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"at step {resume_step}" in resumed.stdout
    steps = [m["step"] for m in read_metrics(killed)]
    assert steps == list(range(1, 13))  # continues, no step repeated

    assert [m["loss"] for m in read_metrics(killed)] == [m["loss"] for m in read_metrics(clean)]
    # Held-out evaluation at steps 4, 8, 12 (one of them re-run after the resume): the same values.
    assert [r["step"] for r in val_records(clean)] == [4, 8, 12]
    assert val_records(killed) == val_records(clean)


def test_invalid_override_fails_before_compute(tmp_path):
    result = run_module(["train", "--config-name", "stage1_image_sft", "smoke=cpu", "optim.lr=-0.1",
                         f"run.dir={tmp_path / 'x'}"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert "optim.lr" in result.stderr
    assert not (tmp_path / "x").exists()


def check_sample_counts(records: list[dict]) -> None:
    """Per-step `samples` add up to the cumulative `samples_total`, which the per-source table matches."""
    last = records[-1]
    assert last["samples_total"] == sum(last["samples_by_source"].values()) == sum(r["samples"] for r in records)
    assert sum(last["tokens_by_source"].values()) == last["tokens"]


def test_resumed_with_no_step_left_still_reports_the_final_loss(tmp_path):
    args = ["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=2",
            f"run.dir={tmp_path / 'run'}"]
    first_run = run_module(args, tmp_path)
    assert first_run.returncode == 0, first_run.stderr[-2000:]
    # The console line (no terminal: plain lines) carries the gradient norm; the report plots it.
    assert re.search(r"step 2/2 loss [\d.]+ grad_norm [\d.e+-]+ tok/s [\d,]+ eta", first_run.stdout), first_run.stdout
    assert (tmp_path / "run" / "report" / "stage3_text_recovery_grad_norm.png").is_file()
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Gradient norm" in page and "Samples per source (cumulative)" in page
    check_sample_counts(read_metrics(tmp_path / "run"))
    rank_file = tmp_path / "run" / "checkpoints" / "step_0000002" / "rank_0.json"
    rank_state = json.loads(rank_file.read_text())
    assert rank_state["samples_total"] == read_metrics(tmp_path / "run")[-1]["samples_total"]
    summary_file = tmp_path / "run" / "summary.json"
    first = json.loads(summary_file.read_text())
    summary_file.unlink()  # as if killed after the final checkpoint, before the summary
    again = run_module(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    final = json.loads(summary_file.read_text())["final_loss"]
    assert final == first["final_loss"] == read_metrics(tmp_path / "run")[-1]["loss"]
    assert "note: trainer.max_steps" not in again.stdout
    # Resumed for one more step: the cosine schedule now spans 3 steps, and the run says so. The
    # checkpoint is made to look like one from before `samples_total` was saved: the count carries
    # on from the loader's per-source counts.
    del rank_state["samples_total"]
    rank_file.write_text(json.dumps(rank_state))
    longer = run_module([*args[:-2], "trainer.max_steps=3", args[-1]], tmp_path)
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "note: trainer.max_steps is 3, the checkpoint was saved by a run of 2" in longer.stdout
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    check_sample_counts(records)
    assert json.loads(summary_file.read_text())["samples_total"] == records[-1]["samples_total"]
