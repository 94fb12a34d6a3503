"""`trainer.cpu_threads`: an explicit count wins, then OMP_NUM_THREADS (torchrun's), then the cores
this process may use shared among the node's processes; torch's default (every core) never."""

from __future__ import annotations

import os

import pytest
import torch

from train.loop.trainer import set_cpu_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configured_then_omp_then_cores_per_local_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_cpu_threads(5) == (5, "trainer.cpu_threads") and torch.get_num_threads() == 5
    assert set_cpu_threads(0) == (3, "OMP_NUM_THREADS") and torch.get_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert set_cpu_threads(0) == (2, "8 cores available / 4 processes on this node") and torch.get_num_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than cores: one thread each, never zero
    assert set_cpu_threads(0)[0] == 1


def test_a_negative_count_is_refused():
    from train.config.compose import load_config
    from train.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"trainer\.cpu_threads=-1: set 0 \(automatic\)"):
        load_config("stage1_image_sft", ["smoke=cpu", "trainer.cpu_threads=-1"], check_paths=False)
