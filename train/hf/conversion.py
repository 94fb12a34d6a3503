"""transformers checkpoints <-> our native run directories, offline and without remote code.

Two HF layouts are understood, both as stored on disk (what `save_pretrained` writes and the
released checkpoints hold):

- `lm`: `NemotronHForCausalLM` (`model_type: nemotron_h`): `backbone.*`, `lm_head.weight`.
- `vl`: `NemotronH_Omni_Reasoning_V3` (`model_type: nemotron_h_omni`; the released VL weight
  names): `language_model.{backbone.*,lm_head.weight}`, `mlp1.{0,1,3}.weight`, and a RADIO ViT under
  `vision_model.radio_model.model.{patch_generator.{embedder,pos_embed,cls_token.token},blocks.N.*}`.
  Remote-code configs (`NemotronH_Nano_VL_V2`) use the same weight names but a config.json that
  transformers' omni config class rejects; they are refused with a message saying so.

Our names follow the same modules, so mapping is a prefix rewrite (plus three RADIO patch
generator names). Tensors of an HF checkpoint that our model does not use (RADIO's video
embedder, summary indices, input normaliser, identity layer scales, MTP heads) are listed in
`CARRIED_PATTERNS`: they are carried unchanged next to the native checkpoint and written back on
export, so HF -> native -> HF is bit-exact. Any other unknown tensor is an error, never a drop.

Native directory (what `python -m train.convert hf-to-native` writes, a run directory):
`config.yaml`, `checkpoints/step_0000000/` (a model-only DCP checkpoint whose keys are the VLM's
`language_model.*`, `vision_model.*`, `projector.*`; only `language_model.*` for an LM-only
source), `checkpoints/latest`, and `hf_source/` (the source's config.json, tokenizer and other
small files, and `extra.safetensors` with the carried tensors).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from data_pipelines.training.tiling import IMAGE_NORMALIZATION
from train.checkpoint.store import COMPLETE_MARKER, dcp_quietly, resolve_native_checkpoint, step_dir_name
from train.config.schema import (
    Config,
    LanguageModelConfig,
    ModelConfig,
    ProjectorConfig,
    RunConfig,
    VisionConfig,
    from_dict,
)
from train.hf.serving import (
    VIDEO_TEMPORAL_PATCH,
    ServingFilesError,
    find_tokenizer,
    has_tokenizer,
    image_token_id_of,
    load_tokenizer,
    write_serving_files,
)

Layout = Literal["lm", "vl"]
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SOURCE_DIR = "hf_source"
EXTRA_NAME = "extra.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

LAYER_KINDS = {"M": "mamba", "*": "attention", "-": "mlp"}
RADIO = "vision_model.radio_model."
RADIO_MODEL = RADIO + "model."
# HF tensors with no counterpart in our model. Carried, never dropped: see the module docstring.
CARRIED_PATTERNS = (
    re.compile(r"^vision_model\.radio_model\.model\.patch_generator\.video_embedder\."),
    re.compile(r"^vision_model\.radio_model\.summary_idxs$"),
    re.compile(r"^vision_model\.radio_model\.input_conditioner\."),
    re.compile(r"^(language_model\.)?mtp\."),
)
# (HF name under RADIO_MODEL, our name under vision_model.)
RADIO_RENAMES = (
    ("patch_generator.embedder.", "patch_embed."),
    ("patch_generator.pos_embed", "pos_embed"),
    ("patch_generator.cls_token.token", "cls_token"),
    ("blocks.", "blocks."),
)


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted faithfully; the message says why."""


# ---------------------------------------------------------------------------------------------
# configs


def _decode_special_floats(obj):
    """transformers writes inf/nan in config.json as {"__float__": "Infinity"}; decode them."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def _encode_special_floats(obj):
    """The inverse, so the config.json we write is strict JSON that transformers reads back."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} is missing: not a transformers checkpoint directory")
    return _decode_special_floats(json.loads(path.read_text()))


def hf_layout(hf_config: dict) -> Layout:
    model_type = hf_config.get("model_type")
    if model_type == "nemotron_h":
        return "lm"
    if model_type == "nemotron_h_omni":
        return "vl"
    raise ConversionError(
        f"model_type={model_type!r} is not supported: expected 'nemotron_h' (NemotronHForCausalLM) or "
        "'nemotron_h_omni' (the released VL layout); remote-code configs (e.g. NemotronH_Nano_VL_V2) "
        "need their config.json rewritten in the nemotron_h_omni format first")


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ConversionError(f"unsupported HF setting: {what} (our model cannot represent it exactly)")


