"""transformers config.json <-> our config: `nemotron_h` (NemotronHForCausalLM) language models,
`nemotron_h_omni` (the released VL layout) and RADIO vision towers. Every HF setting our model cannot
represent exactly is refused with a ConversionError naming it; an export's config.json keeps the
source's unmodelled fields (token ids, cache settings, ...)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

from data_pipelines.training.tiling import IMAGE_NORMALIZATION
from train.config.schema import LanguageModelConfig, ModelConfig, ProjectorConfig, VisionConfig
from train.hf.errors import ConversionError
from train.hf.serving import VIDEO_TEMPORAL_PATCH

Layout = Literal["lm", "vl"]
LAYER_KINDS = {"M": "mamba", "*": "attention", "-": "mlp"}


def decode_special_floats(obj):
    """transformers writes inf/nan in config.json as {"__float__": "Infinity"}; decode them."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_special_floats(v) for v in obj]
    return obj


def encode_special_floats(obj):
    """The inverse, so the config.json we write is strict JSON that transformers reads back."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_special_floats(v) for v in obj]
    return obj


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} is missing: not a transformers checkpoint directory")
    return decode_special_floats(json.loads(path.read_text()))


def config_json_text(hf_config: dict) -> str:
    """config.json's text for `hf_config` (strict JSON, keys sorted)."""
    return json.dumps(encode_special_floats(hf_config), indent=2, sort_keys=True, allow_nan=False) + "\n"


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

    raw = decode_special_floats(dict(hf_config_dict))
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

    omni = NemotronH_Omni_Reasoning_V3_Config.from_dict(decode_special_floats(dict(hf_config)))
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


# Fields the weights of an HF checkpoint do not fix: the dt_bias initialisation range and the init
# scale (overwritten by the loaded weights), the SSD scan's chunking (the same sums, tiled otherwise)
# and the tile size (the ViT's position table is resized to any tile grid).
FREE_FIELDS = {
    "language_model": {"chunk_size", "time_step_min", "time_step_max", "time_step_floor", "initializer_range"},
    "vision": {"image_size"},
    "projector": set(),
}


def model_config_differences(ours: ModelConfig, hf: ModelConfig, layout: Layout) -> list[tuple[str, object, object]]:
    """(field under `model.`, our value, the HF config's) for every field of the parts an HF
    checkpoint of `layout` holds (its language model; with `vl` also the vision tower and projector)
    where `ours` describes another model than the one its weights were trained as."""
    differ = []
    for part in ("language_model",) + (("vision", "projector") if layout == "vl" else ()):
        mine, theirs = getattr(ours, part), getattr(hf, part)
        for f in dataclasses.fields(mine):
            a, b = getattr(mine, f.name), getattr(theirs, f.name)
            if f.name not in FREE_FIELDS[part] and a != b:
                differ.append((f"{part}.{f.name}", a, b))
    return differ


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
            # transformers' omni model embeds video in tubelets of this many frames; our model embeds
            # frames one by one as images, so the export derives the tubelet embedder from the image
            # patch embedding (or keeps an HF source's own): see train.hf.untrained.
            "video_temporal_patch_size": VIDEO_TEMPORAL_PATCH,
        },
        "video_temporal_patch_size": VIDEO_TEMPORAL_PATCH,
        "force_image_size": v.image_size,
        "downsample_ratio": cfg.projector.downsample_ratio,
        "projector_hidden_size": cfg.projector.hidden_size,
        "vision_hidden_size": v.hidden_size,
        "image_token_id": image_token_id,
    }


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


def export_config(cfg: ModelConfig, layout: Layout, base: dict | None, image_token_id: int | None) -> dict:
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
