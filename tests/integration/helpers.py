"""Run the real entry points in subprocesses, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run_module(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_stage_model(run_dir: Path, checkpoint: Path | None = None):
    """The stage's model with the weights of `checkpoint` (default: the stage's final one)."""
    from data_pipelines.training.samples import Tokenizer
    from train.checkpoint.store import find_latest
    from train.config.schema import Config, from_dict
    import torch

    from train.engines.assembly import assemble
    from train.parallel.distributed import DistInfo

    cfg = from_dict(Config, yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.init.from_checkpoint = None
    cfg.model.impl = "native"  # checkpoints hold the native layout whatever engine wrote them
    cfg.precision.name, cfg.model.compile = "fp32", False
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    weights = None if checkpoint is False else checkpoint or find_latest(run_dir / "checkpoints")
    return assemble(cfg, info, Tokenizer.load(cfg.data.tokenizer).special_ids, train=False, weights_from=weights).model


def state_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
