"""Compose a recipe with Hydra (recipes/ + configs/ groups) and validate it."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import Config, ConfigError, build_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = PROJECT_ROOT / "recipes"
CONFIGS_DIR = PROJECT_ROOT / "configs"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("stage*.yaml"))


def compose_raw(config_name: str, overrides: list[str] | None = None) -> dict:
    """Hydra-compose `recipes/<config_name>.yaml` with overrides; returns a resolved plain dict."""
    if not (RECIPES_DIR / f"{config_name}.yaml").exists():
        raise ConfigError(f"no recipe named {config_name!r}; choose one of: {', '.join(list_recipes() + ['pipeline'])}")
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        try:
            cfg = compose(config_name, overrides=overrides + [f"hydra.searchpath=[file://{CONFIGS_DIR}]"])
        except Exception as err:  # Hydra's own errors already name the override; keep them short
            raise ConfigError(f"cannot compose {config_name} with {overrides}: {err}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:
        raise ConfigError(f"cannot resolve {config_name}: {err}") from None


def load_config(config_name: str, overrides: list[str] | None = None) -> Config:
    """Composed, validated config; data paths made absolute (relative to the working directory)
    so the saved config.yaml means the same thing from anywhere."""
    raw = compose_raw(config_name, overrides)
    data = raw.get("data", {})
    for key in ("synth_dir", "tokenizer"):
        if data.get(key):
            data[key] = os.path.abspath(data[key])
    for source in data.get("sources", []) if isinstance(data.get("sources"), list) else []:
        if isinstance(source, dict) and source.get("path"):
            source["path"] = os.path.abspath(source["path"])
    return build_config(raw)
