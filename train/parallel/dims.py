"""The parallel layout: data / tensor / context / pipeline sizes, each rank's place in it, and the
process group of every dimension.

Ranks are laid out as megatron-core lays them out by default (order "tp-cp-dp-pp"): tensor-parallel
peers are adjacent ranks (one node's fast links), then context-parallel peers, then data-parallel
replicas, with pipeline stages outermost. `rank = tp + T * (cp + C * (dp + D * pp))`.

Which group a reduction runs over follows from what the ranks of a group hold:
- ranks of one data-parallel replica (same `dp`) read the same samples, so sample, token and skip
  counts and the loss weights of a batch are summed over the `data` group only;
- context-parallel peers each hold a slice of every packed row, so the loss sum is reduced over
  `data_context` (data x context);
- the data position in checkpoints is one per data-parallel rank.
The native engine runs with tensor = context = pipeline = 1, where `data` is every rank.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist

from train.config.schema import ConfigError

Dimension = Literal["tensor", "context", "data", "pipeline"]
GroupName = Literal["tensor", "context", "data", "pipeline", "data_context", "world"]


@dataclass(frozen=True)
class Coordinates:
    tensor: int
    context: int
    data: int
    pipeline: int


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tensor: int = 1
    context: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor", "context", "pipeline"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}_parallel={getattr(self, name)} must be >= 1")
        model_parallel = self.tensor * self.context * self.pipeline
        if self.world_size % model_parallel:
            raise ConfigError(
                f"{self.world_size} ranks cannot hold tensor_parallel={self.tensor} x context_parallel={self.context} "
                f"x pipeline_parallel={self.pipeline} = {model_parallel}: the world size must be a multiple of it")

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.context * self.pipeline)

    def sizes(self) -> dict[Dimension, int]:
        return {"tensor": self.tensor, "context": self.context, "data": self.data, "pipeline": self.pipeline}

    def coordinates(self, rank: int) -> Coordinates:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        tp, rest = rank % self.tensor, rank // self.tensor
        cp, rest = rest % self.context, rest // self.context
        dp, pp = rest % self.data, rest // self.data
        return Coordinates(tp, cp, dp, pp)

    def rank_of(self, coords: Coordinates) -> int:
        return coords.tensor + self.tensor * (coords.context + self.context * (coords.data + self.data * coords.pipeline))

    def group_ranks(self, group: GroupName) -> list[list[int]]:
        """Every group of one kind, as rank lists: the ranks that differ only in the group's dimensions."""
        varying = {"world": ("tensor", "context", "data", "pipeline"), "data_context": ("context", "data")}.get(
            group, (group,))
        sizes = self.sizes()
        fixed = [d for d in sizes if d not in varying]
        groups = []
        for fixed_values in itertools.product(*(range(sizes[d]) for d in fixed)):
            members = []
            for varying_values in itertools.product(*(range(sizes[d]) for d in varying)):
                coords = dict(zip(fixed, fixed_values)) | dict(zip(varying, varying_values))
                members.append(self.rank_of(Coordinates(**coords)))
            groups.append(sorted(members))
        return sorted(groups)


class ProcessGroups:
    """The torch.distributed group of each kind that contains this rank (None in a 1-rank world,
    where every reduction is the identity). Every rank must build them together: creating a group
    is a collective over the whole world."""

    def __init__(self, dims: ParallelDims, rank: int):
        self.dims, self.rank = dims, rank
        self._groups: dict[str, object] = {}
        if dims.world_size == 1:
            return
        for name in ("tensor", "context", "data", "pipeline", "data_context"):
            for ranks in dims.group_ranks(name):  # type: ignore[arg-type]
                if len(ranks) == 1:  # same decision on every rank, so skipping stays collective
                    continue
                group = dist.new_group(ranks) if len(ranks) < dims.world_size else dist.group.WORLD
                if rank in ranks:
                    self._groups[name] = group
        self._groups["world"] = dist.group.WORLD

    @classmethod
    def adopt(cls, dims: ParallelDims, rank: int, groups: dict[str, object]) -> "ProcessGroups":
        """The groups another library built for the same layout (megatron-core's, for
        `model.impl=mcore`), so each group exists once; groups of one rank are dropped."""
        adopted = cls(ParallelDims(1), 0)
        adopted.dims, adopted.rank = dims, rank
        adopted._groups = {name: g for name, g in groups.items() if g is not None and dist.get_world_size(g) > 1}
        return adopted

    def get(self, name: GroupName):
        """The group, or None when this rank is alone in it (a reduction over it is the identity)."""
        return self._groups.get(name)
