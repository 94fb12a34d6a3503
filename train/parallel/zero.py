"""`parallel.distributed_optimizer=true`: AdamW state sharded over the data-parallel ranks (ZeRO-1,
the memory of megatron-core's distributed optimizer).

Every parameter is owned by one rank of its gradient-averaging group (data x context, see
`train.parallel.dims`); parameters are dealt to owners largest first, so each holds about 1/N of
the fp32 moments. After the gradients are averaged (data-parallel wrapping), each rank updates only
the parameters it owns, then every parameter is broadcast from its owner. The owned parameters form
an ordinary `torch.optim.AdamW`, so checkpoints see a plain optimizer over a subset: each rank
saves and loads the state of what it owns, and a checkpoint resumes at any data-parallel size (or
unsharded) because the state is keyed by parameter name.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def assign_owners(params: list[nn.Parameter], size: int) -> list[int]:
    """Owner (0..size-1) of each parameter: largest first, each to the least-loaded rank."""
    load = [0] * size
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        owner = min(range(size), key=lambda r: load[r])
        owners[i] = owner
        load[owner] += params[i].numel()
    return owners


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over the parameters this rank owns; `step` then broadcasts every parameter from its owner."""

    def __init__(self, param_groups: list[dict], group, **defaults):
        self.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.all_params = [p for g in param_groups for p in g["params"]]
        owners = assign_owners(self.all_params, size)
        # Owners as global ranks (broadcast's `src`), in the same order on every rank.
        self.sources = [dist.get_global_rank(group, o) for o in owners]
        owned = {id(p) for p, o in zip(self.all_params, owners) if o == rank}
        mine = [{**g, "params": [p for p in g["params"] if id(p) in owned]} for g in param_groups]
        super().__init__([g for g in mine if g["params"]] or [{"params": []}], **defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for param, source in zip(self.all_params, self.sources):
            dist.broadcast(param.data, src=source, group=self.group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.all_params:  # also the parameters another rank updates
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()
