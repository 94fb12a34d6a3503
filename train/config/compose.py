"""Compose a recipe with Hydra (recipes/ + configs/ groups) and validate it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, get_type_hints

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines.training.config import paths_unchecked
from train.config.schema import Config, ConfigError, build_config
from train.engines import resolve_engine

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = PROJECT_ROOT / "recipes"
CONFIGS_DIR = PROJECT_ROOT / "configs"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("stage*.yaml"))


def list_groups() -> dict[str, list[str]]:
    """Config groups (configs/<group>/) and their options: what `group=option` can choose."""
    return {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in sorted(CONFIGS_DIR.iterdir()) if g.is_dir()}


def field_reference() -> dict[str, list[str]]:
    """Each section of the schema and its overridable fields (`section.field=value`)."""
    return {f.name: _field_names(f.name) or ["(a value)"] for f in dataclasses.fields(Config)}


def compose_yaml(config_name: str, overrides: list[str] | None = None, resolve: bool = False) -> str:
    """The composed recipe as YAML, interpolations kept unless `resolve` (Hydra's `--cfg job`)."""
    return OmegaConf.to_yaml(OmegaConf.create(compose_raw(config_name, overrides, resolve=resolve)))


def compose_raw(config_name: str, overrides: list[str] | None = None, resolve: bool = True) -> dict:
    """Hydra-compose `recipes/<config_name>.yaml` with overrides; returns a plain dict (resolved
    unless `resolve=False`)."""
    if not (RECIPES_DIR / f"{config_name}.yaml").exists():
        raise ConfigError(f"no recipe named {config_name!r}; choose one of: {', '.join(list_recipes() + ['pipeline'])}")
    for override in overrides or []:
        _check_group_choice(override)
    overrides = [_add_or_override(o) for o in overrides or []]
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        try:
            cfg = compose(config_name, overrides=overrides + [f"hydra.searchpath=[file://{CONFIGS_DIR}]"])
        except Exception as err:  # Hydra's own errors already name the override; keep them short
            raise ConfigError(f"cannot compose {config_name} with {overrides}: {err}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=resolve)
    except Exception as err:
        raise ConfigError(f"cannot resolve {config_name}: {err}") from None


def _check_group_choice(override: str) -> None:
    """`smoke=cpuu` names no option of the `smoke` group: say so (Hydra skips an optional group's
    unknown choice silently, and the run then fails somewhere unrelated)."""
    key, sep, value = override.partition("=")
    key = key.lstrip("+~")
    group = CONFIGS_DIR / key
    if not sep or "." in key or not group.is_dir() or value in ("null", ""):
        return
    options = sorted(p.stem for p in group.glob("*.yaml"))
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not an option of the {key} group; choose one of: {', '.join(options)}")


def _is_schema_field(dotted: str) -> bool:
    """Whether `a.b.c` names a field of the Config dataclass tree."""
    node: Any = Config
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        node = get_type_hints(node)[part]
    return True


def _add_or_override(override: str) -> str:
    """`trainer.deterministic=false` works even when no YAML spells that field out: a plain
    override of a schema field becomes Hydra's add-or-override (`++`). Group choices
    (`smoke=cpu`) and unknown keys are left for Hydra and the schema to judge."""
    key, sep, _ = override.partition("=")
    if not sep or key.startswith(("+", "~")) or "." not in key:
        return override
    if not _is_schema_field(key):
        parent = key.rsplit(".", 1)[0]
        raise ConfigError(f"unknown field {key} in override {override!r}; valid fields of {parent}: "
                          f"{', '.join(_field_names(parent)) or '(none: not a section)'}")
    return "++" + override


def _field_names(dotted: str) -> list[str]:
    node: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return []
        node = get_type_hints(node)[part]
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []


def load_config(config_name: str, overrides: list[str] | None = None, check_paths: bool = True) -> Config:
    """Composed, validated config; data paths made absolute (relative to the working directory)
    so the saved config.yaml means the same thing from anywhere. `check_paths=False` validates
    everything but whether data, tokenizer and checkpoint paths exist (a dry run on a laptop)."""
    raw = compose_raw(config_name, overrides)
    data = raw.get("data", {})
    for key in ("synth_dir", "tokenizer"):
        if data.get(key):
            data[key] = os.path.abspath(data[key])
    for source in data.get("sources", []) if isinstance(data.get("sources"), list) else []:
        if isinstance(source, dict) and source.get("path"):
            source["path"] = os.path.abspath(source["path"])
    with contextlib.nullcontext() if check_paths else paths_unchecked():
        return build_config(raw, lambda impl: resolve_engine(impl).validate)
