"""Real processes: torchrun with 2 CPU ranks (gloo), and wandb (offline) with TensorBoard beside it."""

from __future__ import annotations

import json
import struct

from tests.integration.helpers import read_metrics, run_module


def test_two_rank_torchrun_stage(tmp_path):
    run_dir = tmp_path / "run"
    result = run_module(["torch.distributed.run", "--nproc-per-node", "2", "-m", "train",
                         "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=4",
                         "trainer.save_every=2", f"run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Two ranks each pack micro_batch_size rows of seq_length per step.
    assert all(m["tokens"] <= m["step"] * 2 * 2 * 1024 for m in metrics)
    final = run_dir / "checkpoints" / "step_0000004"
    assert (final / "rank_0.json").exists() and (final / "rank_1.json").exists()
    rank_states = [json.loads((final / f"rank_{r}.json").read_text())["data"] for r in (0, 1)]
    assert rank_states[0]["buffer"] != rank_states[1]["buffer"]  # ranks hold different samples
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_wandb_offline_and_tensorboard_log_into_the_run_dir_and_no_secret_leaks(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run_dir = tmp_path / "run"
    result = run_module(["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "logger=wandb_offline",
                         "logger.tensorboard=true", "trainer.max_steps=2", f"run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    # The report's plots go to wandb as images, as they go to report.html.
    logged = {p.name for p in (runs[0] / "files" / "media").rglob("*.png")}
    drawn = {p.stem for p in (run_dir / "report").glob("*.png")}
    assert drawn and len(logged) == len(drawn)
    # TensorBoard, read back as `tensorboard --logdir` reads it: every step's numbers at their step
    # (the losses bit-equal to metrics.jsonl's in float32, the event files' type), and the plots.
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    metrics = read_metrics(run_dir)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(m["step"], struct.unpack("f", struct.pack("f", m["loss"]))[0]) for m in metrics]
    for tag in ("train/lr", "train/grad_norm", "train/tokens", "train/packing_efficiency"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    val = [k for k in metrics[-1] if k.startswith("val/")]  # held-out losses at the stage's end
    assert val and all([e.step for e in events.Scalars(k)] == [2] for k in val)
    assert any(t.startswith("samples_by_source/") for t in tags["scalars"])
    assert len(tags["images"]) == len(drawn) and all(t.startswith("report/") for t in tags["images"])
    assert secret not in result.stdout + result.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
