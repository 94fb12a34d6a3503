"""The native engine (`model.impl=native`, the default): the language model is `train.model`'s
plain-torch `HybridLanguageModel`, data parallel through DDP or FSDP2 (`data_parallel`). No tensor,
context or pipeline parallelism: those are the megatron-core engine's."""

from __future__ import annotations

import torch
from torch import nn

from train.checkpoint.layout import NativeLayout, StateLayout, TrainableOnlyLayout
from train.config.schema import Config, ConfigError, ParallelConfig, PrecisionConfig
from train.engines.native.data_parallel import wrap_data_parallel
from train.parallel.distributed import DistInfo, init_distributed
from train.precision import Precision, build_precision


class NativeEngine:
    name = "native"

    def validate(self, cfg: Config) -> None:
        par = cfg.parallel
        if par.model_parallel:
            raise ConfigError(
                f"parallel.tensor_parallel={par.tensor_parallel}, context_parallel={par.context_parallel}, "
                f"pipeline_parallel={par.pipeline_parallel} need model.impl=mcore (the native engine is data "
                "parallel only)")

    def init_distributed(self, cfg: Config) -> DistInfo:
        return init_distributed(cfg.parallel, cfg.trainer.device)

    def build_language_model(self, cfg: Config, device: torch.device) -> dict:
        return {}  # VisionLanguageModel builds its own HybridLanguageModel

    def state_layout(self, model: nn.Module) -> StateLayout:
        return NativeLayout()

    def apply_adapters(self, model: nn.Module, cfg: Config) -> list[str]:
        from train.engines.native.adapters import apply_adapters

        return apply_adapters(model, cfg.peft, cfg.trainable, cfg.seed)

    def base_fingerprint(self, model: nn.Module) -> str:
        from train.engines.native.adapters import base_fingerprint

        return base_fingerprint(model.state_dict())

    def adapter_layout(self, model: nn.Module) -> StateLayout:
        return TrainableOnlyLayout()

    def cast_frozen_base(self, model: nn.Module, dtype: torch.dtype) -> None:
        from train.engines.native.adapters import cast_frozen_linears

        cast_frozen_linears(model, dtype)

    def build_precision(self, cfg: PrecisionConfig, device: torch.device) -> Precision:
        return build_precision(cfg, device)

    def parallelize(self, model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
        return wrap_data_parallel(model, cfg.parallel, info)

    def step_schedule(self, model: nn.Module, info: DistInfo, precision: Precision) -> None:
        return None

    def sharding(self, parallel: ParallelConfig) -> str:
        return "fsdp (weights, gradients, optimizer)" if parallel.data_parallel == "fsdp" else "none"


ENGINE = NativeEngine()
