"""The Stage 0 start from released parts: an HF Nemotron-H language model + an HF RADIO vision
encoder + a freshly initialised (seeded) projector -> one native checkpoint.

`python -m train.convert compose --lm DIR --vision DIR --dst DIR` writes a run directory in the
layout `hf_to_native` writes (config.yaml, checkpoints/step_0000000, hf_source/), so
`init.from_checkpoint=DST/checkpoints/step_0000000` starts Stage 0 from it and
`native-to-hf --layout vl` exports it as transformers' nemotron_h_omni. The RADIO directory is
what `RadioModel.save_pretrained` writes (`radio_model.*` tensors, `model_type: radio`); its
tensors land where the omni layout keeps them (`vision_model.radio_model.*`), so the name mapping
is the one `train.hf.mapping` holds and `train.hf.conversion` proves against transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from train.config.schema import ModelConfig, ProjectorConfig
from train.hf.config import hf_layout, hf_lm_config_to_ours, radio_config_to_ours, read_hf_config
from train.hf.conversion import check_against_model, write_native
from train.hf.errors import ConversionError
from train.hf.files import SOURCE_DIR, read_hf_weights
from train.hf.mapping import hf_to_native_state, split_carried
from train.model.projector import Projector

VISION_CONFIG_NAME = "vision_config.json"  # the RADIO source's config.json, kept in hf_source/


def read_radio(vision_dir: Path, image_size: int | None):
    """(our VisionConfig, native vision tensors, carried RADIO tensors under omni names)."""
    from transformers import RadioConfig

    raw = read_hf_config(vision_dir)
    if raw.get("model_type") != "radio":
        raise ConversionError(f"{vision_dir}/config.json has model_type={raw.get('model_type')!r}: --vision takes a "
                              "transformers RADIO directory (model_type 'radio', what RadioModel.save_pretrained writes)")
    radio = RadioConfig.from_dict(raw)
    vision = radio_config_to_ours(radio, image_size or radio.image_size)
    tensors = read_hf_weights(vision_dir)
    strange = sorted(k for k in tensors if not k.startswith("radio_model."))
    if strange:
        raise ConversionError(f"{vision_dir} holds tensors outside radio_model.*, e.g. {strange[:3]}: not a RadioModel")
    used, carried = split_carried({"vision_model." + k: v for k, v in tensors.items()})
    return vision, hf_to_native_state(used), carried


def compose(lm_dir: Path, vision_dir: Path, dst: Path, seed: int = 0, projector_hidden_size: int | None = None,
            downsample_ratio: float = 0.5, image_size: int | None = None) -> dict:
    """Write the composed native run directory; returns a summary. The projector's hidden width
    defaults to 4x the LM's (the released 12B: 20480 for 5120)."""
    lm_dir, vision_dir = Path(lm_dir), Path(vision_dir)
    lm_config = read_hf_config(lm_dir)
    if hf_layout(lm_config) != "lm":
        raise ConversionError(f"{lm_dir} is a {hf_layout(lm_config)} checkpoint: --lm takes a nemotron_h language model")
    language_model = hf_lm_config_to_ours(lm_config)
    lm_used, lm_carried = split_carried(read_hf_weights(lm_dir))
    vision, vision_state, vision_carried = read_radio(vision_dir, image_size)
    projector_cfg = ProjectorConfig(downsample_ratio=downsample_ratio,
                                    hidden_size=projector_hidden_size or 4 * language_model.hidden_size)
    cfg = ModelConfig(name=f"{lm_dir.resolve().name}+{vision_dir.resolve().name}", language_model=language_model,
                      vision=vision, projector=projector_cfg)
    cfg.validate("model")

    projector = Projector(projector_cfg, vision.hidden_size, language_model.hidden_size)
    projector.reset_parameters(torch.Generator().manual_seed(seed))
    lm_dtype = next(iter(lm_used.values())).dtype
    state = {**hf_to_native_state(lm_used), **vision_state,
             **{f"projector.{k}": v.to(lm_dtype) for k, v in projector.state_dict().items()}}
    check_against_model(state, cfg, ("language_model", "vision_model", "projector"))
    step_dir = write_native(dst, cfg, state, source=lm_dir, carried={**lm_carried, **vision_carried})
    shutil.copy2(vision_dir / "config.json", Path(dst) / SOURCE_DIR / VISION_CONFIG_NAME)
    return {"checkpoint": str(step_dir), "language_model_tensors": len(lm_used), "vision_tensors": len(vision_state),
            "projector": {"hidden_size": projector_cfg.hidden_size, "seed": seed},
            "carried": sorted({**lm_carried, **vision_carried})}
