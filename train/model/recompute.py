"""Activation recompute of one layer (`model.kernels.activation_checkpointing=layers`).

Models call `self.checkpoint_fn(layer, *args)`: by default torch's non-reentrant checkpoint, which
keeps only the layer's input and reruns the layer in backward under the same autocast. A precision
that quantises with state that changes between the forward and the backward (FP8 scales update
when the autocast exits) replaces it (`Precision.checkpoint_fn`) so the rerun computes exactly what
the forward computed.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

CheckpointFn = Callable[..., Any]


def recompute_in_backward(function: Callable[..., Any], *args: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False)


def set_checkpoint_fn(model: nn.Module, checkpoint_fn: CheckpointFn) -> None:
    """Every part of `model` that recomputes its layers (it has `checkpoint_fn`) uses `checkpoint_fn`."""
    for module in model.modules():
        if hasattr(module, "checkpoint_fn"):
            module.checkpoint_fn = checkpoint_fn
