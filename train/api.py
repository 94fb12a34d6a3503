"""Public Python API.

`load_language_model(path)` returns the hybrid LM of a native checkpoint as an eval-mode module:
`module(input_ids, cu_seqlens=None)` -> logits (B, L, V); with `cu_seqlens` (int32 boundaries over
a B == 1 packed row) the samples are isolated.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
import yaml

from train.checkpoint import dcp_quietly, find_latest
from train.config import Config, from_dict
from train.model.language_model import HybridLanguageModel


def resolve_native_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from a run dir, its `checkpoints/` dir, or a `step_N` dir."""
    if (path / ".metadata").exists():
        return path, path.parent.parent
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = find_latest(root)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    return latest, root.parent


def load_language_model(path: str | Path) -> HybridLanguageModel:
    path = Path(path)
    if (path / "config.json").exists():
        raise NotImplementedError(
            f"{path} looks like a transformers checkpoint; HF Nemotron-H import (train.convert hf-to-native) "
            "is not built yet: pass a native run or checkpoint directory")
    checkpoint, run_dir = resolve_native_checkpoint(path)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: a native checkpoint needs its run's config.yaml")
    cfg = from_dict(Config, yaml.safe_load(config_file.read_text()))
    model = HybridLanguageModel(cfg.model.language_model)
    # Load only the language model's keys out of the full VLM checkpoint.
    state = {"model": {f"language_model.{k}": v for k, v in model.state_dict().items()}}
    with dcp_quietly():
        dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in state["model"].items()})
    return model.eval()
