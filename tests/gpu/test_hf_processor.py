"""The processor files of a VL export, through transformers' own nemotron_h_omni processor.

transformers' processor imports torchvision, whose PyPI builds need CUDA torch: it runs where the
`gpu` extra is installed. It also runs the README's "VL inference from Python" lines. On CPU, tests/integration/test_chat.py checks the same export's model and
tokenizer against train.chat with pixels normalised from the exported preprocessor_config.json.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.training.tiling import IMAGE_NORMALIZATION
from tests.gpu import import_backend
from train.config.schema import ModelConfig, VisionConfig
from train.hf.conversion import native_to_hf, write_native
from train.model.vlm import VisionLanguageModel

pytestmark = pytest.mark.gpu


def test_exported_processor_reproduces_training_pixels_and_tokens(tmp_path, tokenizer):
    import_backend("torchvision", "(transformers' processor imports it; the `gpu` extra installs it)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vision = VisionConfig(num_cls_tokens=2, num_registers=2, max_image_size=128, final_norm=False, layer_scale=True)
    cfg = ModelConfig(vision=vision)
    model = VisionLanguageModel(cfg, image_token_id=tokenizer.special_ids["<image>"])
    write_native(tmp_path / "native", cfg, model.state_dict())
    native_to_hf(tmp_path / "native", tmp_path / "hf", layout="vl", tokenizer=tokenizer.path)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor).__name__ == "NemotronH_Omni_Reasoning_V3Processor"

    # One tile-sized image: the processor keeps its pixels (no resize) and normalises as training does.
    tile = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(tile.permute(1, 2, 0).numpy().astype(np.uint8))
    out = processor(text="<image>\nWhat shape?", images=[image], return_tensors="pt")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGE_NORMALIZATION[vision.normalization])
    ours = ((tile.float() / 255 - mean) / std).reshape(3, 4, 16, 4, 16).permute(1, 3, 0, 2, 4).reshape(16, 768)
    assert out["image_grid_hw"].tolist() == [[4, 4]]
    torch.testing.assert_close(out["pixel_values"].reshape(16, 768), ours, atol=1e-5, rtol=1e-5)
    # The placeholder becomes training's one-image block: <img>, a context token per embedding, </img>.
    ids = out["input_ids"][0].tolist()
    special = tokenizer.special_ids
    block = [special["<img>"]] + [special["<image>"]] * cfg.tokens_per_tile + [special["</img>"]]
    assert ids[:len(block)] == block


    # The README's "VL inference from Python" as written there: every tensor of the model loads from the
    # export, and generating from the processor's inputs is generating from training's pixels.
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    messages = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "<image>\nWhat shape?"}]
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=4)
        logits = model(**inputs).logits
        expected = model(input_ids=inputs["input_ids"], pixel_values=ours, image_grid_hw=torch.tensor([[4, 4]])).logits
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), str)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
