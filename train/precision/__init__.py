"""Precision plugins: fp32, bf16, FP8 delayed scaling through Transformer Engine or in plain torch
(`fp8_delayed_emulated`, its GEMMs emulated in float32 or real FP8 through torch._scaled_mm).

`build_precision` is the only entry point the trainer needs. Transformer Engine is imported only
when precision=fp8_delayed is built, so a missing or broken install never breaks `import train`.
"""

from __future__ import annotations

from typing import Callable

import torch

from train.config.schema import PrecisionConfig
from train.ops.backends import te_install_command
from train.precision.fp8_emulated import EmulatedFp8Precision
from train.precision.plugin import Precision

__all__ = ["Precision", "build_precision"]

TE_INSTALL_HINT = (f"{te_install_command()} (or the te-cu12 / te-cu13 extra), or use precision=fp8_delayed_emulated "
                   "(with precision.fp8_gemm=scaled_mm for real FP8 GEMMs without Transformer Engine)")


def build_precision(cfg: PrecisionConfig, device: torch.device,
                    fp8_plugin: Callable[[], type[Precision]] | None = None) -> Precision:
    """The plugin for `cfg`. `fp8_plugin` imports an engine's own precision=fp8_delayed plugin
    (megatron-core's: `train.engines.mcore.fp8`); by default Transformer Engine's on our linears."""
    cfg.validate("precision")
    if cfg.name == "fp8_delayed_emulated":
        return EmulatedFp8Precision(cfg, device)
    if cfg.name == "fp8_delayed":
        try:
            plugin = fp8_plugin() if fp8_plugin is not None else _te_plugin()
        except Exception as err:  # absent (ImportError) or broken (OSError, RuntimeError from its CUDA libs)
            raise RuntimeError(f"precision=fp8_delayed needs Transformer Engine, which failed to import "
                               f"({type(err).__name__}: {err}); {TE_INSTALL_HINT}") from err
        return plugin(cfg, device)
    return Precision(cfg, device)


def _te_plugin() -> type[Precision]:
    from train.precision.fp8_te import TEFp8Precision

    return TEFp8Precision
