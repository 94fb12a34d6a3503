"""Load a trained language model for use: from a native run / checkpoint directory or from a
transformers Nemotron-H directory (see `train.api.load_language_model`)."""

from __future__ import annotations

from pathlib import Path

import torch

from train.checkpoint.files import read_marker, read_run_config, resolve_native_checkpoint
from train.checkpoint.store import read_model_state
from train.model.language_model import HybridLanguageModel


def load_language_model(path: str | Path) -> HybridLanguageModel:
    path = Path(path)
    if (path / "config.json").exists():
        return _load_hf_language_model(path)
    checkpoint, run_dir = resolve_native_checkpoint(path)
    if read_marker(checkpoint).get("adapters"):  # an adapter run's: its base with the adapters merged, in memory
        from train.engines.assembly import merged_adapter_weights

        cfg, state, _ = merged_adapter_weights(checkpoint, log=lambda _: None)
        model = HybridLanguageModel(cfg.model.language_model)
        model.load_state_dict({k.removeprefix("language_model."): v for k, v in state.items()
                               if k.startswith("language_model.")})
        return model.eval()
    cfg = read_run_config(run_dir)
    model = HybridLanguageModel(cfg.model.language_model)
    # Load only the language model's keys out of the full VLM checkpoint.
    state = read_model_state(checkpoint, into={f"language_model.{k}": v for k, v in model.state_dict().items()})
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in state.items()})
    return model.eval()


def _load_hf_language_model(path: Path) -> HybridLanguageModel:
    # Imported here: they pull in transformers and safetensors, which native loads never need.
    from train.hf.config import hf_layout, hf_lm_config_to_ours, read_hf_config
    from train.hf.files import read_hf_weights
    from train.hf.mapping import hf_to_native_state, split_carried

    hf_config = read_hf_config(path)
    if hf_layout(hf_config) == "vl":
        hf_config = hf_config["text_config"]
    used, _ = split_carried(read_hf_weights(path))
    state = hf_to_native_state({k: v for k, v in used.items() if not k.startswith(("mlp1.", "vision_model."))})
    with torch.device("meta"):
        model = HybridLanguageModel(hf_lm_config_to_ours(hf_config))
    # assign=True adopts the loaded tensors instead of allocating (and randomly initialising) a copy.
    model.load_state_dict({k.removeprefix("language_model."): v.float() for k, v in state.items()}, assign=True)
    return model.eval()
