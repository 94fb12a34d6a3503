"""mamba-ssm Triton kernels behind the SSD scan and the (gated) RMSNorm: the one module importing mamba_ssm.

Each function has the exact signature of its pure-torch twin (:func:`train.ops.ssd_scan_ref`,
:func:`train.ops.gated_rms_norm_ref`, :func:`train.ops.rms_norm_ref`), so the model swaps them by
config (`model.kernels.ssd` / `gated_norm` / `rms_norm` = `mamba_ssm`, see `train.ops.backends`).

Layouts the kernels need (checked against mamba_ssm 2.2-2.3 `ssd_combined.py` / `layernorm_gated.py`):

- ``mamba_chunk_scan_combined``: x (b, l, h, p) and z with either the last or the seqlen dim
  contiguous, B/C/D with the last dim contiguous (the kernel copies otherwise), any dtype; A, D,
  dt_bias may stay float32 while x is bf16 (autocast); l need not be a multiple of chunk_size.
  ``seq_idx`` (b, l) must be passed explicitly: the scan then resets the SSM state at every
  packed-sample boundary, including boundaries inside a chunk. Public multimodal wrappers that
  call the kernel without it leak state across samples. Final states come back in float32, as
  the reference's.
- ``rmsnorm_fn``: any (..., d) input with a contiguous last dim; each normalisation group
  (``group_size`` channels) must be under 64 KB. Statistics and the weight multiply are float32,
  the output has x's dtype, as the reference. It defaults to ``norm_before_gate=True``, unlike
  Nemotron-H, so the argument is always passed.

The import is guarded: on a machine without a working mamba_ssm this module still imports and
``IMPORT_ERROR`` says why; `train.ops.dispatch` turns that into an install hint at model build.
A mamba_ssm built without its CUDA extension (``MAMBA_SKIP_CUDA_BUILD=TRUE``: the CPU install of
`make setup` and the GPU test machine's) has all three kernels, see :func:`_import_mamba_ssm`.

Under Triton's interpreter (``TRITON_INTERPRET=1``) the same kernels run on CPU tensors: that is
how tests/unit/test_triton_interpreter_parity.py checks them against the references in CI.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import sys
import types

import torch
from torch import Tensor

_NO_CUDA_EXTENSION = "selective_scan_cuda"  # Mamba-1's selective scan, the only compiled part we could miss


class _MissingCudaExtension(types.ModuleType):
    """Stands in for ``selective_scan_cuda`` in a mamba_ssm built without it: importing works,
    using it raises (only Mamba-1's selective scan calls it; this project's model never does)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # keep probes (hasattr(m, "__path__"), inspect, pickling) ordinary
            raise AttributeError(name)
        raise RuntimeError(
            f"{self.__name__}.{name}: this mamba_ssm was built without its CUDA extension "
            "(MAMBA_SKIP_CUDA_BUILD=TRUE), so Mamba-1's selective scan is unavailable; only its Triton "
            "kernels (SSD scan, gated RMSNorm) are, which is all this project uses")


def _import_mamba_ssm() -> None:
    """Import mamba_ssm, also from an install without its CUDA extension.

    `mamba_ssm/__init__.py` reaches an unconditional ``import selective_scan_cuda`` (Mamba-1's
    selective scan, `ops/selective_scan_interface.py`), so such an install fails to import at all,
    although the Triton kernels we use need nothing compiled. When mamba_ssm is installed and that
    extension is not, a placeholder that raises when used is registered under its name first. A
    full install imports as is (a broken extension still fails, into IMPORT_ERROR).
    """
    find_spec = importlib.util.find_spec
    if find_spec("mamba_ssm") is not None and find_spec(_NO_CUDA_EXTENSION) is None:
        placeholder = _MissingCudaExtension(_NO_CUDA_EXTENSION)
        placeholder.__spec__ = importlib.machinery.ModuleSpec(_NO_CUDA_EXTENSION, None)  # find_spec needs one
        sys.modules[_NO_CUDA_EXTENSION] = placeholder
    import mamba_ssm  # noqa: F401


try:
    _import_mamba_ssm()
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    IMPORT_ERROR: Exception | None = None
except Exception as err:  # a broken CUDA/Triton build raises OSError, RuntimeError... not only ImportError
    IMPORT_ERROR = err

__all__ = ["IMPORT_ERROR", "ssd_scan_mamba", "gated_rms_norm_mamba", "rms_norm_mamba"]


def _interpreted() -> bool:
    # Triton's interpreter runs the kernels on CPU tensors (the CPU parity tests). The values are
    # those Triton itself reads as true (triton.knobs, getenv_bool).
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _require_cuda(x: Tensor, op: str) -> None:
    if not x.is_cuda and not _interpreted():
        raise RuntimeError(f"model.kernels.{op}=mamba_ssm runs on CUDA tensors only, got {x.device}: "
                           f"set model.kernels.{op}=torch on this device")


def ssd_scan_mamba(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    *,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan with mamba_ssm's fused Triton kernel (forward and backward).

    Same arguments and results as :func:`train.ops.ssd_scan_ref`: x (b, l, h, p), dt (b, l, h),
    A (h,), B/C (b, l, g, n), D (h,) or (h, p), z (b, l, h, p), dt_bias (h,), seq_idx (b, l).
    Returns y (b, l, h, p) in x's dtype (and final states (b, h, p, n) float32).
    """
    _require_cuda(x, "ssd")
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()  # (b, l), read by pointer in every kernel
    # Everything by keyword: the positional order after dt_bias changed between mamba_ssm releases.
    return mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
    )


def gated_rms_norm_mamba(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Mamba2 gated RMSNorm (``rmsnorm(x * silu(z)) * weight`` by default), fused; as :func:`gated_rms_norm_ref`.

    x, z: (..., d); weight: (d,) -> (..., d) in x's dtype.
    """
    _require_cuda(x, "gated_norm")
    return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


def rms_norm_mamba(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Plain RMSNorm over the last dim (the gated kernel without a gate); as :func:`rms_norm_ref`.

    x: (..., d); weight: (d,) -> (..., d) in x's dtype.
    """
    _require_cuda(x, "rms_norm")
    return rmsnorm_fn(x, weight, None, z=None, eps=eps, group_size=None, norm_before_gate=False)
