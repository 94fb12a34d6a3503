"""The megatron-core engine (`model.impl=mcore`): the language model is megatron's `MambaModel` on our
layer spec (`model`), its process groups are megatron's (handed to the parallel seam), its state
reaches checkpoints in the native layout (`state`), FP8 is megatron's own (`fp8`), pipeline stages
run the 1F1B schedule (`pipeline`), and its config rules live in `rules`. megatron is imported
only when a method needs it, so resolving the engine (and validating a config) stays cheap."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from train.config.schema import Config, ParallelConfig, PrecisionConfig
from train.engines.mcore import rules
from train.engines.native.data_parallel import wrap_data_parallel
from train.parallel.distributed import DistInfo, init_distributed
from train.precision import Precision, build_precision


class McoreEngine:
    name = "mcore"

    def validate(self, cfg: Config) -> None:
        rules.validate(cfg)

    def init_distributed(self, cfg: Config) -> DistInfo:
        from train.engines.mcore.model import megatron_process_groups

        # megatron needs a process group even for one process.
        return init_distributed(cfg.parallel, cfg.trainer.device, always=True,
                                make_groups=functools.partial(megatron_process_groups, cfg.parallel))

    def build_language_model(self, cfg: Config, device: torch.device) -> dict:
        from train.engines.mcore.loss import vocab_parallel_loss
        from train.engines.mcore.model import McoreLanguageModel

        language_model = McoreLanguageModel(cfg.model.language_model, cfg.model.kernels, cfg.parallel, device,
                                            precision=cfg.precision)
        return {"language_model": language_model, "loss": vocab_parallel_loss(cfg.model.loss_chunk_size)}

    def state_layout(self, model: nn.Module):
        from train.engines.mcore.state import McoreLayout

        return McoreLayout(model.language_model)

    def apply_adapters(self, model: nn.Module, cfg: Config) -> list[str]:
        """LoRA on megatron's tensor-parallel linears (hand-written: `adapters`); a projector that
        `peft.targets` names is a native module and takes PEFT's layers, as on the native engine."""
        from dataclasses import replace

        from train.engines.mcore.adapters import apply_lm_adapters
        from train.engines.native.adapters import apply_adapters

        adapted = apply_lm_adapters(model.language_model, cfg.peft, cfg.seed) if cfg.trainable.language_model else []
        projector_only = replace(cfg.trainable, language_model=False)
        return adapted + apply_adapters(model, cfg.peft, projector_only, cfg.seed)

    def base_fingerprint(self, model: nn.Module) -> str:
        from train.engines.mcore.adapters import base_fingerprint

        return base_fingerprint(model)

    def adapter_layout(self, model: nn.Module):
        from train.engines.mcore.state import McoreLayout

        return McoreLayout(model.language_model, trainable_only=True)

    def cast_frozen_base(self, model: nn.Module, dtype: torch.dtype) -> None:
        from train.engines.mcore.adapters import cast_frozen_parallel_linears
        from train.engines.native.adapters import cast_frozen_linears

        cast_frozen_linears(model, dtype)  # the vision tower's and projector's
        cast_frozen_parallel_linears(model.language_model, dtype)

    def build_precision(self, cfg: PrecisionConfig, device: torch.device) -> Precision:
        # FP8 here is megatron's (TE linears it builds itself); other precisions are the shared plugins.
        return build_precision(cfg, device,
                               fp8_plugin=lambda: importlib.import_module("train.engines.mcore.fp8").McoreFp8Precision)

    def parallelize(self, model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
        if info.dims.pipeline > 1:  # a pipeline averages gradients itself, after its schedule
            return model
        return wrap_data_parallel(model, cfg.parallel, info)

    def step_schedule(self, model: nn.Module, info: DistInfo, precision: Precision):
        if info.dims.pipeline == 1:
            return None
        from train.engines.mcore.pipeline import PipelineSchedule

        return PipelineSchedule(model, info, precision.autocast)

    def sharding(self, parallel: ParallelConfig) -> str:
        return "distributed optimizer" if parallel.distributed_optimizer else "none"


ENGINE = McoreEngine()