def hf_lm_config_to_ours(hf_config_dict: dict) -> LanguageModelConfig:
    """`nemotron_h` config.json (any transformers/remote-code era field names) -> our LM config."""
    from transformers import NemotronHConfig

    raw = _decode_special_floats(dict(hf_config_dict))
    if "head_dim" not in raw and "attention_head_dim" in raw:  # pre-transformers remote-code name
        raw["head_dim"] = raw["attention_head_dim"]
    hf = NemotronHConfig.from_dict(raw)
    pattern = hf.hybrid_override_pattern
    _require(set(pattern) <= set(LAYER_KINDS), f"layer pattern {pattern!r} has MoE ('E') layers")
    _require(hf.mamba_hidden_act == "silu", f"mamba_hidden_act={hf.mamba_hidden_act!r}")
    _require(hf.mlp_hidden_act == "relu2", f"mlp_hidden_act={hf.mlp_hidden_act!r}")
    _require(not hf.use_bias and not hf.mlp_bias and not hf.attention_bias, "linear biases")
    _require(hf.use_conv_bias, "use_conv_bias=false")
    _require(not hf.tie_word_embeddings, "tie_word_embeddings=true")
    return LanguageModelConfig(
        pattern=pattern, hidden_size=hf.hidden_size, vocab_size=hf.vocab_size,
        num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim, mamba_num_heads=hf.mamba_num_heads, mamba_head_dim=hf.mamba_head_dim,
        ssm_state_size=hf.ssm_state_size, n_groups=hf.n_groups, conv_kernel=hf.conv_kernel,
        chunk_size=hf.chunk_size, mlp_hidden_size=hf.intermediate_size, norm_eps=float(hf.layer_norm_epsilon),
        time_step_min=float(hf.time_step_min), time_step_max=float(hf.time_step_max),
        time_step_floor=float(hf.time_step_floor), initializer_range=float(hf.initializer_range),
        time_step_limit=_time_step_limit(raw),
    )


def _time_step_limit(raw: dict) -> list[float]:
    # Older configs (and the released remote code's) may omit it: the kernels' default then applies.
    low, high = raw.get("time_step_limit") or (0.0, math.inf)
    return [float(low), float(high)]


def ours_to_hf_lm_config(cfg: LanguageModelConfig) -> dict:
    """Our LM config -> a `nemotron_h` config.json dict. The pattern is written as
    `hybrid_override_pattern` (+ `num_hidden_layers`), which every transformers version and the
    released remote code read."""
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": cfg.pattern,
        "num_hidden_layers": len(cfg.pattern),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": cfg.ssm_state_size,
        "n_groups": cfg.n_groups,
        "conv_kernel": cfg.conv_kernel,
        "chunk_size": cfg.chunk_size,
        "intermediate_size": cfg.mlp_hidden_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "time_step_min": cfg.time_step_min,
        "time_step_max": cfg.time_step_max,
        "time_step_floor": cfg.time_step_floor,
        "time_step_limit": list(cfg.time_step_limit),
        "initializer_range": cfg.initializer_range,
        "mamba_hidden_act": "silu",
        "mlp_hidden_act": "relu2",
        "use_bias": False,
        "use_conv_bias": True,
        "mlp_bias": False,
        "attention_bias": False,
        "tie_word_embeddings": False,
    }


def _normalization_name(mean, std) -> str:
    for name, (ref_mean, ref_std) in IMAGE_NORMALIZATION.items():
        if all(abs(a - b) < 1e-6 for a, b in zip([*mean, *std], [*ref_mean, *ref_std])):
            return name
    raise ConversionError(f"RADIO norm_mean={mean} norm_std={std} match none of {sorted(IMAGE_NORMALIZATION)}")


def hf_config_to_model_config(hf_config: dict, name: str = "hf") -> ModelConfig:
    """A whole config.json -> our ModelConfig. For an LM-only source the vision tower and projector
    keep our defaults (the native checkpoint then holds no weights for them). A VL config is read
    through transformers' own config class, so legacy field names mean what they mean there."""
    if hf_layout(hf_config) == "lm":
        return ModelConfig(name=name, language_model=hf_lm_config_to_ours(hf_config))
    from transformers.models.nemotron_h_omni import NemotronH_Omni_Reasoning_V3_Config

    omni = NemotronH_Omni_Reasoning_V3_Config.from_dict(_decode_special_floats(dict(hf_config)))
    vision = omni.vision_config
    _require(omni.audio_config is None, "an audio tower (audio_config)")
    _require(omni.vision_hidden_size == vision.hidden_size, "vision_hidden_size != vision_config.hidden_size")
    _require(omni.text_config.num_nextn_predict_layers == 0, "MTP layers (vision_final_layernorm)")
    return ModelConfig(
        name=name,
        language_model=hf_lm_config_to_ours(omni.text_config.to_dict()),
        vision=radio_config_to_ours(vision, omni.force_image_size or vision.image_size),
        projector=ProjectorConfig(downsample_ratio=float(omni.downsample_ratio), hidden_size=omni.projector_hidden_size),
    )


