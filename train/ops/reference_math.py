"""How the reference twins compute: float32 (float64 kept, for gradcheck), whatever autocast says.

The fused kernels they stand in for take bf16/fp16 tensors and accumulate in float32; the twins
do the same by upcasting their inputs. Under autocast (`precision=bf16`) torch would otherwise run
the twins' own matmuls and convs in bf16 and mix dtypes inside one op, so the twins leave autocast
off for their own arithmetic and return the input's dtype, as the kernels do.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)

_AUTOCAST_DEVICES = ("cpu", "cuda")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def outside_autocast(fn: F) -> F:
    """Run `fn(x, ...)` with autocast off on `x`'s device (a no-op where it is off already)."""

    @functools.wraps(fn)
    def run(x: Tensor, *args, **kwargs):
        device = x.device.type
        if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return run  # type: ignore[return-value]
