"""2 ranks (DDP and FSDP2, gloo; both with LoRA adapters too) take the same step as 1 rank on the same
global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.helpers import run_module

WORKER = str(Path(__file__).with_name("dp_step_worker.py"))


def one_rank(tmp_path: Path, mode: str) -> dict:
    single = tmp_path / "one.pt"
    one = run_module(["tests.integration.dp_step_worker", str(single), mode], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    return torch.load(single, weights_only=True)


def two_ranks(tmp_path: Path, mode: str) -> dict:
    double = tmp_path / f"two_{mode}.pt"
    two = run_module(["torch.distributed.run", "--nproc-per-node", "2", WORKER, str(double), mode], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    return torch.load(double, weights_only=True)


def assert_same_step(a: dict, b: dict) -> None:
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key].dtype == b["state"][key].dtype, key
        assert torch.allclose(a["state"][key].float(), b["state"][key].float(), rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank(tmp_path, data_parallel):
    assert_same_step(one_rank(tmp_path, data_parallel), two_ranks(tmp_path, data_parallel))


def test_two_ranks_with_adapters_equal_one_rank(tmp_path):
    """LoRA under bf16: the frozen base in bf16 beside fp32 adapters, which FSDP2 shards per parameter
    (only the trainable ones must share a dtype). One single-rank step is the reference for both."""
    reference = one_rank(tmp_path, "ddp+lora")
    # The step moved the adapters (B starts at zero), and the base stayed in bf16.
    assert any(".lora_B." in key and reference["state"][key].abs().sum() > 0 for key in reference["state"])
    assert {t.dtype for t in reference["state"].values()} == {torch.bfloat16, torch.float32}
    for data_parallel in ("ddp", "fsdp"):
        assert_same_step(reference, two_ranks(tmp_path, f"{data_parallel}+lora"))
