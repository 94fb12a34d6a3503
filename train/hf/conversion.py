"""transformers checkpoints <-> our native run directories, offline and without remote code: the two
conversions (and `open_hf_as_native`, the first one in memory), built from `train.hf.config`
(config.json <-> our config), `train.hf.mapping` (the one table of tensor names), `train.hf.files`
(safetensors directories) and `train.checkpoint` (the native checkpoint format).

Two HF layouts are understood, both as stored on disk (what `save_pretrained` writes and the
released checkpoints hold):

- `lm`: `NemotronHForCausalLM` (`model_type: nemotron_h`): `backbone.*`, `lm_head.weight`.
- `vl`: `NemotronH_Omni_Reasoning_V3` (`model_type: nemotron_h_omni`; the released VL weight
  names): `language_model.{backbone.*,lm_head.weight}`, `mlp1.{0,1,3}.weight`, and a RADIO ViT under
  `vision_model.radio_model.model.{patch_generator.{embedder,pos_embed,cls_token.token},blocks.N.*}`.
  Remote-code configs (`NemotronH_Nano_VL_V2`) use the same weight names but a config.json that
  transformers' omni config class rejects; they are refused with a message saying so. A `vl` export
  holds every tensor transformers' omni class has; `train.hf.untrained` says what is written for
  those this recipe never trains (RADIO's video tubelet embedder above all).

Native directory (what `python -m train.convert hf-to-native` writes, a run directory):
`config.yaml`, `checkpoints/step_0000000/` (a model-only checkpoint whose keys are the VLM's
`language_model.*`, `vision_model.*`, `projector.*`; only `language_model.*` for an LM-only
source), `checkpoints/latest`, and `hf_source/` (the source's config.json, tokenizer and other
small files, and `extra.safetensors` with the carried tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from train.checkpoint.files import read_marker, read_run_config, resolve_native_checkpoint, write_run_config
from train.checkpoint.store import CheckpointReadError, read_model_state, write_model_checkpoint
from train.config.schema import Config, ModelConfig, RunConfig
from train.hf.config import (
    Layout,
    config_json_text,
    export_config,
    hf_config_to_model_config,
    hf_layout,
    read_hf_config,
)
from train.hf.errors import ConversionError
from train.hf.files import (
    DEFAULT_MAX_SHARD_BYTES,
    EXTRA_NAME,
    SOURCE_DIR,
    copy_small_files,
    fresh_dir,
    keep_source,
    open_hf_weights,
    read_hf_weights,
    read_hf_weights_file,
    read_weights_metadata,
    write_hf_weights,
)
from train.hf.mapping import (
    hf_to_native_state,
    native_to_hf_state,
    relayout_carried,
    split_carried,
)
from train.hf.serving import (
    ServingFilesError,
    find_tokenizer,
    has_tokenizer,
    image_token_id_of,
    load_tokenizer,
    write_serving_files,
)
from train.hf.untrained import carried_metadata, complete_vl_state


def check_against_model(state: dict[str, Tensor], cfg: ModelConfig, parts: tuple[str, ...]) -> None:
    """Every tensor of the model's `parts` present with the model's shape, nothing else: proves the
    converted config describes the converted weights."""
    from train.model.vlm import VisionLanguageModel

    with torch.device("meta"):
        model = VisionLanguageModel(cfg, image_token_id=0)
    expected = {k: v.shape for k, v in model.state_dict().items() if k.split(".", 1)[0] in parts}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise ConversionError(f"weights do not match the config: {wrong[:5]}")


def write_native(dst: Path, model_cfg: ModelConfig, state: dict[str, Tensor], source: Path | None = None,
                 carried: dict[str, Tensor] | None = None) -> Path:
    """A run directory holding `state` as a model-only checkpoint at step 0; returns the step dir.
    The checkpoint comes last, so a run directory with one is whole (config, HF source files)."""
    dst = fresh_dir(dst)
    cfg = Config(stage="hf_import", run=RunConfig(dir=str(dst.resolve())), model=model_cfg)
    write_run_config(dst, dataclasses.asdict(cfg))
    if source is not None:
        keep_source(dst, source, carried, carried_metadata(state, carried or {}))
    return write_model_checkpoint(dst, 0, state)


def read_native(path: Path) -> tuple[Config, dict[str, Tensor], Path]:
    """(config, model tensors in their stored dtypes, run dir) of a run dir, `checkpoints/` or step dir."""
    checkpoint, run_dir = resolve_native_checkpoint(Path(path))
    adapters = read_marker(checkpoint).get("adapters")
    if adapters:
        raise ConversionError(f"{checkpoint} holds {adapters.get('method', 'lora')} adapters and the parts that trained "
                              "whole, not a model: export it with --merge (merged full weights) or --adapters (the base "
                              "plus a PEFT adapter directory)")
    try:
        cfg = read_run_config(run_dir)
        state = read_model_state(checkpoint)
    except (FileNotFoundError, CheckpointReadError) as err:
        raise ConversionError(str(err)) from None
    return cfg, state, run_dir


def hf_to_native(src: Path, dst: Path) -> dict:
    """Convert an HF directory into a native run directory; returns a summary."""
    src = Path(src)
    hf_config = read_hf_config(src)
    layout = hf_layout(hf_config)
    model_cfg = hf_config_to_model_config(hf_config, name=src.resolve().name)
    used, carried = split_carried(read_hf_weights(src))
    state = hf_to_native_state(used)
    parts = ("language_model",) if layout == "lm" else ("language_model", "vision_model", "projector")
    check_against_model(state, model_cfg, parts)
    step_dir = write_native(dst, model_cfg, state, source=src, carried=carried)
    return {"layout": layout, "tensors": len(state), "carried": sorted(carried), "checkpoint": str(step_dir)}


@dataclasses.dataclass(frozen=True)
class HFAsNative:
    """An HF directory seen as a native model state, read lazily (`open_hf_as_native`)."""

    layout: Layout
    model_config: ModelConfig  # what its config.json describes
    shapes: dict[str, tuple[int, ...]]  # native name -> whole shape, for the parts it holds
    read: Callable[[str, tuple[slice, ...]], Tensor]  # (native name, one slice per dim) -> that part of it


@contextlib.contextmanager
def open_hf_as_native(src: Path) -> Iterator[HFAsNative]:
    """What `hf_to_native` converts, in memory and nothing written: the same config translation and
    name mapping (carried tensors left out: the model has no place for them), each tensor read only
    when asked for while the block is open (`init.from_checkpoint` on a released directory)."""
    src = Path(src)
    hf_config = read_hf_config(src)
    layout = hf_layout(hf_config)
    model_cfg = hf_config_to_model_config(hf_config, name=src.resolve().name)
    with open_hf_weights(src) as slices:
        used, _ = split_carried(slices)
        native = hf_to_native_state(used)  # renames only: lazy slices map like tensors
        yield HFAsNative(layout, model_cfg, {k: tuple(s.get_shape()) for k, s in native.items()},
                         lambda key, index: native[key][index])


def native_to_hf(src: Path, dst: Path, layout: Layout = "lm", dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, image_token_id: int | None = None,
                 tokenizer: str | Path | None = None, weights_only: bool = False,
                 weights: tuple[Config, dict[str, Tensor], Path] | None = None) -> dict:
    """Export a native run/checkpoint dir as an HF directory (`lm`: NemotronHForCausalLM, loadable
    with AutoModelForCausalLM; `vl`: the nemotron_h_omni layout). `dtype` None keeps stored dtypes.

    With the weights go the tokenizer, generation config and (vl) processor files (see
    `train.hf.serving`); `tokenizer` overrides the run's, `weights_only` leaves them out. `weights`:
    (config, native state, run dir) already in memory (an adapter run's base or merged model) instead
    of reading `src`'s checkpoint."""
    cfg, state, run_dir = weights if weights is not None else read_native(src)
    if layout == "vl" and not any(k.startswith("vision_model.") for k in state):
        raise ConversionError(f"{src} holds only language model weights: export it with layout 'lm'")
    source = run_dir / SOURCE_DIR
    tokenizer_dir = export_tokenizer = None
    if not weights_only:  # checked before anything is written, so a bad tokenizer leaves no half export
        try:
            tokenizer_dir = (source if tokenizer is None and has_tokenizer(source)
                             else find_tokenizer(cfg, run_dir, tokenizer))
            export_tokenizer = load_tokenizer(tokenizer_dir, cfg.model.language_model.vocab_size)
            if layout == "vl" and image_token_id is None:  # the exported tokenizer's, so the two agree
                image_token_id = image_token_id_of(export_tokenizer)
        except ServingFilesError as err:
            raise ConversionError(str(err)) from None
    base = read_hf_config(source) if (source / "config.json").exists() else None
    hf_config = export_config(cfg.model, layout, base, image_token_id)
    hf_state = native_to_hf_state(state, layout)
    carried_meta = {}
    if (source / EXTRA_NAME).exists():
        hf_state.update(relayout_carried(read_hf_weights_file(source / EXTRA_NAME), layout))
        carried_meta = read_weights_metadata(source / EXTRA_NAME)
    video_embedder = None
    if layout == "vl":  # every tensor the omni class has: see train.hf.untrained for the ones we never train
        added, video_embedder = complete_vl_state(hf_state, state, cfg.model, hf_config["vision_config"], carried_meta)
        hf_state.update(added)
    if dtype is not None:
        hf_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_state.items()}
    float_dtypes = {v.dtype for v in hf_state.values() if v.is_floating_point()}
    hf_config.pop("dtype", None)
    if len(float_dtypes) == 1:
        hf_config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
    dst = fresh_dir(dst)
    if source.is_dir():
        copy_small_files(source, dst, skip=("config.json",))
    (dst / "config.json").write_text(config_json_text(hf_config))
    files = write_hf_weights(hf_state, dst, max_shard_bytes)
    summary = {"layout": layout, "tensors": len(hf_state), "files": files, "dst": str(dst)}
    if video_embedder is not None:
        summary["video_embedder"] = video_embedder
    if tokenizer_dir is not None:
        summary["serving_files"] = write_serving_files(dst, cfg, layout, export_tokenizer)
        summary["tokenizer"] = str(tokenizer_dir)
    return summary
