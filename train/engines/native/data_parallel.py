"""Data parallelism around the whole model: DDP, or FSDP2 (`fully_shard`) with every layer and
block a shard unit. The megatron-core engine wraps its non-pipelined layouts with the same DDP."""

from __future__ import annotations

from torch import nn

from train.config.schema import ParallelConfig
from train.parallel.distributed import DistInfo


def wrap_data_parallel(model: nn.Module, parallel: ParallelConfig, info: DistInfo) -> nn.Module:
    """Apply data parallelism; returns the module to call for the forward.

    fsdp (FSDP2 `fully_shard`): each LM layer, each ViT block, the projector and the vision and
    language models are shard units, then the root; parameters become DTensors in place, so the
    optimizer must be built after this. ddp: a wrapper around the unchanged model.
    """
    if info.gradient_replicas == 1:
        return model
    if parallel.data_parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.language_model.backbone.layers:
            fully_shard(layer)
        for block in model.vision_model.blocks:
            fully_shard(block)
        fully_shard(model.projector)
        fully_shard(model.vision_model)
        fully_shard(model)
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    # A text-only micro-batch leaves the (trainable) vision side without gradients; DDP must know,
    # or its buckets for those parameters are never reduced and ranks silently diverge.
    # Gradients are averaged over the data-parallel replicas and their context-parallel peers (each
    # of which saw a slice of the rows); tensor-parallel peers hold other shards.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True,
                                               process_group=info.groups.get("data_context"))
