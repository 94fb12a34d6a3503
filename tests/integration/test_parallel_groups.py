"""The parallel seam on real processes (torchrun, gloo): each reduction runs over its group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import run_module
from train.parallel.dims import ParallelDims

WORKER = str(Path(__file__).with_name("parallel_groups_worker.py"))


def members_sum(ranks: list[int]) -> float:
    return float(sum(10.0 ** r for r in ranks))


@pytest.mark.parametrize("tensor,context,engine", [(2, 1, "native"), (2, 2, "native"), (2, 2, "mcore")])
def test_reductions_follow_the_layout(tmp_path, tensor, context, engine):
    """The seam's own groups, and megatron-core's groups adopted by the seam, reduce alike."""
    world = 4
    out = tmp_path / "result"
    result = run_module(["torch.distributed.run", "--nproc-per-node", str(world), WORKER, str(out), str(tensor),
                         str(context), engine], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dims = ParallelDims(world, tensor, context)
    for rank in range(world):
        got = json.loads(Path(f"{out}.{rank}.json").read_text())
        assert got["data_rank"] == dims.coordinates(rank).data and got["data_size"] == world // (tensor * context)
        for group, expected in got["sums"].items():
            members = next(g for g in dims.group_ranks(group) if rank in g)
            assert expected == members_sum(members), (rank, group)
        # Each replica counts once, however many ranks it spans.
        assert got["counts"] == {"samples": sum(1 + d for d in range(dims.data))}
