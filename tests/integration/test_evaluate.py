"""`train.evaluate` and `eval.tasks`: the lm-eval harness on a smoke checkpoint, on CPU, over the
local task in tests/eval_tasks (no hub access); generation scoring; clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.integration.helpers import run_module

TASK = "tests/eval_tasks/hvl_tiny_choice.yaml"  # relative to the repository root (its data file too)


@pytest.fixture(scope="module")
def evaluated_stage(tmp_path_factory, project_root_dir):
    """A 2-step text stage whose end runs the local lm-eval task (run from the repo root, so the
    task's data path resolves; everything it writes goes to the temporary directory)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    run_dir = tmp / "run"
    result = run_module(["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=2",
                         f"data.synth_dir={tmp / 'synth'}", f"run.dir={run_dir}", f"eval.tasks=[{TASK}]"],
                        project_root_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return tmp, run_dir


@pytest.fixture(scope="module")
def project_root_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


def test_stage_end_runs_its_tasks_and_the_cli_gives_the_same_scores(evaluated_stage, project_root_dir):
    tmp, run_dir = evaluated_stage
    summary = json.loads((run_dir / "summary.json").read_text())
    at_end = summary["lm_eval"]["results"]["hvl_tiny_choice"]
    assert at_end["sample_len"] == 8 and 0.0 <= at_end["acc,none"] <= 1.0
    saved = json.loads((run_dir / "eval" / "lm_eval_step_0000002.json").read_text())
    assert saved["results"]["hvl_tiny_choice"]["acc,none"] == at_end["acc,none"]
    # The export the harness read is what transformers loads: tokenizer and chat template included.
    assert (run_dir / "eval" / "hf_step_0000002" / "tokenizer_config.json").exists()

    out = tmp / "cli_eval"
    # The README's line: a hub task first. Offline (this machine), it is skipped in one line and the
    # local task still runs.
    result = run_module(["train.evaluate", "--ckpt", str(run_dir), "--tasks", "gsm8k", TASK, "--out", str(out)],
                        project_root_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping gsm8k: its data (openai/gsm8k) is on the Hugging Face Hub" in result.stderr
    assert "falling back to its reference PyTorch implementation" not in result.stderr, "CPU has no Mamba kernels"
    printed = json.loads(result.stdout)
    assert printed["lm_eval"]["results"]["hvl_tiny_choice"]["acc,none"] == at_end["acc,none"]
    assert "gsm8k" in printed["lm_eval"]["skipped"] and "gsm8k" not in printed["lm_eval"]["results"]
    assert (out / "lm_eval_step_0000002.json").exists()


def test_generation_is_scored_per_held_out_source(evaluated_stage, project_root_dir):
    tmp, run_dir = evaluated_stage
    result = run_module(["train.evaluate", "--ckpt", str(run_dir), "--generation", "--samples", "4",
                         "--max-new-tokens", "6"], project_root_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((run_dir / "eval" / "generation_step_0000002.json").read_text())
    assert set(scores) == {"synth_text"}  # the stage's val_sources
    text = scores["synth_text"]
    assert text["samples"] + sum(text["skipped"].values()) == 4
    assert text["samples"] >= 1 and 0.0 <= text["relaxed_match"] <= 1.0 and text["examples"]


def test_missing_or_damaged_checkpoints_fail_clearly(evaluated_stage, project_root_dir):
    tmp, run_dir = evaluated_stage
    missing = run_module(["train.evaluate", "--ckpt", str(tmp / "nowhere"), "--tasks", TASK], project_root_dir)
    assert missing.returncode == 2 and "evaluate error:" in missing.stderr and "Traceback" not in missing.stderr
    damaged = tmp / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("eval"))
    step = damaged / "checkpoints" / "step_0000002"
    for shard in step.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    result = run_module(["train.evaluate", "--ckpt", str(step), "--tasks", TASK], project_root_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "evaluate error:" in result.stderr and "damaged" in result.stderr and "Traceback" not in result.stderr
    assert not (damaged / "eval" / "hf_step_0000002").exists()
    converted = run_module(["train.convert", "native-to-hf", "--src", str(step), "--dst", str(tmp / "hf_damaged")],
                           project_root_dir)
    assert converted.returncode == 2 and "Traceback" not in converted.stderr, converted.stderr[-2000:]
    assert f"convert error: checkpoint {step} (step 2) cannot be read" in converted.stderr
