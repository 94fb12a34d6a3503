"""The protocol every engine implements: what differs between running the language model as plain
torch modules (`native`) and on megatron-core (`mcore`). Everything else (data, the vision tower
and projector, loss, optimizer, checkpoints, callbacks) is shared and engine-blind.

The assembly (`train.engines.assembly.assemble`) calls these in its fixed order; the trainer calls
`init_distributed` first and `step_schedule` once the optimizer exists.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from train.checkpoint.layout import StateLayout
from train.config.schema import Config, ParallelConfig, PrecisionConfig
from train.parallel.distributed import DistInfo
from train.precision import Precision


class Engine(Protocol):
    name: str  # the `model.impl` value that selects it

    def validate(self, cfg: Config) -> None:
        """This engine's rules on the composed config (raises ConfigError naming the field to set),
        on top of the schema's engine-blind checks."""

    def init_distributed(self, cfg: Config) -> DistInfo:
        """Join the torchrun world and build the process group of every parallel dimension."""

    def build_language_model(self, cfg: Config, device: torch.device) -> dict:
        """Keyword arguments for `VisionLanguageModel`: its language model and loss when this engine
        supplies its own, {} for the native modules."""

    def state_layout(self, model: nn.Module) -> StateLayout:
        """How the model's and optimizer's state reach the (native-layout) checkpoint."""

    def apply_adapters(self, model: nn.Module, cfg: Config) -> list[str]:
        """`peft` adapters on the loaded model's targeted linears; returns the adapted module names
        (native spelling, whatever the engine)."""

    def base_fingerprint(self, model: nn.Module) -> str:
        """`train.engines.native.adapters.base_fingerprint` of the model's native-layout weights."""

    def adapter_layout(self, model: nn.Module) -> StateLayout:
        """The layout of an adapter run's checkpoints: trainable tensors only, native names."""

    def cast_frozen_base(self, model: nn.Module, dtype: torch.dtype) -> None:
        """`peft.base_dtype=compute`: the frozen linears' weights to the compute dtype."""

    def build_precision(self, cfg: PrecisionConfig, device: torch.device) -> Precision: ...

    def parallelize(self, model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
        """Data parallelism around the (converted, compiled) model; returns the module to call."""

    def step_schedule(self, model: nn.Module, info: DistInfo, precision: Precision):
        """The micro-batch schedule of a step: None for plain forward/backward per micro-batch, or
        an object with `train(batches, scale)` and `loss(batch)` (1F1B pipeline stages)."""

    def sharding(self, parallel: ParallelConfig) -> str:
        """What a data-parallel rank shards of the training state, in words (`train.plan`)."""
