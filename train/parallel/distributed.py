"""Process groups from the torchrun environment (gloo on CPU, nccl on GPU), the data-parallel
wrapper, and the reductions the loop needs, each over a named group (`train.parallel.dims`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from train.config.schema import ParallelConfig
from train.parallel.dims import GroupName, ParallelDims, ProcessGroups


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # The layout; default: every rank is a data-parallel replica (the native engine).
    dims: ParallelDims | None = None
    groups: ProcessGroups | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.dims is None:
            object.__setattr__(self, "dims", ParallelDims(self.world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which data-parallel replica this rank belongs to: ranks of one replica read the same samples."""
        return self.dims.coordinates(self.rank).data

    @property
    def data_size(self) -> int:
        return self.dims.data

    @property
    def gradient_replicas(self) -> int:
        """Ranks whose gradients of the same parameters are averaged: data x context parallel."""
        return self.dims.data * self.dims.context


GroupFactory = Callable[[ParallelDims, int, torch.device], ProcessGroups]


def init_distributed(parallel: ParallelConfig, device_name: str, always: bool = False,
                     make_groups: GroupFactory | None = None) -> DistInfo:
    """Join the torchrun world and build the process group of every parallel dimension (with
    `make_groups` when an engine builds them itself). A lone process makes a 1-rank process group
    only when `always` (megatron-core needs one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but CUDA is not available; set trainer.device=cpu")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if (world_size > 1 or always) and not dist.is_initialized():
        backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
        if world_size == 1:  # launched without torchrun: a private 1-rank rendezvous
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    dims = ParallelDims(world_size, parallel.tensor_parallel, parallel.context_parallel, parallel.pipeline_parallel)
    groups = make_groups(dims, rank, device) if make_groups is not None else ProcessGroups(dims, rank)
    global _GROUPS
    _GROUPS = groups
    return DistInfo(rank, world_size, local_rank, device, dims, groups)


# This process's groups, from `init_distributed` to `shutdown`: for state that reduces without a
# DistInfo at hand (FP8 amaxes, the preemption flag), always over a named group.
_GROUPS: ProcessGroups | None = None


def process_group(name: GroupName):
    """This process's `name` group of the running layout; None when it is alone in it, or outside a
    distributed run (a reduction over it is then the identity)."""
    return _GROUPS.get(name) if _GROUPS is not None else None


def world_rank() -> int:
    """This process's rank in the whole job (0 outside a distributed run): for the few things one
    process does for all (a checkpoint's rename and `latest`), never for choosing data."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier(group: GroupName = "world") -> None:
    """The ranks of this rank's `group` wait for each other (nothing when it is alone in it)."""
    process_group_ = process_group(group)
    if process_group_ is not None:
        dist.barrier(group=process_group_)


def all_reduce_max_(tensor: torch.Tensor, group: GroupName) -> torch.Tensor:
    """`tensor`, in place, the elementwise maximum over this rank's `group`."""
    process_group_ = process_group(group)
    if process_group_ is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=process_group_)
    return tensor


def all_reduce_sum(value: float, info: DistInfo, group: GroupName) -> float:
    """`value` summed over the ranks of this rank's `group` (see `train.parallel.dims`)."""
    return float(all_reduce_tensor_sum(torch.tensor([value], dtype=torch.float64), info, group).item())


def all_reduce_tensor_sum(values: torch.Tensor, info: DistInfo, group: GroupName) -> torch.Tensor:
    """A CPU tensor summed elementwise over the ranks of this rank's `group` (a CPU tensor back)."""
    process_group = info.groups.get(group) if info.groups is not None else None
    if info.world_size == 1 or process_group is None:
        return values
    t = values.to(info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, group=process_group)
    return t.cpu()


def finalize_tensor_parallel_grads(params: list[nn.Parameter], info: DistInfo) -> None:
    """Under sequence parallelism each tensor-parallel rank applies the norms to its slice of the
    sequence, so their gradients (parameters tagged `sequence_parallel`) are partial: sum them."""
    group = info.groups.get("tensor") if info.groups is not None else None
    if group is None:
        return
    for p in params:
        if p.grad is not None and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=group)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, info: DistInfo) -> float:
    """Clip to `max_norm` by the norm of the whole model's gradient; returns that norm.

    With tensor parallelism a parameter split over the ranks (tagged `tensor_model_parallel`, as
    megatron tags them) counts each rank's part once, and a parameter every rank holds whole counts
    once, as it does in the model the ranks hold together; pipeline stages each add their own
    layers. Otherwise: torch's clip_grad_norm_."""
    tensor = info.groups.get("tensor") if info.groups is not None else None
    pipeline = info.groups.get("pipeline") if info.groups is not None else None
    if tensor is None and pipeline is None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
    grads = [p for p in params if p.grad is not None]
    split = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    for p in grads:
        square = p.grad.detach().double().square().sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            split += square
        else:
            whole += square
    if tensor is not None:
        dist.all_reduce(split, group=tensor)
    squares = split + whole
    if pipeline is not None:
        dist.all_reduce(squares, group=pipeline)
    total = float(squares.sqrt())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:
        for p in grads:
            p.grad.mul_(coefficient)
    return total


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients over the data (and context) parallel replicas, as DDP does, in one flat
    all-reduce per dtype: for a pipeline, which runs without the DDP wrapper."""
    group = info.groups.get("data_context") if info.groups is not None else None
    if group is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat /= info.gradient_replicas
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def shutdown() -> None:
    global _GROUPS
    _GROUPS = None
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_count_tables(tables: dict[str, dict[str, int]], info: DistInfo) -> dict[str, dict[str, int]]:
    """Each {key: count} table summed over the data-parallel replicas, in one gather (every rank must
    call it). Ranks of one replica read the same samples, so only the data group is summed: nothing
    counts twice."""
    process_group = info.groups.get("data") if info.groups is not None else None
    if info.world_size == 1 or process_group is None:
        return {name: dict(counts) for name, counts in tables.items()}
    gathered: list = [None] * info.data_size
    dist.all_gather_object(gathered, {name: dict(counts) for name, counts in tables.items()}, group=process_group)
    totals: dict[str, dict[str, int]] = {}
    for name in tables:
        total: dict[str, int] = {}
        for part in gathered:
            for key, value in part[name].items():
                total[key] = total.get(key, 0) + value
        totals[name] = dict(sorted(total.items()))
    return totals


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