def radio_config_to_ours(vision, image_size: int) -> VisionConfig:
    """transformers' `RadioConfig` (standalone or an omni model's vision_config) -> our VisionConfig
    for tiles of `image_size` pixels."""
    _require(not vision.use_swiglu_ffn, "RADIO use_swiglu_ffn=true")
    _require(vision.hidden_act == "gelu", f"RADIO hidden_act={vision.hidden_act!r}")
    _require(vision.qkv_bias, "RADIO qkv_bias=false")
    _require(vision.num_channels == 3, f"RADIO num_channels={vision.num_channels}")
    return VisionConfig(
        image_size=image_size, patch_size=vision.patch_size, hidden_size=vision.hidden_size,
        num_layers=vision.num_hidden_layers, num_heads=vision.num_attention_heads, mlp_ratio=float(vision.mlp_ratio),
        norm_eps=float(vision.layer_norm_eps), normalization=_normalization_name(vision.norm_mean, vision.norm_std),
        num_cls_tokens=vision.num_cls_tokens, num_registers=vision.num_registers,
        max_image_size=vision.max_img_size, final_norm=False, layer_scale=True,
    )


def ours_to_hf_vl_config(cfg: ModelConfig, image_token_id: int | None = None) -> dict:
    """Our ModelConfig -> a `nemotron_h_omni` config.json dict (RADIO vision tower)."""
    v = cfg.vision
    if v.final_norm:
        raise ConversionError("RADIO has no LayerNorm after its last block: the VL layout needs model.vision.final_norm=false")
    mean, std = IMAGE_NORMALIZATION[v.normalization]
    text = ours_to_hf_lm_config(cfg.language_model)
    del text["architectures"]
    return {
        "architectures": ["NemotronH_Omni_Reasoning_V3"],
        "model_type": "nemotron_h_omni",
        "text_config": text,
        "vision_config": {
            "model_type": "radio", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "mlp_ratio": v.mlp_ratio, "hidden_act": "gelu", "qkv_bias": True,
            "use_swiglu_ffn": False, "layer_norm_eps": v.norm_eps, "patch_size": v.patch_size, "image_size": v.image_size,
            "max_img_size": v.max_image_size or v.image_size, "num_cls_tokens": v.num_cls_tokens,
            "num_registers": v.num_registers, "summary_idxs": list(range(min(2, v.num_cls_tokens))),
            "norm_mean": list(mean), "norm_std": list(std),
            # transformers' omni config requires a temporal video embedder (its weights are carried
            # from an HF source, or left to HF's init); our model embeds video frames one by one.
            "video_temporal_patch_size": VIDEO_TEMPORAL_PATCH,
        },
        "video_temporal_patch_size": VIDEO_TEMPORAL_PATCH,
        "force_image_size": v.image_size,
        "downsample_ratio": cfg.projector.downsample_ratio,
        "projector_hidden_size": cfg.projector.hidden_size,
        "vision_hidden_size": v.hidden_size,
        "image_token_id": image_token_id,
    }


# ---------------------------------------------------------------------------------------------
# state dicts


def is_carried(hf_key: str) -> bool:
    return any(p.search(hf_key) for p in CARRIED_PATTERNS)


