"""HF <-> native conversion: bit-exact round trips, sharding, loading by transformers and by us."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    NemotronHConfig,
    NemotronHForCausalLM,
)
from transformers.models.nemotron_h_omni import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config
from transformers.models.radio.modeling_radio import RadioPreTrainedModel

from data_pipelines.tokenizer_train import train_tokenizer
from train import convert
from train.api import load_language_model
from train.checkpoint.store import find_latest, load_model_weights, write_model_checkpoint
from train.config.schema import LanguageModelConfig, ModelConfig, ProjectorConfig, VisionConfig
from train.hf.config import hf_lm_config_to_ours, ours_to_hf_lm_config, read_hf_config
from train.hf.conversion import hf_to_native, native_to_hf, read_native, write_native
from train.hf.errors import ConversionError
from train.hf.files import INDEX_NAME, WEIGHTS_NAME, read_hf_weights, write_hf_weights
from train.hf.mapping import RADIO_VIDEO_EMBEDDER
from train.hf.untrained import CARRIED, DERIVED
from train.model.language_model import packing_metadata
from train.model.vlm import VisionLanguageModel

VOCAB = 97
TEXT = dict(vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern="M-M*-", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=4, conv_kernel=4, intermediate_size=48, layer_norm_epsilon=1e-5)


def saved_hf_lm(path, dtype=torch.float32):
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(NemotronHConfig(**TEXT))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.to(dtype).eval().save_pretrained(path)
    return path


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_round_trip_is_bit_exact_and_transformers_loads_it(tmp_path, dtype, capsys):
    src = saved_hf_lm(tmp_path / "hf", dtype)
    native, out = tmp_path / "native", tmp_path / "out"
    assert convert.main(["hf-to-native", "--src", str(src), "--dst", str(native)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(native / "checkpoints" / "step_0000000")
    assert convert.main(["native-to-hf", "--src", str(native), "--dst", str(out), "--max-shard-size", "8KB",
                         "--weights-only"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "lm"
    assert (out / INDEX_NAME).exists() and not (out / WEIGHTS_NAME).exists()  # forced into shards
    # Weight shards readable like every other file of the export (safetensors alone writes 0600).
    assert {f.stat().st_mode & 0o777 for f in out.glob("*.safetensors")} == {(out / "config.json").stat().st_mode & 0o777}
    assert_same_tensors(read_hf_weights(src), read_hf_weights(out))
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron_h"

    ours = load_language_model(native)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        got = ours(ids)
    assert float((expected - got).norm() / expected.norm()) < 1e-4
    # The HF directory itself is accepted by the API, giving the very same weights.
    with torch.no_grad():
        assert torch.equal(load_language_model(out)(ids), got)


def test_lm_only_native_checkpoint_layout(tmp_path):
    src = saved_hf_lm(tmp_path / "hf")
    summary = hf_to_native(src, tmp_path / "native")
    step = find_latest(tmp_path / "native" / "checkpoints")
    assert step is not None and str(step) == summary["checkpoint"] and step.name == "step_0000000"
    cfg, state, run_dir = read_native(step)
    assert run_dir == tmp_path / "native"
    assert cfg.model.language_model == hf_lm_config_to_ours(json.loads((src / "config.json").read_text()))
    assert state and all(k.startswith("language_model.") for k in state)
    assert (tmp_path / "native" / "hf_source" / "config.json").exists()
    with pytest.raises(ConversionError, match="only language model"):
        native_to_hf(tmp_path / "native", tmp_path / "vl", layout="vl", weights_only=True)


def test_lm_config_round_trip():
    cfg = LanguageModelConfig(pattern="M*-M-", hidden_size=48, vocab_size=300, num_attention_heads=6,
                              num_key_value_heads=3, head_dim=8, mamba_num_heads=6, mamba_head_dim=8, ssm_state_size=4,
                              n_groups=3, conv_kernel=3, chunk_size=8, mlp_hidden_size=40, norm_eps=1e-6,
                              time_step_min=0.002, time_step_max=0.2, time_step_floor=1e-3, initializer_range=0.01,
                              time_step_limit=[1e-4, 0.5])
    hf = NemotronHConfig.from_dict(ours_to_hf_lm_config(cfg))
    assert tuple(hf.time_step_limit) == (1e-4, 0.5)
    assert hf.layers_block_type == ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp"]
    assert hf_lm_config_to_ours(hf.to_dict()) == cfg


def test_time_step_limit_defaults_to_the_kernels_and_survives_config_json(tmp_path):
    # A config that never mentions it gets the kernels' (0, inf); an infinite bound goes through
    # config.json (transformers' {"__float__": "Infinity"} encoding) and back unchanged.
    assert hf_lm_config_to_ours(TEXT).time_step_limit == [0.0, math.inf]
    NemotronHConfig.from_dict(ours_to_hf_lm_config(hf_lm_config_to_ours(TEXT))).save_pretrained(tmp_path)
    assert hf_lm_config_to_ours(read_hf_config(tmp_path)).time_step_limit == [0.0, math.inf]


def test_unsupported_hf_settings_are_refused():
    with pytest.raises(ConversionError, match="MoE"):
        hf_lm_config_to_ours({**TEXT, "hybrid_override_pattern": "M-E*"})
    with pytest.raises(ConversionError, match="tie_word_embeddings"):
        hf_lm_config_to_ours({**TEXT, "tie_word_embeddings": True})


def test_sharded_write_read(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(64, 16, generator=gen) for i in range(5)}  # 4 KiB each
    state["ids"] = torch.arange(7)
    (tmp_path / "one").mkdir()
    assert write_hf_weights(state, tmp_path / "one") == [WEIGHTS_NAME]
    (tmp_path / "many").mkdir()
    names = write_hf_weights(state, tmp_path / "many", max_shard_bytes=9000)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "many" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 4096 + 7 * 8
    assert index["weight_map"]["w0"] == names[0] and index["weight_map"]["ids"] == names[2]
    assert_same_tensors(read_hf_weights(tmp_path / "one"), state)
    assert_same_tensors(read_hf_weights(tmp_path / "many"), state)


VISION = dict(model_type="radio", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
              image_size=64, max_img_size=128, num_cls_tokens=2, num_registers=3, video_temporal_patch_size=2)


def saved_hf_vl(path):
    cfg = NemotronH_Omni_Reasoning_V3_Config(text_config={"model_type": "nemotron_h", **TEXT}, vision_config=VISION,
                                             projector_hidden_size=48, vision_hidden_size=32, image_token_id=5)
    torch.manual_seed(0)
    NemotronH_Omni_Reasoning_V3(cfg).eval().save_pretrained(path)
    return path


def test_vl_round_trip_is_bit_exact_and_feeds_init_from_checkpoint(tmp_path):
    src = saved_hf_vl(tmp_path / "hf")
    summary = hf_to_native(src, tmp_path / "native")
    assert summary["layout"] == "vl"
    # RADIO pieces our model has no use for travel alongside, unchanged.
    assert any("video_embedder" in k for k in summary["carried"])
    assert "vision_model.radio_model.summary_idxs" in summary["carried"]
    summary = native_to_hf(tmp_path / "native", tmp_path / "out", layout="vl", weights_only=True)
    assert_same_tensors(read_hf_weights(src), read_hf_weights(tmp_path / "out"))
    assert summary["video_embedder"] == CARRIED  # the source's own, beside its own image patch embedding

    cfg, _, _ = read_native(tmp_path / "native")
    model = VisionLanguageModel(cfg.model, image_token_id=5)
    load_model_weights(find_latest(tmp_path / "native" / "checkpoints"), model)  # strict: every VLM key
    hf_state = read_hf_weights(src)
    assert torch.equal(model.vision_model.cls_token, hf_state["vision_model.radio_model.model.patch_generator.cls_token.token"])
    assert torch.equal(model.projector.mlp1[3].weight, hf_state["mlp1.3.weight"])

    # An LM-only export of the VL checkpoint is the NemotronHForCausalLM inside it.
    native_to_hf(tmp_path / "native", tmp_path / "lm", layout="lm", weights_only=True)
    lm_state = read_hf_weights(tmp_path / "lm")
    assert_same_tensors(lm_state, {k.removeprefix("language_model."): v for k, v in hf_state.items()
                                   if k.startswith("language_model.")})

    # Once the image patch embedding is trained, the source's video embedder no longer belongs to it:
    # the export derives the tubelet embedder from the trained one instead (train.hf.untrained).
    state = model.state_dict()
    state["vision_model.patch_embed.weight"] = state["vision_model.patch_embed.weight"] + 0.01
    write_model_checkpoint(tmp_path / "native", 1, state)
    summary = native_to_hf(tmp_path / "native", tmp_path / "trained", layout="vl", weights_only=True)
    assert summary["video_embedder"] == DERIVED
    video = read_hf_weights(tmp_path / "trained")[RADIO_VIDEO_EMBEDDER]
    assert torch.equal(video, torch.cat([state["vision_model.patch_embed.weight"]] * 2, dim=1) / 2)


def test_vl_export_of_our_model_loads_in_transformers(tmp_path, monkeypatch):
    """Every tensor of the omni class is in the export (nothing initialised at random on load), the
    logits are ours, and transformers' video path (tubelets of 2 frames) embeds a tubelet as its mean
    frame through the image path: a static tubelet is exactly the frame as training embedded it."""
    lm = LanguageModelConfig(pattern="M*-", hidden_size=32, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=4,
                             mlp_hidden_size=48)
    vision = VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, num_cls_tokens=2,
                          num_registers=2, max_image_size=96, final_norm=False)  # no layer scales: written as ones
    cfg = ModelConfig(language_model=lm, vision=vision, projector=ProjectorConfig(hidden_size=40))
    ours = VisionLanguageModel(cfg, image_token_id=5)
    ours.reset_parameters(seed=0)
    write_native(tmp_path / "native", cfg, ours.state_dict())
    summary = native_to_hf(tmp_path / "native", tmp_path / "hf", layout="vl", image_token_id=5, weights_only=True)
    assert summary["video_embedder"] == DERIVED
    # transformers' RADIO lets missing layer scales pass silently; switched off, every tensor counts.
    monkeypatch.setattr(RadioPreTrainedModel, "_keys_to_ignore_on_load_missing", None)
    hf, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf).__name__ == "NemotronH_Omni_Reasoning_V3"
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched key, no error
    hf.eval()

    tiles = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = (tiles.float() / 255.0 - ours.pixel_mean) / ours.pixel_std
    # A video of frames (0, 0, 1, 2): a static tubelet, then a moving one.
    video = torch.stack([pixels[0], pixels[0], pixels[1], pixels[2]]).reshape(1, 2, 6, 64, 64)
    mean_frame = (pixels[1:2] + pixels[2:3]) / 2
    frame_patches = torch.cat([pixels[:1], mean_frame]).reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5)
    grid = torch.tensor([[4, 4], [4, 4]])
    with torch.no_grad():
        tubelets = hf.get_video_features(pixel_values_videos=video).pooler_output[0].reshape(2, 4, 32)
        frames = torch.stack(hf.get_image_features(frame_patches.reshape(32, 768), grid).pooler_output)
        trained = ours.embed_media(tiles[:1])  # (4, 32): frame 0 as training embeds a video frame
    torch.testing.assert_close(tubelets, frames, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tubelets[0], trained, rtol=1e-4, atol=1e-5)

    tiles = tiles[:2]
    pixels = pixels[:2]
    patches = pixels.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).reshape(32, 768)
    ids = torch.randint(6, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 1:9] = 5
    seq_idx, cu = packing_metadata(ids.shape, None, ids.device)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=patches, image_grid_hw=torch.tensor([[4, 4], [4, 4]])).logits
        got = ours.language_model.lm_head(ours.eval().hidden_states(ids, tiles, seq_idx, cu))
    assert float((expected - got).norm() / expected.norm()) < 1e-4


def test_refusals(tmp_path, capsys):
    src = saved_hf_vl(tmp_path / "hf")
    state = read_hf_weights(src)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    state["vision_model.radio_model.model.norm.weight"] = torch.ones(32)
    write_hf_weights(state, bad)
    with pytest.raises(ConversionError, match="no native name"):
        hf_to_native(bad, tmp_path / "n2")
    assert convert.main(["hf-to-native", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "n3")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert convert.main(["hf-to-native", "--src", str(src), "--dst", str(bad)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    cfg = ModelConfig(vision=VisionConfig(final_norm=True))
    write_native(tmp_path / "n4", cfg, VisionLanguageModel(cfg, image_token_id=1).state_dict())
    with pytest.raises(ConversionError, match="final_norm=false"):
        native_to_hf(tmp_path / "n4", tmp_path / "out", layout="vl", weights_only=True)


def small_tokenizer(path, vocab_size: int):
    texts = ["def add(a, b):\n    return a + b", "The red circle is left of the blue square."] * 20
    return train_tokenizer(texts, path, vocab_size=vocab_size)


def test_hf_source_tokenizer_travels_with_the_export(tmp_path):
    """An HF model imported with its tokenizer exports with it, plus a generation config: the
    directory is what AutoTokenizer and AutoModelForCausalLM load, chat template included."""
    src = tmp_path / "hf"
    torch.manual_seed(0)
    NemotronHForCausalLM(NemotronHConfig(**{**TEXT, "vocab_size": 320})).eval().save_pretrained(src)
    small_tokenizer(src, 300)
    hf_to_native(src, tmp_path / "native")
    summary = native_to_hf(tmp_path / "native", tmp_path / "out")
    assert summary["tokenizer"] == str(tmp_path / "native" / "hf_source")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "add"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n<think></think>")
    # The source's own generation config (its sampling settings) is kept, not replaced by ours.
    assert (tmp_path / "out" / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == 320


def test_export_refuses_a_tokenizer_it_cannot_ship(tmp_path, capsys):
    """No tokenizer, or one that is not the model's: a clear error and nothing written."""
    hf_to_native(saved_hf_lm(tmp_path / "hf"), tmp_path / "native")  # a source without a tokenizer
    assert convert.main(["native-to-hf", "--src", str(tmp_path / "native"), "--dst", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer found" in err and "--tokenizer DIR" in err and "--weights-only" in err
    big = small_tokenizer(tmp_path / "big_tok", 300)  # 300 tokens for a 97-token embedding
    with pytest.raises(ConversionError, match="300 tokens, more than the model's vocab_size 97"):
        native_to_hf(tmp_path / "native", tmp_path / "b", tokenizer=big)
    with pytest.raises(ConversionError, match="not a tokenizer directory"):
        native_to_hf(tmp_path / "native", tmp_path / "c", tokenizer=tmp_path)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("2GiB") == 2 * 2**30
    assert convert.parse_size("1234") == 1234
