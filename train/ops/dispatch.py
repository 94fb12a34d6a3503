"""Kernel backends: which function computes each op, chosen by `model.kernels`, resolved once at model build.

Every op has a pure-torch reference (the default; runs anywhere) and optional GPU backends. Each
GPU library is imported by exactly one module (`mamba_kernels`, `conv1d_kernels`,
`attention_kernels`), and only when a backend of it is chosen, so CPU installs never import one.
A chosen backend whose library does not import fails here, at build, naming the pip package.
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

from train.config.schema import ConfigError, KernelConfig

__all__ = ["BACKENDS", "OPS", "Backend", "KernelUnavailableError", "Kernels", "load_backend", "resolve_kernels"]

OPS = ("ssd", "conv1d", "attention", "gated_norm", "rms_norm")


@dataclass(frozen=True)
class Backend:
    module: str  # the module implementing it
    function: str
    # GPU backends: the module attribute holding the library's import error (None when it imported),
    # and the install command to suggest when it did not.
    import_error: str | None = None
    install: str | None = None


_MAMBA = "pip install mamba-ssm --no-build-isolation"
_CONV = "pip install causal-conv1d --no-build-isolation"
_FLASH = "pip install flash-attn --no-build-isolation"
_TE = "pip install --no-build-isolation 'transformer-engine[pytorch]'"

BACKENDS: dict[str, dict[str, Backend]] = {
    "ssd": {
        "torch": Backend("train.ops.ssd", "ssd_scan_ref"),
        "mamba_ssm": Backend("train.ops.mamba_kernels", "ssd_scan_mamba", "IMPORT_ERROR", _MAMBA),
    },
    "conv1d": {
        "torch": Backend("train.ops.conv1d", "causal_conv1d_ref"),
        "causal_conv1d": Backend("train.ops.conv1d_kernels", "causal_conv1d_cuda", "IMPORT_ERROR", _CONV),
    },
    "attention": {
        "torch": Backend("train.ops.attention", "varlen_attention_ref"),
        "flash_attn": Backend("train.ops.attention_kernels", "flash_varlen_attention",
                              "FLASH_ATTN_IMPORT_ERROR", _FLASH),
        "transformer_engine": Backend("train.ops.attention_kernels", "te_varlen_attention",
                                      "TRANSFORMER_ENGINE_IMPORT_ERROR", _TE),
    },
    "gated_norm": {
        "torch": Backend("train.ops.norms", "gated_rms_norm_ref"),
        "mamba_ssm": Backend("train.ops.mamba_kernels", "gated_rms_norm_mamba", "IMPORT_ERROR", _MAMBA),
    },
    "rms_norm": {
        "torch": Backend("train.ops.norms", "rms_norm_ref"),
        "mamba_ssm": Backend("train.ops.mamba_kernels", "rms_norm_mamba", "IMPORT_ERROR", _MAMBA),
    },
}


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
    error = getattr(module, backend.import_error) if backend.import_error else None
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
