"""2 ranks (DDP and FSDP2, gloo; DDP with LoRA adapters) take the same step as 1 rank on the same
global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.helpers import run_module

WORKER = str(Path(__file__).with_name("dp_step_worker.py"))


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp", "ddp+lora"])
def test_two_ranks_equal_one_rank(tmp_path, data_parallel):
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    one = run_module(["tests.integration.dp_step_worker", str(single), data_parallel], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_module(["torch.distributed.run", "--nproc-per-node", "2", WORKER, str(double), data_parallel], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.allclose(a["state"][key], b["state"][key], rtol=1e-5, atol=1e-6), key
    if data_parallel == "ddp+lora":  # the step moved the adapters (B starts at zero)
        assert any(".lora_B." in key and a["state"][key].abs().sum() > 0 for key in a["state"])
