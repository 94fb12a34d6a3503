"""How a model's and optimizer's state reach a checkpoint: the checkpoint always holds the native
layout (whole tensors under the native model's names), whatever engine and parallel layout wrote it,
so a checkpoint moves between engines, layouts and tools (HF export, `train.api`) unchanged.

`NativeLayout` is torch's state-dict API (DDP and FSDP2 aware). An engine whose parameters are
laid out otherwise (megatron-core's tensor-parallel shards: `train.engines.mcore.state`) supplies
its own with the same four methods.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


class StateLayout(Protocol):
    def state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state, optimizer state) in the native layout."""

    def load_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                   optim_state: dict) -> None: ...

    def model_state(self, model: torch.nn.Module) -> dict: ...

    def load_model_state(self, model: torch.nn.Module, state: dict, strict: bool = True) -> None: ...


class NativeLayout:
    def state(self, model, optimizer):
        return get_state_dict(model, optimizer)

    def load_state(self, model, optimizer, model_state, optim_state):
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)

    def model_state(self, model):
        return get_model_state_dict(model)

    def load_model_state(self, model, state, strict=True):
        set_model_state_dict(model, state, options=StateDictOptions(strict=strict))


class TrainableOnlyLayout(NativeLayout):
    """Adapter training (`peft`): the checkpoint holds the trainable tensors (adapters, the parts that
    train whole) and their optimizer state, never the frozen base (a few MB instead of the model).
    Model-only reads and writes (`model_state`) stay whole: the base is loaded before adapters exist."""

    options = StateDictOptions(ignore_frozen_params=True)

    def state(self, model, optimizer):
        return get_state_dict(model, optimizer, options=self.options)

    def load_state(self, model, optimizer, model_state, optim_state):
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
