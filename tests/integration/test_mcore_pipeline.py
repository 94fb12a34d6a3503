"""Pipeline parallelism on model.impl=mcore (torchrun, gloo): the 1F1B schedule over two stages
gives the one-stage step (loss, logits, every gradient), and a pipelined image stage trains,
validates and hands its checkpoint to a one-stage run that continues the data without repeats or
gaps, optimizer state included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.integration.helpers import read_metrics, run_module

WORKER = str(Path(__file__).with_name("mcore_pipeline_worker.py"))
STAGE = ["train", "--config-name", "stage1_image_sft", "smoke=cpu", "model.impl=mcore", "trainer.max_steps=6",
         "trainer.save_every=2", "trainer.keep_last=3", "optim.eps=1e-4", "logger.progress_bar=false"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_two_stages_equal_one(tmp_path):
    results = {}
    for stages in (1, 2):
        out = tmp_path / f"pp{stages}"
        out.mkdir()
        run = run_module(["torch.distributed.run", "--nproc-per-node", str(stages), WORKER, str(out), str(stages)],
                         tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[stages] = [torch.load(out / f"rank{r}.pt") for r in range(stages)]
    (one,), (first, last) = results[1], results[2]
    assert (first["stage"], last["stage"]) == (0, 1)
    for got in (first, last):  # the loss and norm are shared by every stage
        assert abs(got["loss"] - one["loss"]) <= 1e-6 * one["loss"]
        assert abs(got["grad_norm"] - one["grad_norm"]) <= 1e-5 * one["grad_norm"]
    assert not first["logits"] and len(last["logits"]) == len(one["logits"]) == 3  # the head is on the last stage
    for got, expected in zip(last["logits"], one["logits"]):
        assert relative(got, expected) < 1e-5
    # Each parameter's gradient comes from the one stage that holds it: the projector and the
    # embedding from the first, the final norm and head from the last.
    assert not set(first["grads"]) & set(last["grads"])
    assert {"projector.mlp1.1.weight", "language_model.backbone.embeddings.weight"} <= set(first["grads"])
    assert {"language_model.lm_head.weight", "language_model.backbone.norm_f.weight"} <= set(last["grads"])
    grads = first["grads"] | last["grads"]
    assert grads.keys() == one["grads"].keys()
    worst = max(relative(grads[k], one["grads"][k]) for k in grads)
    assert worst < 1e-5, worst


def test_pipelined_stage_trains_validates_and_resumes_on_one_stage(tmp_path):
    piped = tmp_path / "pp2"
    run = run_module(["torch.distributed.run", "--nproc-per-node", "2", "-m", *STAGE,
                      "parallel.pipeline_parallel=2", f"run.dir={piped}"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = read_metrics(piped)
    assert [m["step"] for m in expected] == list(range(1, 7))
    assert expected[-1]["loss"] < expected[0]["loss"]
    assert "val/loss" in expected[-1]  # validation ran through the pipeline

    # The step-4 checkpoint (written by both stages, each its own layers) on one process.
    resumed = tmp_path / "pp1"
    shutil.copytree(piped, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    (resumed / "checkpoints" / "latest").write_text("step_0000004\n")
    (resumed / "summary.json").unlink()
    run = run_module([*STAGE, f"run.dir={resumed}"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / 'step_0000004'}" in run.stdout
    got = read_metrics(resumed)
    assert [m["step"] for m in got] == list(range(1, 7)), "every step once, in order"
    for a, b in zip(got[4:], expected[4:]):  # same data, same optimizer state: the same steps
        assert a["samples"] == b["samples"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
    assert abs(got[-1]["val/loss"] - expected[-1]["val/loss"]) <= 1e-4 * expected[-1]["val/loss"]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 6
