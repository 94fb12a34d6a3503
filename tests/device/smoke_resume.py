"""Step d of device_check.sh: a smoke stage on the GPU, its loss falling, its checkpoint, and a resume
that continues its steps.

The stage runs as a user runs it (`python -m train --config-name stage1_image_sft smoke=gpu ...`:
images, multi-image and text, so the ViT and the projector run too; no video), for 10 steps with
a checkpoint every 5, on the embedded data the kit brings (`--data`): `data.synth_dir` would generate
it, which needs PyAV, absent from the GPU image. Then, as README's "Resume" has it, the same command
reruns on a copy of the run rewound to its step-5 checkpoint (the later checkpoint and the summary
removed, `latest` naming step 5): it must say it resumed at step 5, log steps 6..10 and repeat the
uninterrupted run's losses. Prints one `DEVCHECK {json}` line with the figures; exits 1 on a failed
check. `--smoke cpu --steps 4 --save-every 2` runs the same on a CPU (tests/unit/test_device_kit.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPE = "stage1_image_sft"
# Resumed losses repeat the uninterrupted ones up to this relative difference (deterministic kernels
# give equality; the figure `resume_max_rel_diff` shows how close they came).
RESUME_RTOL = 1e-2


def source_list(sources, with_weights: bool) -> str:
    items = []
    for source in sources:
        fields = [f"name:{source.name}", f"path:'{source.path}'"]
        if with_weights:
            fields.append(f"weight:{source.weight}")
        if source.reasoning_on_ratio is not None:
            fields.append(f"reasoning_on_ratio:{source.reasoning_on_ratio}")
        items.append("{" + ",".join(fields) + "}")
    return "[" + ",".join(items) + "]"


def data_overrides(data: Path, smoke: str) -> list[str]:
    """The smoke recipe's own sources, resolved against `data`, as explicit overrides with no synth_dir."""
    from train.config.compose import load_config

    cfg = load_config(RECIPE, [f"smoke={smoke}", f"data.synth_dir={data.resolve()}"]).data
    return ["data.synth_dir=null", f"data.tokenizer='{cfg.tokenizer}'",
            f"data.sources={source_list(cfg.sources, True)}",
            f"data.val_sources={source_list(cfg.val_sources, False)}",
            f"data.monitor_sources={source_list(cfg.monitor_sources, False)}"]


def run_stage(run_dir: Path, args: argparse.Namespace, overrides: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "train", "--config-name", RECIPE, f"smoke={args.smoke}",
           f"trainer.max_steps={args.steps}", f"trainer.save_every={args.save_every}", "logger.progress_bar=false",
           f"run.dir={run_dir}", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", flush=True)
    return result, seconds


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [m for m in records if "loss" in m]  # validation records carry val/... keys only


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def check(args: argparse.Namespace) -> tuple[list[str], dict]:
    """(failed checks, figures)."""
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    overrides = data_overrides(args.data, args.smoke)
    failures: list[str] = []
    figures: dict = {"recipe": RECIPE, "smoke": args.smoke}

    clean = work / "clean"
    result, figures["seconds_clean"] = run_stage(clean, args, overrides)
    if result.returncode:
        return [f"the stage failed (exit {result.returncode})"], figures
    logged = metrics(clean)
    losses = [m["loss"] for m in logged]
    figures.update(losses=[round(x, 4) for x in losses], step_seconds=[round(m["step_time_s"], 3) for m in logged])
    if [m["step"] for m in logged] != list(range(1, args.steps + 1)):
        failures.append(f"logged steps {[m['step'] for m in logged]}, expected 1..{args.steps}")
    head, tail = losses[:3], losses[-3:]
    if not losses or sum(tail) / len(tail) >= sum(head) / len(head):
        failures.append(f"the loss did not fall: first {head}, last {tail}")
    checkpoints = clean / "checkpoints"
    figures["checkpoints"] = sorted(p.name for p in checkpoints.glob("step_*")) if checkpoints.exists() else []
    final, rewind = checkpoint_name(args.steps), checkpoint_name(args.save_every)
    latest = checkpoints / "latest"
    if not latest.exists() or latest.read_text().strip() != final or rewind not in figures["checkpoints"]:
        failures.append(f"expected checkpoints {rewind} and {final} (latest), found {figures['checkpoints']}")
        return failures, figures

    resumed = work / "resumed"
    shutil.copytree(clean, resumed)
    shutil.rmtree(resumed / "checkpoints" / final)
    (resumed / "checkpoints" / "latest").write_text(rewind + "\n")
    (resumed / "summary.json").unlink(missing_ok=True)
    result, figures["seconds_resumed"] = run_stage(resumed, args, overrides)
    if result.returncode:
        return failures + [f"the resumed stage failed (exit {result.returncode})"], figures
    if "resumed from" not in result.stdout or f"at step {args.save_every}" not in result.stdout:
        failures.append(f"the rerun did not report resuming at step {args.save_every}")
    again = metrics(resumed)
    if [m["step"] for m in again] != list(range(1, args.steps + 1)):
        failures.append(f"after the resume the logged steps are {[m['step'] for m in again]}, expected 1..{args.steps}")
    diffs = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(again[args.save_every:], logged[args.save_every:])]
    figures["resumed_losses"] = [round(m["loss"], 4) for m in again[args.save_every:]]
    figures["resume_max_rel_diff"] = max(diffs) if diffs else None
    if not diffs or max(diffs) > RESUME_RTOL:
        failures.append(f"resumed losses {figures['resumed_losses']} differ from the uninterrupted ones "
                        f"{[round(m['loss'], 4) for m in logged[args.save_every:]]} by more than {RESUME_RTOL:.0e}")
    return failures, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the embedded data (the kit's data/)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the runs (emptied first)")
    parser.add_argument("--smoke", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=5)
    args = parser.parse_args(argv)
    if not 0 < args.save_every < args.steps or args.steps < 4:
        parser.error("need 0 < --save-every < --steps and --steps >= 4")
    failures, figures = check(args)
    figures["failures"] = failures
    print("DEVCHECK " + json.dumps(figures))
    for failure in failures:
        print(f"smoke_resume: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
