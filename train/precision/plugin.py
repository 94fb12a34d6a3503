"""The precision plugin interface, and its plain fp32 / bf16 implementation.

The trainer talks to every precision through these methods only: swap modules once after the
model is on its device (before the optimizer and DDP see it), run each forward under `autocast()`,
call `after_optimizer_step()` after every optimizer step, log `step_metrics()`, and checkpoint
`state_dict()` (tensors only, keys containing `amax_history` / `scale` for FP8).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from train.config.schema import PrecisionConfig


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper, so names carry no `module.` prefix."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Precision:
    """fp32 or bf16 (autocast over float32 parameters): no module swap, no state."""

    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        self.cfg = cfg
        self.device = device

    def convert_model(self, model: nn.Module) -> nn.Module:
        return model

    def autocast(self) -> ContextManager:
        if self.cfg.resolved_compute_dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def after_backward(self) -> None:
        """After each micro-batch's backward (FP8: the gradients' scales update here, as in TE)."""

    def after_optimizer_step(self) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the checkpoint holds FP8 state ({next(iter(state))}, ...) but precision="
                             f"{self.cfg.name} has none; resume with the precision it was saved with")

    def fp8_module_names(self, model: nn.Module) -> list[str]:
        return []


def check_state_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    """Same keys and shapes, or an error naming the first difference."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"FP8 state does not match this model's FP8 region: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (was precision.keep_patterns or the model changed?)")
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            raise ValueError(f"FP8 state {key} has shape {tuple(given[key].shape)}, expected {tuple(tensor.shape)} "
                             "(was precision.amax_history_len changed?)")
