"""The parallel layout: rank coordinates and groups (megatron-core's default "tp-cp-dp-pp" order)."""

from __future__ import annotations

import pytest

from train.config.schema import ConfigError
from train.parallel.dims import Coordinates, ParallelDims


def test_coordinates_follow_tensor_context_data_pipeline_order():
    dims = ParallelDims(world_size=16, tensor=2, context=2, pipeline=2)
    assert dims.data == 2
    assert dims.coordinates(0) == Coordinates(0, 0, 0, 0)
    assert dims.coordinates(1) == Coordinates(1, 0, 0, 0)  # tensor peers are adjacent ranks
    assert dims.coordinates(2) == Coordinates(0, 1, 0, 0)
    assert dims.coordinates(4) == Coordinates(0, 0, 1, 0)
    assert dims.coordinates(8) == Coordinates(0, 0, 0, 1)  # pipeline stages outermost
    assert [dims.rank_of(dims.coordinates(r)) for r in range(16)] == list(range(16))


def test_groups_partition_the_world():
    dims = ParallelDims(world_size=8, tensor=2, context=2)
    for name in ("tensor", "context", "data", "pipeline", "data_context", "world"):
        groups = dims.group_ranks(name)
        assert sorted(r for g in groups for r in g) == list(range(8)), name
    assert dims.group_ranks("tensor") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.group_ranks("context") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.group_ranks("data") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.group_ranks("data_context") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.group_ranks("pipeline") == [[r] for r in range(8)]
    assert dims.group_ranks("world") == [list(range(8))]


def test_native_layout_makes_every_rank_a_replica():
    dims = ParallelDims(world_size=4)
    assert dims.data == 4 and dims.group_ranks("data") == [[0, 1, 2, 3]]
    assert [dims.coordinates(r).data for r in range(4)] == [0, 1, 2, 3]


def test_a_world_that_does_not_divide_the_layout_is_refused():
    with pytest.raises(ConfigError, match="world size must be a multiple"):
        ParallelDims(world_size=6, tensor=4)
    with pytest.raises(ConfigError, match="tensor_parallel=0"):
        ParallelDims(world_size=2, tensor=0)


def test_layout_matches_megatron_core_rank_generator():
    """Our rank order is megatron-core's default, so its groups and ours name the same ranks."""
    from megatron.core.parallel_state import RankGenerator

    for tp, cp, pp, world in [(2, 1, 1, 8), (2, 2, 1, 8), (2, 2, 2, 16), (4, 1, 2, 16)]:
        dims = ParallelDims(world, tp, cp, pp)
        generator = RankGenerator(tp=tp, ep=1, dp=dims.data, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        for ours, theirs in [("tensor", "tp"), ("context", "cp"), ("data", "dp"), ("pipeline", "pp"),
                             ("data_context", "cp-dp")]:
            assert dims.group_ranks(ours) == sorted(sorted(g) for g in generator.get_ranks(theirs)), (ours, tp, cp, pp)
