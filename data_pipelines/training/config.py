"""The data section of a recipe (`data.*`): typed, validated before any compute.

Owned by the data side (it never imports `train`); `train.config.schema.Config` embeds it, and
`data_pipelines.training.loader.build_batch_stream` turns it into the per-rank batch stream.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from data_pipelines.training.evs import EvsConfig
from data_pipelines.training.shards import ShardError, expand_shard_paths
from data_pipelines.training.tiling import TilingConfig


class ConfigError(ValueError):
    """A recipe field is missing, mistyped or out of range."""


# Whether validation looks at the filesystem (data paths, tokenizer, checkpoints). A dry run on a
# laptop renders a cluster job whose paths exist only on the cluster: it checks everything else.
_CHECK_PATHS = contextvars.ContextVar("check_paths", default=True)


@contextlib.contextmanager
def paths_unchecked():
    """Validate configs without looking at the filesystem (launchers' --dry-run)."""
    token = _CHECK_PATHS.set(False)
    try:
        yield
    finally:
        _CHECK_PATHS.reset(token)


def paths_checked() -> bool:
    return _CHECK_PATHS.get()


def check_positive(obj: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{path}.{name}={value} must be > 0")


@dataclass
class SourceConfig:
    name: str = "source"
    path: str = ""
    weight: float = 1.0
    # Per-dataset reasoning default for conversations without /think or /no_think
    # (None: data.reasoning_on_ratio).
    reasoning_on_ratio: Optional[float] = None

    def validate(self, path: str) -> None:
        if not self.path:
            raise ConfigError(f"{path}.path is empty: set it to a shard directory or a brace pattern of .tar files")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(f"{path}.weight={self.weight}: set a positive weight")
        if self.reasoning_on_ratio is not None and not 0.0 <= self.reasoning_on_ratio <= 1.0:
            raise ConfigError(f"{path}.reasoning_on_ratio must be in [0, 1] (or null for data.reasoning_on_ratio)")


# Rows shorter than this hold no useful conversation; longer than this is a typo, not a context.
MIN_SEQ_LENGTH, MAX_SEQ_LENGTH = 64, 4 * 1024 * 1024


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # What the embedded synthetic data stands in for this mix; `smoke=cpu` swaps it in.
    smoke_sources: list[SourceConfig] = field(default_factory=list)
    # Sequence length of the smoke stand-in (grows with the stages, like the real one).
    smoke_seq_length: int = 512
    # Held-out sources (same schema; weights unused), evaluated every trainer.eval_every steps and at
    # the end of the stage: loss per source, from the first trainer.eval_samples samples of each.
    val_sources: list[SourceConfig] = field(default_factory=list)
    smoke_val_sources: list[SourceConfig] = field(default_factory=list)
    # The forgetting monitor: held-out text and code-reasoning sources every stage evaluates the
    # same way, so the pipeline shows one curve across stages. Empty in the shipped recipes (no
    # public held-out set to point at; recipes/base/stage.yaml shows how to set it); the smoke runs
    # use `smoke_monitor_sources`, embedded shards apart from every val source.
    monitor_sources: list[SourceConfig] = field(default_factory=list)
    smoke_monitor_sources: list[SourceConfig] = field(default_factory=list)
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
    # "auto": the tokenizer's own chat template when it has one, ChatML for a conversation it does
    # not render prefix-stably (counted per source as `chat_template_fallback`, warned once);
    # "tokenizer": its template or an error; "builtin": ChatML.
    chat_template: Literal["auto", "tokenizer", "builtin"] = "auto"
    # Who resizes tiles and frames (bicubic): "torch" (fast) or "pil" (bit-exact with InternVL's PIL path).
    resize_backend: Literal["torch", "pil"] = "torch"
    # Loss on the <think>...</think> block of answers (off: only the final answer trains).
    loss_on_think: bool = True
    # Processes that decode and tokenize; 0 builds samples in the training process.
    num_workers: int = 0
    # Samples the packer chooses from; it holds their tokens only (pixels are decoded per chosen row).
    pack_buffer: int = 100
    max_samples_per_pack: int = 0
    # A source whose last `max_skips_in_a_row` samples (or all of them, if fewer) were all skipped
    # stops the run with the reasons: nothing in it is usable with these settings.
    max_skips_in_a_row: int = 1000
    # A sample's JSON member larger than this is a counted `too_large` skip, not parsed: a runaway
    # member (tens of MB) would cost minutes and gigabytes every time it is drawn. 16 MiB holds a
    # ~300K-token Stage 4 document several times over.
    max_json_bytes: int = 16 * 1024 * 1024
    # A file named .tar that is not a readable tar: "skip" (warn, count `corrupt_shard`, train on
    # the others) or "error" (stop, naming it).
    on_corrupt_shard: Literal["skip", "error"] = "skip"
    # A resume checks every shard's size and sample count against the checkpoint's data position: a
    # shard rewritten in between stops the run (data error) unless this accepts it.
    accept_changed_shards: bool = False
    pad_multiple: int = 16
    # Efficient video sampling: prune each video's static tokens after the projector.
    evs: EvsConfig = field(default_factory=EvsConfig)

    @property
    def tiling(self) -> TilingConfig:
        return TilingConfig(tile_size=self.tile_size, min_tiles=self.min_tiles, max_tiles=self.max_tiles,
                            use_thumbnail=self.use_thumbnail, resize_backend=self.resize_backend)

    def validate(self, path: str) -> None:
        if not self.sources:
            raise ConfigError(f"{path}.sources is empty: set data.sources=[{{name:mine,path:/data/shards,weight:1.0}}]")
        for i, source in enumerate(self.sources):
            source.validate(f"{path}.sources[{i}]")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}.sources: names must be unique, got {names}")
        held_out = {"val_sources": self.val_sources, "monitor_sources": self.monitor_sources}
        for field_name, sources in held_out.items():
            for i, source in enumerate(sources):
                source.validate(f"{path}.{field_name}[{i}]")
        evaluated = [s.name for s in self.val_sources + self.monitor_sources]
        if len(set(evaluated)) != len(evaluated):
            raise ConfigError(f"{path}.val_sources + {path}.monitor_sources: names must be unique (they name the "
                              f"val/<name>/loss metrics), got {evaluated}")
        if self.synth_dir is None and paths_checked():
            for field_name, sources in {"sources": self.sources, **held_out}.items():
                for i, source in enumerate(sources):
                    _check_source_exists(source.path, f"{path}.{field_name}[{i}].path")
            if not self.tokenizer or not Path(self.tokenizer).exists():
                raise ConfigError(f"{path}.tokenizer={self.tokenizer!r} does not exist: set a tokenizer directory")
        check_positive(self, path, "seq_length", "tile_size", "min_tiles", "max_tiles", "video_fps", "max_frames",
                        "pack_buffer", "pad_multiple", "max_skips_in_a_row", "max_json_bytes")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers={self.num_workers} must be >= 0")
        if self.min_tiles > self.max_tiles:
            raise ConfigError(f"{path}.min_tiles must be <= {path}.max_tiles")
        if not 0.0 <= self.reasoning_on_ratio <= 1.0:
            raise ConfigError(f"{path}.reasoning_on_ratio must be in [0, 1]")
        if not MIN_SEQ_LENGTH <= self.seq_length <= MAX_SEQ_LENGTH:
            raise ConfigError(f"{path}.seq_length={self.seq_length:,} is outside {MIN_SEQ_LENGTH:,}..{MAX_SEQ_LENGTH:,} "
                              "tokens (the recipe's longest stage packs 311,296): check the value")
        if self.seq_length % self.pad_multiple:
            raise ConfigError(f"{path}.seq_length must be a multiple of {path}.pad_multiple={self.pad_multiple}")
        try:
            self.evs.validate(f"{path}.evs")
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_source_exists(pattern: str, path: str) -> None:
    # Brace patterns ({000..009}) name files that exist one by one; check the first.
    try:
        expand_shard_paths(pattern)
    except (FileNotFoundError, ShardError) as err:
        raise ConfigError(f"{path}: {err}") from None
