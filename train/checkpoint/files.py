"""The files of the checkpoint format around the tensor shards: the `COMPLETE` marker, `latest`,
atomic writes and renames, and the run's saved `config.yaml`.

A run directory holds `config.yaml` (the resolved config) and `checkpoints/`:
`checkpoints/step_NNNNNNN/` (the DCP shards, `.metadata`, one `rank_R.json` per rank of a training
checkpoint, and `COMPLETE`, written last) and `checkpoints/latest` (a text file naming the newest
complete one). A checkpoint is written to `.tmp_step_NNNNNNN`, marked, fsynced, renamed into place
(`publish`), and only then named in `latest`: a crash at any point leaves the previous one `latest`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import yaml

COMPLETE_MARKER = "COMPLETE"
LATEST_NAME = "latest"
RUN_CONFIG_NAME = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
_DCP_METADATA = ".metadata"  # written by DCP once every shard of a checkpoint is


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def temporary_step_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` is written before `publish` renames it into place."""
    return root / f".tmp_{step_dir_name(step)}"


def fsync_tree(path: Path) -> None:
    for parent, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(parent, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, payload: dict | str) -> None:
    """`payload` (text, or a dict as JSON) at `path`, whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(payload if isinstance(payload, str) else json.dumps(payload))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(tmp: Path, root: Path, step: int, marker: dict | None = None) -> Path:
    """Make the fully written `tmp` checkpoint `step` complete: mark it, fsync it, rename it into
    place (over an older one of the same step) and name it in `latest`. Returns its path."""
    final = root / step_dir_name(step)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, **(marker or {})}))
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / LATEST_NAME, final.name + "\n")
    return final


def read_marker(step_dir: Path) -> dict:
    """The COMPLETE marker of a checkpoint: its step, and what its writer recorded about the
    weights (`random_parts`: parts still at their random initialisation)."""
    try:
        return json.loads((Path(step_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE_MARKER).exists() and (p / _DCP_METADATA).exists())


def prune_checkpoints(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(root: Path) -> Path | None:
    """The checkpoint named by `latest`; if that is missing or incomplete, the newest complete one
    (with a warning). None only when no complete checkpoint exists."""
    complete = complete_checkpoints(root)
    latest_file = root / LATEST_NAME
    if latest_file.exists():
        named = root / latest_file.read_text().strip()
        if named in complete:
            return named
        if complete:
            warnings.warn(f"{latest_file} names {named.name}, which is not a complete checkpoint; "
                          f"resuming from {complete[-1].name} instead")
    elif complete:
        warnings.warn(f"{latest_file} is missing; resuming from {complete[-1].name}")
    return complete[-1] if complete else None


def resolve_native_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from a run dir, its `checkpoints/` dir, or a `step_N` dir."""
    if (path / _DCP_METADATA).exists():
        return path, path.parent.parent
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    latest = find_latest(root)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    return latest, root.parent


def write_run_config(run_dir: Path, config: dict) -> None:
    """The run's resolved config (`dataclasses.asdict` of it), as `config.yaml`."""
    write_atomic(Path(run_dir) / RUN_CONFIG_NAME, yaml.safe_dump(config, sort_keys=False))


def read_run_config(run_dir: Path):
    """The `Config` a run directory saved; FileNotFoundError when it has none."""
    from train.config.schema import Config, from_dict  # here: report readers need none of the schema

    config_file = Path(run_dir) / RUN_CONFIG_NAME
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: a native checkpoint needs its run's config.yaml")
    return from_dict(Config, yaml.safe_load(config_file.read_text()))
