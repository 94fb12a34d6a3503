"""GPU kernel backends, one module per library, and the one table that describes them.

    mamba_ssm.py           SSD scan, gated RMSNorm, RMSNorm (Triton)
    causal_conv1d.py       Mamba depthwise causal conv (CUDA)
    flash_attn.py          varlen (THD) attention
    torch_varlen.py        varlen (THD) attention on torch's own flash kernel (torch >= 2.11, no install)
    transformer_engine.py  varlen (THD) attention; TE's modules for the FP8 precision plugin

Each module is the only one importing its library, guards that import (a missing or broken
install leaves `IMPORT_ERROR` set instead of raising), and implements functions with the exact
signatures of the pure-torch twins in `train.ops`. `BACKENDS` below lists, for every op, each
backend's function, install command, the compute dtypes it accepts and its shape limits on the
language model. Config validation (`KernelConfig.validate` / `validate_runtime`) reads the limits
from here, and `train.ops.dispatch` loads the functions, so a backend is described in one place.
This package imports no GPU library itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["BACKENDS", "OPS", "Backend", "ShapeLimit"]

OPS = ("ssd", "conv1d", "attention", "gated_norm", "rms_norm")


@dataclass(frozen=True)
class ShapeLimit:
    """One precondition of a kernel on the model's shapes, for layers of `layer` kind ("M" Mamba,
    "*" attention). `violation(lm, lm_path)` (lm: the LanguageModelConfig at config path lm_path)
    says what is wrong (None when it holds); `fix` says what to change (`{lm_path}` is filled in)."""

    layer: str
    violation: Callable[[Any, str], str | None]
    fix: str = "change {lm_path}"


@dataclass(frozen=True)
class Backend:
    module: str  # the module implementing it
    function: str
    # GPU backends: the command that installs the library (its module's `IMPORT_ERROR` says
    # whether it imported), the compute dtypes it accepts, and its shape limits.
    install: str | None = None
    compute_dtypes: tuple[str, ...] = ("fp32", "bf16")
    limits: tuple[ShapeLimit, ...] = ()

    @property
    def is_reference(self) -> bool:
        return self.install is None


def _conv_width(lm, at: str) -> str | None:
    return None if 2 <= lm.conv_kernel <= 4 else f"supports {at}.conv_kernel 2..4, got {lm.conv_kernel}"


def _conv_channels(lm, at: str) -> str | None:
    conv_dim = lm.mamba_intermediate_size + 2 * lm.n_groups * lm.ssm_state_size
    return None if conv_dim % 8 == 0 else (
        f"needs the conv width (mamba_num_heads * mamba_head_dim + 2 * n_groups * ssm_state_size = "
        f"{conv_dim}) to be a multiple of 8")


def _conv_input_offset(lm, at: str) -> str | None:
    # The conv reads xBC in place from in_proj's output [z | xBC | dt] when the strides allow: its
    # start, after z, must then be 16-byte aligned (8 elements in 16 bits).
    return None if lm.mamba_intermediate_size % 8 == 0 else (
        f"reads the conv input in place from in_proj's output after z: its offset (mamba_num_heads * "
        f"mamba_head_dim = {lm.mamba_intermediate_size}) must be a multiple of 8")


def _norm_group(lm, at: str) -> str | None:
    # mamba-ssm's fused gated norm keeps a group in one block of at most 64 KB.
    group = lm.mamba_intermediate_size // lm.n_groups
    return None if group <= 16384 else (
        f"normalises groups of at most 16384 channels (64 KB in fp32), got {group} (mamba_num_heads * "
        "mamba_head_dim / n_groups)")


def _attention_head_dim(lm, at: str) -> str | None:
    return None if lm.head_dim % 8 == 0 and lm.head_dim <= 256 else (
        f"needs {at}.head_dim a multiple of 8 and <= 256, got {lm.head_dim}")


# Only mamba-ssm's Triton kernels are used: a build without its CUDA extension (seconds, no nvcc) is
# enough, as `make setup` and the GPU device kit install it; --no-deps skips its Mamba-3 extras
# (tilelang, quack-kernels), its other needs are ours too.
_MAMBA = "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps 'mamba-ssm>=2.3'"
_CONV = "pip install causal-conv1d --no-build-isolation"
_FLASH = "pip install flash-attn --no-build-isolation"
def te_install_command(cuda_version: str | None = None) -> str:
    """Transformer Engine's core wheel must match torch's CUDA major version (cu12 or cu13), and its
    torch extension builds against the installed torch (hence no build isolation)."""
    if cuda_version is None:
        import torch

        cuda_version = torch.version.cuda
    major = (cuda_version or "12").split(".")[0]
    return f"pip install --no-build-isolation 'transformer-engine[core-cu{major},pytorch]'"


_TE = te_install_command()
# torch's own varlen_attn: no package of its own, it comes with a CUDA torch from 2.11 on.
_TORCH_VARLEN = "pip install 'torch>=2.11'"
_PKG = "train.ops.backends."
_FUSED_ATTENTION = {"compute_dtypes": ("bf16",), "limits": (ShapeLimit("*", _attention_head_dim),)}

BACKENDS: dict[str, dict[str, Backend]] = {
    "ssd": {
        "torch": Backend("train.ops.ssd", "ssd_scan_ref"),
        "mamba_ssm": Backend(_PKG + "mamba_ssm", "ssd_scan_mamba", _MAMBA),
    },
    "conv1d": {
        "torch": Backend("train.ops.conv1d", "causal_conv1d_ref"),
        "causal_conv1d": Backend(_PKG + "causal_conv1d", "causal_conv1d_cuda", _CONV, limits=(
            ShapeLimit("M", _conv_width), ShapeLimit("M", _conv_channels), ShapeLimit("M", _conv_input_offset))),
    },
    "attention": {
        "torch": Backend("train.ops.attention", "varlen_attention_ref"),
        "flash_attn": Backend(_PKG + "flash_attn", "flash_varlen_attention", _FLASH, **_FUSED_ATTENTION),
        "torch_varlen": Backend(_PKG + "torch_varlen", "torch_varlen_attention", _TORCH_VARLEN, **_FUSED_ATTENTION),
        "transformer_engine": Backend(_PKG + "transformer_engine", "te_varlen_attention", _TE, **_FUSED_ATTENTION),
    },
    "gated_norm": {
        "torch": Backend("train.ops.norms", "gated_rms_norm_ref"),
        "mamba_ssm": Backend(_PKG + "mamba_ssm", "gated_rms_norm_mamba", _MAMBA,
                             limits=(ShapeLimit("M", _norm_group, "raise {lm_path}.n_groups"),)),
    },
    "rms_norm": {
        "torch": Backend("train.ops.norms", "rms_norm_ref"),
        "mamba_ssm": Backend(_PKG + "mamba_ssm", "rms_norm_mamba", _MAMBA),
    },
}
