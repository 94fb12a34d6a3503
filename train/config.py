"""Typed schema for a composed recipe, validated before any compute.

Hydra composes plain YAML; `load_config` turns the result into these dataclasses. Every
error names the dotted field and says what to set, so a bad override fails in a second
instead of after a model build.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A recipe field is missing, mistyped or out of range."""


@dataclass
class LanguageModelConfig:
    """Hybrid Mamba2 / attention / MLP decoder (Nemotron-H layout).

    `pattern` has one character per layer: `M` Mamba2 mixer, `*` attention, `-` MLP.
    """

    pattern: str = "M-M*M-M-"
    hidden_size: int = 64
    vocab_size: int = 1024
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    mamba_num_heads: int = 4
    mamba_head_dim: int = 16
    ssm_state_size: int = 16
    n_groups: int = 2
    conv_kernel: int = 4
    chunk_size: int = 16
    mlp_hidden_size: int = 128
    norm_eps: float = 1e-5
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    initializer_range: float = 0.02

    def validate(self, path: str) -> None:
        bad = set(self.pattern) - set("M*-")
        if not self.pattern or bad:
            raise ConfigError(f"{path}.pattern={self.pattern!r}: use only 'M' (Mamba2), '*' (attention), '-' (MLP)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{path}.num_key_value_heads must divide num_attention_heads")
        if self.mamba_num_heads % self.n_groups:
            raise ConfigError(f"{path}.n_groups must divide mamba_num_heads")
        if self.mamba_intermediate_size % self.n_groups:
            raise ConfigError(f"{path}.n_groups must divide mamba_num_heads * mamba_head_dim")

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim


@dataclass
class VisionConfig:
    """ViT encoder over square tiles (RADIO-style, patch 16)."""

    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    normalization: str = "radio"

    def validate(self, path: str) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{path}.image_size must be a multiple of {path}.patch_size")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{path}.num_heads must divide {path}.hidden_size")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ProjectorConfig:
    """Pixel shuffle then an MLP from 4x the ViT width to the LM width."""

    downsample_ratio: float = 0.5
    hidden_size: int = 128


@dataclass
class ModelConfig:
    name: str = "tiny"
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # Rows of the output head and loss computed at once: full logits are never materialised.
    loss_chunk_size: int = 1024

    def validate(self, path: str) -> None:
        self.language_model.validate(f"{path}.language_model")
        self.vision.validate(f"{path}.vision")
        side = self.vision.patches_per_side * self.projector.downsample_ratio
        if side != int(side) or side < 1:
            raise ConfigError(
                f"{path}.projector.downsample_ratio={self.projector.downsample_ratio} must turn the "
                f"{self.vision.patches_per_side}x{self.vision.patches_per_side} patch grid into a whole grid"
            )

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.vision.patches_per_side * self.projector.downsample_ratio)
        return side * side


@dataclass
class SourceConfig:
    name: str = "source"
    path: str = ""
    weight: float = 1.0

    def validate(self, path: str) -> None:
        if not self.path:
            raise ConfigError(f"{path}.path is empty: set it to a shard directory or a brace pattern of .tar files")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(f"{path}.weight={self.weight}: set a positive weight")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # What the embedded synthetic data stands in for this mix; `smoke=cpu` swaps it in.
    smoke_sources: list[SourceConfig] = field(default_factory=list)
    # Sequence length of the smoke stand-in (grows with the stages, like the real one).
    smoke_seq_length: int = 512
    # When set, the embedded synthetic data (and its tokenizer) is generated here first.
    synth_dir: Optional[str] = None
    tokenizer: str = ""
    seq_length: int = 16384
    tile_size: int = 512
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    video_fps: float = 2.0
    max_frames: int = 128
    # Share of samples without an explicit /think or /no_think that get reasoning on.
    reasoning_on_ratio: float = 0.0
    pack_buffer: int = 64
    max_samples_per_pack: int = 0
    pad_multiple: int = 16

    def validate(self, path: str) -> None:
        if not self.sources:
            raise ConfigError(f"{path}.sources is empty: set data.sources=[{{name:mine,path:/data/shards,weight:1.0}}]")
        for i, source in enumerate(self.sources):
            source.validate(f"{path}.sources[{i}]")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}.sources: names must be unique, got {names}")
        if self.synth_dir is None:
            for i, source in enumerate(self.sources):
                _check_source_exists(source.path, f"{path}.sources[{i}].path")
            if not self.tokenizer or not Path(self.tokenizer).exists():
                raise ConfigError(f"{path}.tokenizer={self.tokenizer!r} does not exist: set a tokenizer directory")
        _check_positive(self, path, "seq_length", "tile_size", "min_tiles", "max_tiles", "video_fps", "max_frames",
                        "pack_buffer", "pad_multiple")
        if self.min_tiles > self.max_tiles:
            raise ConfigError(f"{path}.min_tiles must be <= {path}.max_tiles")
        if not 0.0 <= self.reasoning_on_ratio <= 1.0:
            raise ConfigError(f"{path}.reasoning_on_ratio must be in [0, 1]")
        if self.seq_length % self.pad_multiple:
            raise ConfigError(f"{path}.seq_length must be a multiple of {path}.pad_multiple={self.pad_multiple}")


