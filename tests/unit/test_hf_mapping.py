"""The one HF <-> native <-> megatron mapping table: it names every tensor of the model exactly once,
and a tensor without a row is refused, never dropped."""

from __future__ import annotations

import pytest
import torch

from train.config.schema import LanguageModelConfig, ModelConfig
from train.hf.errors import ConversionError
from train.hf.mapping import (
    LANGUAGE_MODEL,
    hf_key_to_native,
    language_model_tensors,
    native_key_to_hf,
    native_to_hf_state,
)
from train.model.language_model import HybridLanguageModel
from train.model.vlm import VisionLanguageModel

LM = LanguageModelConfig(pattern="M-M*M-*-")


def test_every_language_model_tensor_has_exactly_one_row():
    with torch.device("meta"):
        names = list(HybridLanguageModel(LM).state_dict())
    rows = [t.name for t in language_model_tensors(LM.pattern)]
    assert sorted(rows) == sorted(names) and len(set(rows)) == len(rows)
    # Each megatron parameter holds one native tensor, except linear_qkv: q, k and v, one of each.
    holders: dict[str, list[str]] = {}
    for t in language_model_tensors(LM.pattern):
        holders.setdefault(t.megatron, []).append(t.qkv)
    assert all(h == [""] or sorted(h) == ["k", "q", "v"] for h in holders.values())
    assert {row.layer for row in LANGUAGE_MODEL} == {"", "M", "*", "-"}


@pytest.mark.parametrize("layout", ["lm", "vl"])
def test_every_vlm_tensor_maps_to_hf_and_back(layout):
    with torch.device("meta"):
        state = VisionLanguageModel(ModelConfig(language_model=LM), image_token_id=0).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("vision_model.norm.")}  # RADIO has no final norm
    hf = native_to_hf_state(state, layout)
    expected = [k for k in state if layout == "vl" or k.startswith("language_model.")]
    assert sorted(hf_key_to_native(k) for k in hf) == sorted(expected)
    assert native_key_to_hf("vision_model.cls_token", "vl") == "vision_model.radio_model.model.patch_generator.cls_token.token"


def test_a_tensor_without_a_row_is_refused():
    for key in ("backbone.layers.0.mixer.gate.weight", "language_model.backbone.extra", "vision_model.radio_model.model.norm.weight"):
        with pytest.raises(ConversionError, match="no native name"):
            hf_key_to_native(key)
    with pytest.raises(ConversionError, match="no HF name"):
        native_key_to_hf("projector.mlp1.0.weight", "lm")
