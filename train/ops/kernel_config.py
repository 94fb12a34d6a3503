"""`model.kernels`: which implementation computes each fused op, validated against the backend
table (`train.ops.backends.BACKENDS`) it sits next to. Lives in `ops` so the ops and their
dispatch import nothing above them; the run's schema (`train.config.schema`) embeds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from data_pipelines.training.config import ConfigError
from train.ops.backends import BACKENDS, OPS


@dataclass
class KernelConfig:
    """Which implementation computes each fused op, and what backward recomputes.

    `torch` is the pure-torch reference twin in `train/ops` (runs anywhere, the default); the
    others are GPU libraries, imported only when chosen, and a missing one fails at model build
    with the pip package to install. Nothing is auto-detected: a run computes with exactly what
    is named here, so switching machines never silently changes the numerics.
    """

    ssd: Literal["torch", "mamba_ssm"] = "torch"
    conv1d: Literal["torch", "causal_conv1d"] = "torch"
    # torch_varlen: torch's own varlen_attn (torch >= 2.11, CUDA), nothing to install or compile.
    attention: Literal["torch", "flash_attn", "torch_varlen", "transformer_engine"] = "torch"
    gated_norm: Literal["torch", "mamba_ssm"] = "torch"
    rms_norm: Literal["torch", "mamba_ssm"] = "torch"
    # "layers": every LM layer and ViT block keeps only its input and is recomputed in backward.
    activation_checkpointing: Literal["none", "layers"] = "none"

    @property
    def fused(self) -> dict[str, str]:
        """{op: backend} for the ops that do not run on the torch reference."""
        return {op: getattr(self, op) for op in OPS if getattr(self, op) != "torch"}

    def validate(self, path: str, lm: Any, lm_path: str) -> None:
        """Shape limits of the chosen kernels on `lm` (the run's LanguageModelConfig at `lm_path`) (`train.ops.backends.BACKENDS`), checked before any compute."""
        for op in OPS:
            backend = BACKENDS[op][getattr(self, op)]
            for limit in backend.limits:
                problem = limit.layer in lm.pattern and limit.violation(lm, lm_path)
                if problem:
                    raise ConfigError(f"{path}.{op}={getattr(self, op)} {problem}: "
                                      f"{limit.fix.format(lm_path=lm_path)} or set {path}.{op}=torch")

    def validate_runtime(self, path: str, device: str, precision: Any) -> None:
        """GPU kernels need a GPU; fused attention needs 16-bit activations, which is what the
        precision computes in (`precision.compute_dtype`, resolved), not what it is called:
        `fp8_delayed_emulated` computes in fp32 unless told otherwise."""
        if device == "cpu" and self.fused:
            op, backend = next(iter(self.fused.items()))
            raise ConfigError(f"{path}.{op}={backend} runs on CUDA only but trainer.device=cpu: "
                              f"set {path}.{op}=torch or trainer.device=cuda")
        compute = precision.resolved_compute_dtype
        for op, name in self.fused.items():
            accepted = BACKENDS[op][name].compute_dtypes
            if compute not in accepted:
                raise ConfigError(f"{path}.{op}={name} computes in {'/'.join(accepted)} only but precision={precision.name} "
                                  f"computes in {compute} (precision.compute_dtype={precision.compute_dtype}): set "
                                  f"precision.compute_dtype=bf16, precision=bf16, or {path}.{op}=torch")