def split_carried(hf_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(tensors our model uses, tensors carried unchanged)."""
    used, carried = {}, {}
    for key, tensor in hf_state.items():
        (carried if is_carried(key) else used)[key] = tensor
    return used, carried


def _hf_key_to_native(key: str) -> str:
    if key.startswith("backbone.") or key == "lm_head.weight":  # lm layout
        return "language_model." + key
    if key.startswith("language_model.backbone.") or key == "language_model.lm_head.weight":
        return key
    if key.startswith("mlp1."):
        return "projector." + key
    if key.startswith(RADIO_MODEL):
        rest = key[len(RADIO_MODEL):]
        for hf_name, ours in RADIO_RENAMES:
            if rest.startswith(hf_name):
                return "vision_model." + ours + rest[len(hf_name):]
    raise ConversionError(f"no native name for HF tensor {key!r}")


def _native_key_to_hf(key: str, layout: Layout) -> str:
    if key.startswith("language_model."):
        return key.removeprefix("language_model.") if layout == "lm" else key
    if key.startswith("projector.mlp1."):
        return key.removeprefix("projector.")
    if key.startswith("vision_model."):
        rest = key.removeprefix("vision_model.")
        for hf_name, ours in RADIO_RENAMES:
            if rest.startswith(ours):
                return RADIO_MODEL + hf_name + rest[len(ours):]
    raise ConversionError(f"no HF name for native tensor {key!r} (layout {layout})")


def hf_to_native_state(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF on-disk names (lm or vl layout, carried tensors removed) -> VLM state dict names."""
    return {_hf_key_to_native(k): v for k, v in hf_state.items()}


def native_to_hf_state(state: dict[str, Tensor], layout: Layout = "lm") -> dict[str, Tensor]:
    """VLM state dict -> HF on-disk names. `lm` keeps only the language model."""
    if layout == "lm":
        state = {k: v for k, v in state.items() if k.startswith("language_model.")}
    return {_native_key_to_hf(k, layout): v for k, v in state.items()}


def relayout_carried(carried: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Carried tensors of either source layout, named for `layout` (an LM export keeps only the
    language model's)."""
    out = {}
    for key, tensor in carried.items():
        lm_key = key.removeprefix("language_model.") if key.startswith("language_model.") else None
        if layout == "lm":
            if lm_key is not None or key.startswith("mtp."):
                out[lm_key or key] = tensor
        else:
            out["language_model." + key if key.startswith("mtp.") else key] = tensor
    return out


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


# ---------------------------------------------------------------------------------------------
# safetensors directories


def read_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise ConversionError(f"{hf_dir} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    state = {}
    for name in files:
        state.update(read_hf_weights_file(hf_dir / name))
    return state


def read_hf_weights_file(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _save_readable(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors writes its files private (0600); give them the mode every other file of the export
    gets (0666 less the umask), so a serving user or a shared model directory can read them."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_hf_weights(state: dict[str, Tensor], dst: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `state` in order as `model.safetensors`, or as `model-0000i-of-0000N.safetensors` shards
    of at most `max_shard_bytes` (a bigger tensor gets a shard of its own) plus the index."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        _save_readable(shards[0], dst / WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _save_readable(shard, dst / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _is_weight_file(name: str) -> bool:
    return name == INDEX_NAME or name.endswith(".safetensors") or name.endswith(".bin") or name.endswith(".pt")


def _fresh_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ConversionError(f"{path} exists and is not empty: choose a new destination")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# native run directories


def write_native(dst: Path, model_cfg: ModelConfig, state: dict[str, Tensor], source: Path | None = None,
                 carried: dict[str, Tensor] | None = None) -> Path:
    """A run directory holding `state` as a model-only DCP checkpoint at step 0; returns the step dir."""
    dst = _fresh_dir(dst)
    cfg = Config(stage="hf_import", run=RunConfig(dir=str(dst.resolve())), model=model_cfg)
    (dst / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if source is not None:
        keep = dst / SOURCE_DIR
        keep.mkdir()
        for item in sorted(Path(source).iterdir()):
            if item.is_file() and not _is_weight_file(item.name):
                shutil.copy2(item, keep / item.name)
        if carried:
            save_file({k: v.contiguous() for k, v in carried.items()}, str(keep / EXTRA_NAME), metadata={"format": "pt"})
    root = dst / "checkpoints"
    root.mkdir()
    tmp, final = root / f".tmp_{step_dir_name(0)}", root / step_dir_name(0)
    with dcp_quietly():
        dcp.save({"model": state}, checkpoint_id=str(tmp))
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": 0}))
    os.replace(tmp, final)
    (root / "latest").write_text(final.name + "\n")
    return final


def read_native(path: Path) -> tuple[Config, dict[str, Tensor], Path]:
    """(config, model tensors in their stored dtypes, run dir) of a run dir, `checkpoints/` or step dir."""
    checkpoint, run_dir = resolve_native_checkpoint(Path(path))
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise ConversionError(f"{config_file} is missing: a native checkpoint needs its run's config.yaml")
    cfg = from_dict(Config, yaml.safe_load(config_file.read_text()))
    try:
        metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        state = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                 for key, meta in metadata.items() if key.startswith("model.") and hasattr(meta, "properties")}
        with dcp_quietly():
            dcp.load({"model": state}, checkpoint_id=str(checkpoint))
    except BaseException as err:  # DCP wraps a damaged file's error in its CheckpointException (a BaseException)
        if not isinstance(err, Exception) and type(err).__name__ != "CheckpointException":
            raise  # KeyboardInterrupt, SystemExit
        cause = next(iter(getattr(err, "failures", {}).values()), err)  # DCP's per-rank failure
        raise ConversionError(f"checkpoint {checkpoint} (step {_step_of(checkpoint)}) cannot be read "
                              f"({type(cause).__name__}: {cause}): its files are damaged or cut; use another "
                              "step (checkpoints/step_N)") from None
    return cfg, state, run_dir


def _step_of(checkpoint: Path) -> str:
    name = Path(checkpoint).name
    return str(int(name.split("_")[1])) if name.startswith("step_") and name.split("_")[1].isdigit() else "?"


# ---------------------------------------------------------------------------------------------
# whole conversions


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


def _merged_config(ours: dict, base: dict | None) -> dict:
    """Our modelled fields over the source config, which keeps the rest (token ids, cache settings, ...)."""
    if base is None:
        return ours
    merged = {k: v for k, v in base.items() if k not in ("layers_block_type", "_name_or_path")}
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merged_config(value, merged[key])
        merged[key] = value
    return merged


def _export_config(cfg: ModelConfig, layout: Layout, base: dict | None, image_token_id: int | None) -> dict:
    """config.json for an export: our modelled fields over the HF source's config when there is one
    of the same kind (an omni source's text_config for an LM export)."""
    if base is not None and layout == "lm" and hf_layout(base) == "vl":
        base = base.get("text_config")
    if base is not None and (layout == "vl") != (base.get("model_type") == "nemotron_h_omni"):
        base = None  # an LM source cannot describe a VL export
    if layout == "lm":
        return _merged_config(ours_to_hf_lm_config(cfg.language_model), base)
    ours = ours_to_hf_vl_config(cfg, image_token_id)
    if image_token_id is None:
        del ours["image_token_id"]  # keep the source's, if any
    return _merged_config(ours, base)


def native_to_hf(src: Path, dst: Path, layout: Layout = "lm", dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, image_token_id: int | None = None,
                 tokenizer: str | Path | None = None, weights_only: bool = False) -> dict:
    """Export a native run/checkpoint dir as an HF directory (`lm`: NemotronHForCausalLM, loadable
    with AutoModelForCausalLM; `vl`: the nemotron_h_omni layout). `dtype` None keeps stored dtypes.

    With the weights go the tokenizer, generation config and (vl) processor files (see
    `train.hf.serving`); `tokenizer` overrides the run's, `weights_only` leaves them out."""
    cfg, state, run_dir = read_native(src)
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
    hf_config = _export_config(cfg.model, layout, base, image_token_id)
    hf_state = native_to_hf_state(state, layout)
    if (source / EXTRA_NAME).exists():
        hf_state.update(relayout_carried(read_hf_weights_file(source / EXTRA_NAME), layout))
    if layout == "vl":  # RADIO's summary_idxs buffer, when the source did not carry one
        hf_state.setdefault(RADIO + "summary_idxs", torch.tensor(hf_config["vision_config"]["summary_idxs"], dtype=torch.int64))
    if dtype is not None:
        hf_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_state.items()}
    float_dtypes = {v.dtype for v in hf_state.values() if v.is_floating_point()}
    hf_config.pop("dtype", None)
    if len(float_dtypes) == 1:
        hf_config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
    dst = _fresh_dir(dst)
    if source.is_dir():
        for item in sorted(source.iterdir()):
            if item.is_file() and item.name != "config.json" and not _is_weight_file(item.name):
                shutil.copy2(item, dst / item.name)
    config_text = json.dumps(_encode_special_floats(hf_config), indent=2, sort_keys=True, allow_nan=False)
    (dst / "config.json").write_text(config_text + "\n")
    files = write_hf_weights(hf_state, dst, max_shard_bytes)
    summary = {"layout": layout, "tensors": len(hf_state), "files": files, "dst": str(dst)}
    if tokenizer_dir is not None:
        summary["serving_files"] = write_serving_files(dst, cfg, layout, export_tokenizer)
        summary["tokenizer"] = str(tokenizer_dir)
    return summary
