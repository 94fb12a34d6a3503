from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from train.checkpoint import (
    complete_checkpoints, find_latest, load_checkpoint, load_model_weights, save_checkpoint,
)


def model_and_optim(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_model_optimizer_rng_and_state(tmp_path):
    model, opt = model_and_optim()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3, "data": {"draws": 7}}, keep_last=2)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    other, other_opt = model_and_optim(seed=1)
    saved = load_checkpoint(find_latest(tmp_path), other, other_opt)
    assert saved == {"step": 3, "data": {"draws": 7}}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_latest_pruning_and_fallback_on_corruption(tmp_path):
    model, opt = model_and_optim()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000003"
    # A newest checkpoint missing its marker (crash mid-write) is never chosen.
    (tmp_path / "step_0000003" / "COMPLETE").unlink()
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert find_latest(tmp_path).name == "step_0000002"
    (tmp_path / "latest").unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert find_latest(tmp_path).name == "step_0000002"


def test_weights_only_load_for_stage_handoff(tmp_path):
    model, opt = model_and_optim()
    path = save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=1)
    fresh, _ = model_and_optim(seed=3)
    load_model_weights(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_no_checkpoint_means_none(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_latest(tmp_path / "nothing") is None
