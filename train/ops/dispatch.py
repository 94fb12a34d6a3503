"""Kernel backends: which function computes each op, chosen by `model.kernels`, resolved once at model build.

Every op has a pure-torch reference (the default; runs anywhere) and optional GPU backends, listed
with their limits in `train.ops.backends.BACKENDS`. A GPU library is imported only by its module
under `train/ops/backends/`, and only when a backend of it is chosen, so CPU installs never import
one. A chosen backend whose library does not import fails here, at build, naming the pip package.
There is no fallback to torch: a silent fallback would change a run's numerics and speed
depending on the machine.

All backends of an op share its reference's signature:

  ssd         ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, *, initial_states, seq_idx, ...)
  conv1d      causal_conv1d_ref(x, weight, bias, seq_idx, *, activation)
  attention   varlen_attention_ref(q, k, v, cu_seqlens, causal, softmax_scale, *, cu_seqlens_k)
  gated_norm  gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)
  rms_norm    rms_norm_ref(x, weight, eps)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from data_pipelines.training.config import ConfigError
from train.ops.backends import BACKENDS, OPS
from train.ops.kernel_config import KernelConfig

__all__ = ["KernelUnavailableError", "Kernels", "load_backend", "resolve_kernels"]


class KernelUnavailableError(ConfigError):
    """The configured kernel backend's library is not installed (or does not import)."""


@dataclass(frozen=True)
class Kernels:
    """The functions a model calls for each op; built by :func:`resolve_kernels`."""

    ssd: Callable[..., Tensor]
    conv1d: Callable[..., Tensor]
    attention: Callable[..., Tensor]
    gated_norm: Callable[..., Tensor]
    rms_norm: Callable[..., Tensor]


def load_backend(op: str, name: str, path: str = "model.kernels") -> Callable[..., Tensor]:
    """The function of backend `name` for `op`; raises KernelUnavailableError with an install hint."""
    choices = BACKENDS.get(op)
    if choices is None:
        raise ConfigError(f"unknown kernel op {op!r}; ops are: {', '.join(OPS)}")
    if name not in choices:
        raise ConfigError(f"{path}.{op}={name!r}: choose one of {list(choices)}")
    backend = choices[name]
    module = importlib.import_module(backend.module)
    error = None if backend.is_reference else module.IMPORT_ERROR
    if error is not None:
        raise KernelUnavailableError(
            f"{path}.{op}={name} needs a working `{name}` library, which failed to import "
            f"({type(error).__name__}: {error}): install it with `{backend.install}` "
            f"(or `pip install -e '.[gpu]'`), or set {path}.{op}=torch"
        ) from error
    return getattr(module, backend.function)


def resolve_kernels(cfg: KernelConfig | None = None, path: str = "model.kernels") -> Kernels:
    """Resolve every op of `cfg` (default: all torch references) to its function, once."""
    cfg = cfg or KernelConfig()
    return Kernels(**{op: load_backend(op, getattr(cfg, op), path) for op in OPS})
