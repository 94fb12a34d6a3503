"""Load a trained language model for use: from a native run / checkpoint directory or from a
transformers Nemotron-H directory (see `train.api.load_language_model`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml

from train.checkpoint.store import dcp_quietly, resolve_native_checkpoint
from train.config.schema import Config, from_dict
from train.model.language_model import HybridLanguageModel


def load_language_model(path: str | Path) -> HybridLanguageModel:
    path = Path(path)
    if (path / "config.json").exists():
        return _load_hf_language_model(path)
    checkpoint, run_dir = resolve_native_checkpoint(path)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: a native checkpoint needs its run's config.yaml")
    cfg = from_dict(Config, yaml.safe_load(config_file.read_text()))
    model = HybridLanguageModel(cfg.model.language_model)
    # Load only the language model's keys out of the full VLM checkpoint.
    state = {"model": {f"language_model.{k}": v for k, v in model.state_dict().items()}}
    with dcp_quietly():
        dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in state["model"].items()})
    return model.eval()


def _load_hf_language_model(path: Path) -> HybridLanguageModel:
    # Imported here: it pulls in transformers, which native loads never need.
    from train.hf import conversion as hf_convert

    hf_config = hf_convert.read_hf_config(path)
    if hf_convert.hf_layout(hf_config) == "vl":
        hf_config = hf_config["text_config"]
    used, _ = hf_convert.split_carried(hf_convert.read_hf_weights(path))
    state = hf_convert.hf_to_native_state({k: v for k, v in used.items() if not k.startswith(("mlp1.", "vision_model."))})
    with torch.device("meta"):
        model = HybridLanguageModel(hf_convert.hf_lm_config_to_ours(hf_config))
    # assign=True adopts the loaded tensors instead of allocating (and randomly initialising) a copy.
    model.load_state_dict({k.removeprefix("language_model."): v.float() for k, v in state.items()}, assign=True)
    return model.eval()
