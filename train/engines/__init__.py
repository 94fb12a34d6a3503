"""One room per engine behind one protocol (`base.Engine`):

  native/   the plain-torch language model of `train.model`, data parallel by DDP / FSDP2
  mcore/    the language model on megatron-core: tensor, sequence, context and pipeline
            parallelism, its FP8, its state layout and its config rules

An engine decides what differs between the two: its config rules, process groups, the language
model, how its state reaches a checkpoint, precision, data parallelism and the step's micro-batch
schedule. `resolve_engine` is the one place that maps `model.impl` to an engine; nothing else asks
which engine it runs on (the vision tower, projector, loss, optimizer, data and callbacks are shared).
`assembly.assemble` drives an engine through the one order every stage is built in, for the trainer,
`train.plan --measure` and chat.
"""

from __future__ import annotations

import importlib

from train.engines.base import Engine

__all__ = ["ENGINES", "Engine", "resolve_engine"]

# model.impl -> the module holding that engine's `ENGINE`, imported on first use (megatron-core is
# heavy and never needed by a native run).
ENGINES = {"native": "train.engines.native", "mcore": "train.engines.mcore.engine"}


def resolve_engine(impl: str) -> Engine:
    if impl not in ENGINES:
        raise ValueError(f"model.impl={impl!r}: choose one of {list(ENGINES)}")
    return importlib.import_module(ENGINES[impl]).ENGINE
