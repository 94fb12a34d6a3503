"""Run stages in order with weight hand-off: stage k+1 starts from stage k's final checkpoint
(weights only: fresh optimizer and schedule); a rerun skips finished stages and resumes an
unfinished one. Entry point: `python -m train.pipeline`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from train.config.compose import RECIPES_DIR, load_config
from train.config.schema import Config, ConfigError

USAGE = (
    "usage: python -m train.pipeline [run.dir=DIR] [stages=[a,b]] [overrides for every stage...]\n"
    "example: python -m train.pipeline smoke=cpu run.dir=runs/smoke"
)


def parse_pipeline_args(argv: list[str]) -> tuple[list[str], Path, list[str]]:
    """(stage recipes, pipeline run dir, overrides for each stage)."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        sys.exit(0)
    base = OmegaConf.load(RECIPES_DIR / "pipeline.yaml")
    own = [a for a in argv if a.split("=", 1)[0] in ("run.dir", "stages")]
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(own))
    stages = list(merged.stages)
    if not stages:
        raise ConfigError("stages is empty: list the recipes to run")
    return stages, Path(str(merged.run.dir)), [a for a in argv if a not in own]


def run_pipeline(argv: list[str]) -> list[dict]:
    from train.loop.preemption import Preempted, PreemptionHandler, mark_preempted
    from train.loop.run_lock import hold_run_dir
    from train.loop.trainer import run_stage

    stages, root, overrides = parse_pipeline_args(argv)
    # Validate every stage before any compute, so a typo in an override fails in seconds.
    configs = [load_config(name, overrides + [f"run.dir={root / name}"]) for name in stages]
    notice = forgetting_monitor_notice(configs)
    if notice and int(os.environ.get("RANK", "0")) == 0:
        print(notice, flush=True)
    # One handler for the whole pipeline: a stop that comes during a stage's last step or between
    # stages (the finished stage is saved) ends the pipeline before the next stage, as a preemption.
    preemption = PreemptionHandler().install()
    summaries = []
    previous_checkpoint: str | None = None
    try:
        # The pipeline's directory is held across all its stages (each stage also holds its own).
        with hold_run_dir(root, rank=int(os.environ.get("RANK", "0"))):
            for cfg in configs:
                if preemption.requested:
                    message = f"stopped before {cfg.stage}: the stages before it are finished and saved"
                    mark_preempted(message)
                    raise Preempted(message)
                if previous_checkpoint is not None:
                    cfg.init.from_checkpoint = previous_checkpoint
                print(f"=== {cfg.stage} -> {cfg.run.dir}", flush=True)
                started = time.monotonic()
                summary = run_stage(cfg, preemption)
                final = summary["final_loss"]
                print(f"=== {cfg.stage} finished in {time.monotonic() - started:.0f}s: "
                      f"final loss {'n/a' if final is None else f'{final:.4f}'}", flush=True)
                summaries.append(summary)
                previous_checkpoint = summary["checkpoint"]
                if previous_checkpoint is None:
                    raise RuntimeError(f"{cfg.stage} finished without a checkpoint; cannot hand off")
            if int(os.environ.get("RANK", "0")) == 0:
                write_pipeline_summary(root, configs, summaries)
    finally:
        preemption.uninstall()
    return summaries


def forgetting_monitor_notice(configs: list[Config]) -> str | None:
    """One line when no stage evaluates a forgetting monitor (data.monitor_sources is empty in the
    shipped recipes: there is no public held-out set to point it at), saying how to set one."""
    if any(cfg.data.monitor_sources for cfg in configs):
        return None
    return ("=== no forgetting monitor: data.monitor_sources is empty, so summary.json's `forgetting` stays empty; "
            "set it for every stage, e.g. data.monitor_sources=[{name:code_heldout,path:/data/heldout/code}]")


def write_pipeline_summary(root: Path, configs: list[Config], summaries: list[dict]) -> None:
    """summary.json (the stages' summaries in order and the forgetting curve: each stage's last
    held-out loss on the shared monitor sources) and report.html."""
    from train.report.build import forgetting_curve, read_stage, write_pipeline_report

    curve = forgetting_curve([read_stage(Path(cfg.run.dir)) for cfg in configs])
    from train.report.benchmarks import benchmark_table

    stages, table = benchmark_table([(s.get("stage", cfg.stage), s) for cfg, s in zip(configs, summaries)])
    summary = {"stages": summaries, "forgetting": {source: [{"stage": stage, "loss": loss} for stage, loss in zip(*points)]
                                                   for source, points in curve.items()},
               # benchmark by stage: what each stage bought and cost on eval.tasks / eval.vlm_tasks
               "benchmarks": {row: [{"stage": stage, "score": score} for stage, score in zip(stages, scores)
                                    if score is not None] for row, scores in table.items()}}
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for source, points in summary["forgetting"].items():
        print(f"=== forgetting monitor {source}: " + " -> ".join(f"{p['stage']} {p['loss']:.4f}" for p in points),
              flush=True)
    for row, points in summary["benchmarks"].items():
        print(f"=== benchmark {row}: " + " -> ".join(f"{p['stage']} {p['score']:.4f}" for p in points), flush=True)
    try:
        print(f"=== report: {write_pipeline_report(root)}", flush=True)
    except Exception as err:  # the stages are trained and saved; a plot problem must not hide that
        print(f"=== warning: report.html not written ({type(err).__name__}: {err}); rebuild it with "
              f"`python -m train.report {root}`", flush=True)
