"""`python -m train`'s Hydra-style query flags: --cfg job|all [--resolve], --info, and --help's field list."""

from __future__ import annotations

import pytest
import yaml

from train.__main__ import main

SMOKE = ["--config-name", "stage1_image_sft", "smoke=cpu", "optim.lr=1e-5"]


def test_cfg_job_prints_the_composed_config_without_running(capsys, tmp_path):
    assert main([*SMOKE, f"run.dir={tmp_path / 'never'}", "--cfg", "job"]) == 0
    text = capsys.readouterr().out
    composed = yaml.safe_load(text)
    assert composed["optim"]["lr"] == 1e-5 and composed["model"]["name"] == "tiny"
    assert "${data.smoke_sources}" in text  # interpolations as written, as Hydra shows them
    assert not (tmp_path / "never").exists()
    assert main([*SMOKE, "--cfg=all", "--resolve"]) == 0
    resolved = capsys.readouterr().out
    assert "${" not in resolved and yaml.safe_load(resolved)["data"]["sources"][0]["name"]


def test_info_and_help_name_groups_and_fields(capsys):
    assert main(["--info"]) == 0
    out = capsys.readouterr().out
    assert "smoke=cpu|gpu" in out and "stage4_long_context" in out
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--cfg job" in out and "precision=bf16|" in out
    assert "optim: beta1, beta2, clip_grad" in out and "min_lr_ratio" in out


def test_bad_cfg_value_and_unknown_options_exit_with_usage():
    with pytest.raises(SystemExit, match="choose one of job, all"):
        main([*SMOKE, "--cfg", "hydra"])
    with pytest.raises(SystemExit, match="unknown option --nonsense"):
        main([*SMOKE, "--nonsense"])
