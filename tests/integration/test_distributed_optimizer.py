"""parallel.distributed_optimizer=true (torchrun, gloo): Adam's state sharded over the data-parallel
ranks takes the same steps as the unsharded optimizer, holds about 1/N of the state per rank, and
its checkpoints resume unsharded on another number of ranks, optimizer state included; with the
megatron-core engine at TP=2 x DP=2 (4 processes) it equals plain data parallelism."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.integration.helpers import read_metrics, run_module

STAGE = ["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "optim.schedule=constant",
         "logger.progress_bar=false", "optim.eps=1e-4"]


def torchrun(ranks: int) -> list[str]:
    return ["torch.distributed.run", "--nproc-per-node", str(ranks), "-m"]


def run(tmp_path, ranks: int, run_dir, *overrides: str) -> str:
    result = run_module([*torchrun(ranks), *STAGE, f"run.dir={run_dir}", *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def plain_two_ranks(tmp_path_factory):
    """Three steps of plain data parallelism on two ranks: the reference of both tests."""
    cwd = tmp_path_factory.mktemp("plain")
    run(cwd, 2, cwd / "run", "trainer.max_steps=3")
    return cwd / "run"


def test_sharded_adam_steps_as_unsharded_and_resumes_unsharded(tmp_path, plain_two_ranks):
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    out = run(tmp_path, 2, sharded, "trainer.max_steps=3", "parallel.distributed_optimizer=true")
    held, total = (int(x.replace(",", "")) for x in re.search(r"rank 0 holds ([\d,]+) of ([\d,]+)", out).groups())
    assert 0.4 * total < held < 0.6 * total, (held, total)
    shutil.copytree(plain_two_ranks, plain)  # resumed below: the shared reference stays as it is
    assert losses(sharded) == losses(plain)
    # Both resume on one rank without sharding: the same optimizer state gives the same steps.
    for run_dir in (sharded, plain):
        run(tmp_path, 1, run_dir, "trainer.max_steps=6")
    assert [m["step"] for m in read_metrics(sharded)] == list(range(1, 7))
    assert losses(sharded) == losses(plain)


def test_mcore_tp2_dp2_with_distributed_optimizer_equals_plain_data_parallel(tmp_path, plain_two_ranks):
    """Same two data-parallel replicas reading the same rows: TP=2 in each, Adam sharded over the
    replicas, against the native engine's plain DDP."""
    run(tmp_path, 4, tmp_path / "tp2dp2", "trainer.max_steps=3", "model.impl=mcore", "parallel.tensor_parallel=2",
        "parallel.distributed_optimizer=true")
    got, expected = losses(tmp_path / "tp2dp2"), losses(plain_two_ranks)
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, expected)), (got, expected)
