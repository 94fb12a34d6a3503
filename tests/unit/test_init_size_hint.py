"""What a start from a native checkpoint of another size tells the user to set: a model group only
when it exists, else the model.* fields the checkpoint's config.yaml gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from train.checkpoint.files import write_run_config
from train.config.schema import Config, ModelConfig, from_dict
from train.engines.assembly import size_mismatch_fix

TINY = yaml.safe_load(Path("configs/model/tiny.yaml").read_text())


def run_dir_trained_as(tmp_path: Path, name: str, **language_model) -> Path:
    model = from_dict(ModelConfig, {**TINY, "name": name, "language_model": {**TINY["language_model"], **language_model}})
    write_run_config(tmp_path, dataclasses.asdict(Config(model=model)))
    return tmp_path


def test_a_model_group_that_exists_is_named_with_the_fields(tmp_path):
    recipe = from_dict(ModelConfig, {**TINY, "name": "wide", "language_model": {**TINY["language_model"],
                                                                                 "hidden_size": 96}})
    fix = size_mismatch_fix(recipe, run_dir_trained_as(tmp_path, "tiny"))
    assert "set model=tiny, or those model.* fields" in fix
    assert "model.language_model.hidden_size=96 here, 64 there" in fix and "(now model=wide)" in fix


def test_a_name_that_is_no_model_group_is_not_offered(tmp_path):
    recipe = from_dict(ModelConfig, TINY)
    fix = size_mismatch_fix(recipe, run_dir_trained_as(tmp_path, "lm+radio", mlp_hidden_size=256))
    assert "model=lm+radio" not in fix
    assert fix.startswith("its config.yaml describes another model (model.language_model.mlp_hidden_size=128 here, "
                          "256 there): set those model.* fields to its values")
    assert "compose" not in fix  # not a composed checkpoint: no compose flag to offer