def _check_source_exists(pattern: str, path: str) -> None:
    # Brace patterns ({000..009}) name files that exist one by one; check the first.
    from data_pipelines.shards import expand_shard_paths

    try:
        expand_shard_paths(pattern)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    clip_grad: float = 1.0

    def validate(self, path: str) -> None:
        _check_positive(self, path, "lr")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{path}.min_lr={self.min_lr} must be in [0, optim.lr]")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.clip_grad < 0:
            raise ConfigError(f"{path}: weight_decay, warmup_steps and clip_grad must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"{path}.beta1/beta2 must be in [0, 1)")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True

    def validate(self, path: str) -> None:
        _check_positive(self, path, "max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "save_every",
                        "keep_last")


@dataclass
class TrainableConfig:
    """Which parts receive gradients; the rest stay bit-identical."""

    language_model: bool = True
    vision_model: bool = False
    projector: bool = True

    def validate(self, path: str) -> None:
        if not (self.language_model or self.vision_model or self.projector):
            raise ConfigError(f"{path}: nothing would train; set at least one of language_model/vision_model/projector")


@dataclass
class InitConfig:
    # A checkpoint directory (checkpoints/step_N) whose model weights start this stage.
    from_checkpoint: Optional[str] = None

    def validate(self, path: str) -> None:
        if self.from_checkpoint and not Path(self.from_checkpoint).is_dir():
            raise ConfigError(f"{path}.from_checkpoint={self.from_checkpoint!r} is not a checkpoint directory")


@dataclass
class PrecisionConfig:
    name: Literal["fp32", "bf16"] = "fp32"


@dataclass
class ParallelConfig:
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    tensor_parallel: int = 1
    context_parallel: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def validate(self, path: str) -> None:
        if self.tensor_parallel != 1 or self.context_parallel != 1:
            raise ConfigError(
                f"{path}: tensor/context parallelism need the megatron-core backend, which is not built yet; "
                "set parallel.tensor_parallel=1 parallel.context_parallel=1"
            )


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "offline"
    project: str = "hybrid-vl-sft"
    entity: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class Config:
    stage: str = ""
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    init: InitConfig = field(default_factory=InitConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Name of the smoke overlay in use (None for a real run); informational.
    smoke: Optional[str] = None

    def validate(self) -> "Config":
        if not self.stage:
            raise ConfigError("stage is empty: a recipe must set `stage` to its own name")
        for name in ("model", "data", "optim", "trainer", "trainable", "init", "parallel"):
            getattr(self, name).validate(name)
        if self.data.tile_size != self.model.vision.image_size:
            raise ConfigError(
                f"data.tile_size={self.data.tile_size} differs from model.vision.image_size="
                f"{self.model.vision.image_size}: set them equal"
            )
        return self


def _check_positive(obj: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{path}.{name}={value} must be > 0")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, rejecting unknown fields and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown field {where}{unknown[0]}; valid fields are: {', '.join(sorted(known))}")
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, path)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{path}={value!r}: choose one of {list(get_args(hint))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    return value


def build_config(raw: dict) -> Config:
    """Typed, validated config from a resolved plain dict (Hydra's output)."""
    return from_dict(Config, raw).validate()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


