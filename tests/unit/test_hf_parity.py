"""Our model computes what transformers computes, on weights moved by our converter.

The HF side is transformers' own `NemotronHForCausalLM` / `NemotronH_Omni_Reasoning_V3` built
from tiny random configs, saved with `save_pretrained` (so the on-disk names are the real ones) and
run on CPU, where transformers uses its pure-torch Mamba path (mamba_ssm / causal_conv1d are not
in the CPU install). Every parameter is perturbed away from its init so norms, D, A and dt_bias all
matter, and one head per Mamba layer gets a very negative dt_bias so the dt floor is exercised.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.models.nemotron_h_omni import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

from data_pipelines.training.tiling import IMAGE_NORMALIZATION
from train.hf.config import hf_config_to_model_config, hf_lm_config_to_ours
from train.hf.files import read_hf_weights
from train.hf.mapping import hf_to_native_state, split_carried
from train.model.language_model import HybridLanguageModel, packing_metadata
from train.model.vlm import VisionLanguageModel

VOCAB = 97
IMAGE_TOKEN = 5


def text_config(pattern: str, n_groups: int, chunk_size: int) -> dict:
    return dict(model_type="nemotron_h", vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern=pattern,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                ssm_state_size=8, n_groups=n_groups, chunk_size=chunk_size, conv_kernel=4, intermediate_size=48,
                layer_norm_epsilon=1e-5)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, floored_heads: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
        if name.endswith("dt_bias"):
            p[:floored_heads] = -12.0  # softplus(-12 + dt) < time_step_min: only the floor keeps these heads alive


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def saved_hf_lm(tmp_path, pattern: str, n_groups: int, chunk_size: int, seed: int = 0, floored_heads: int = 1):
    torch.manual_seed(seed)
    hf = NemotronHForCausalLM(NemotronHConfig(**text_config(pattern, n_groups, chunk_size)))
    perturb(hf, seed, floored_heads)
    hf.eval().save_pretrained(tmp_path)
    return hf


def ours_from_hf_dir(path) -> HybridLanguageModel:
    cfg = hf_lm_config_to_ours(NemotronHConfig.from_pretrained(path).to_dict())
    used, carried = split_carried(read_hf_weights(path))
    assert not carried
    model = HybridLanguageModel(cfg)
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in hf_to_native_state(used).items()})
    return model.eval()


# Every pattern with both group counts, and each pattern with both chunk sizes.
@pytest.mark.parametrize("pattern,n_groups,chunk_size", [
    ("M-M*-", 1, 4), ("M-M*-", 2, 16), ("M*M-M-", 1, 16), ("M*M-M-", 2, 4), ("*-M", 1, 4), ("*-M", 2, 16),
])
def test_lm_logits_equal_transformers(tmp_path, pattern, n_groups, chunk_size):
    hf = saved_hf_lm(tmp_path, pattern, n_groups, chunk_size)
    ours = ours_from_hf_dir(tmp_path)
    for length in (7, 21):  # never a chunk multiple; 21 spans several chunks of either size
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = hf(ids, use_cache=False).logits
            got = ours(ids)
        assert got.shape == expected.shape == (2, length, VOCAB)
        assert rel_err(expected, got) < 1e-4, (pattern, n_groups, chunk_size, length)


@pytest.mark.parametrize("hf_limit", [None, (1e-2, 0.5)])
def test_mamba_time_step_limit_matches_transformers(tmp_path, hf_limit):
    """transformers clamps the discretised dt to config.time_step_limit, (0, inf) by default, as
    megatron-core's MambaMixer (which trained the released models) does; time_step_min only
    initialises. With every head's dt_bias at -12 (softplus far below time_step_min) and D = 0, a
    mixer's output is the clamped scan alone, so any other clamp shows at once."""
    config = text_config("M-", 2, 4) | ({"time_step_limit": hf_limit} if hf_limit else {})
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(NemotronHConfig(**config))
    perturb(hf, 0, floored_heads=4)
    hf.eval().save_pretrained(tmp_path)
    ours = ours_from_hf_dir(tmp_path)
    assert ours.cfg.time_step_limit == list(hf_limit or (0.0, math.inf))
    hf_mixer, our_mixer = hf.model.layers[0].mixer, ours.backbone.layers[0].mixer
    hidden = torch.randn(1, 13, 32, generator=torch.Generator().manual_seed(3))
    seq_idx, cu = packing_metadata((1, 13), None, hidden.device)
    with torch.no_grad():
        hf_mixer.D.zero_()
        our_mixer.D.zero_()
        expected = hf_mixer(hidden)
        assert rel_err(expected, our_mixer(hidden, seq_idx, cu)) < 1e-4
        # Any other clamp is far off: the floor at time_step_min an earlier version applied, or
        # ignoring the config's limit.
        for wrong in {(ours.cfg.time_step_min, math.inf), (0.0, math.inf)} - {tuple(ours.cfg.time_step_limit)}:
            our_mixer.dt_limit = wrong
            assert rel_err(expected, our_mixer(hidden, seq_idx, cu)) > 0.5, wrong


def test_packed_rows_equal_transformers_per_sample(tmp_path):
    hf = saved_hf_lm(tmp_path, "M*M-", 2, 4)
    ours = ours_from_hf_dir(tmp_path)
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 11, 3)]
    cu = torch.tensor([0, 6, 17, 20], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(torch.cat(samples)[None], cu_seqlens=cu)
        expected = torch.cat([hf(s[None], use_cache=False).logits for s in samples], dim=1)
    assert rel_err(expected, packed) < 1e-4


def saved_hf_vl(tmp_path, seed: int = 0) -> NemotronH_Omni_Reasoning_V3:
    # RADIO with class + register tokens and an 8x8 position table resized to the 4x4 tile grid.
    vision = dict(model_type="radio", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                  image_size=64, max_img_size=128, num_cls_tokens=2, num_registers=3, video_temporal_patch_size=2)
    cfg = NemotronH_Omni_Reasoning_V3_Config(text_config=text_config("M-M*-", 2, 4), vision_config=vision,
                                             projector_hidden_size=48, vision_hidden_size=32, image_token_id=IMAGE_TOKEN)
    torch.manual_seed(seed)
    hf = NemotronH_Omni_Reasoning_V3(cfg)
    with torch.no_grad():  # perturb everything, layer scales included, so parity means something
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path)
    return hf


def ours_vl_from_hf_dir(path) -> VisionLanguageModel:
    from train.hf.config import read_hf_config

    model_cfg = hf_config_to_model_config(read_hf_config(path))
    used, carried = split_carried(read_hf_weights(path))
    assert any("video_embedder" in k for k in carried) and not any("layer_scale" in k for k in carried)
    model = VisionLanguageModel(model_cfg, image_token_id=IMAGE_TOKEN)
    model.load_state_dict(hf_to_native_state(used))
    return model.eval()


def hf_patches(tiles: torch.Tensor, normalization: str) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) -> HF's packed input: normalised patches (N * 16, 3 * 16 * 16), channel-major."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGE_NORMALIZATION[normalization])
    pixels = (tiles.float() / 255.0 - mean) / std
    n = tiles.shape[0]
    return pixels.reshape(n, 3, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).reshape(n * 16, 3 * 16 * 16)


def test_vl_image_features_and_logits_equal_transformers(tmp_path):
    hf = saved_hf_vl(tmp_path)
    ours = ours_vl_from_hf_dir(tmp_path)
    assert ours.cfg.vision.num_prefix_tokens == 5 and ours.cfg.vision.pos_embed_side == 8
    tiles = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    patches, grid = hf_patches(tiles, ours.cfg.vision.normalization), torch.tensor([[4, 4]] * 3)
    ids = torch.randint(IMAGE_TOKEN + 1, VOCAB, (1, 19), generator=torch.Generator().manual_seed(1))
    ids[0, 2:14] = IMAGE_TOKEN  # 3 tiles x 4 tokens
    with torch.no_grad():
        expected_media = torch.cat(hf.get_image_features(patches, grid).pooler_output)
        expected_logits = hf(input_ids=ids, pixel_values=patches, image_grid_hw=grid).logits
        media = ours.embed_media(tiles)
        seq_idx, cu = packing_metadata(ids.shape, None, ids.device)
        logits = ours.language_model.lm_head(ours.hidden_states(ids, tiles, seq_idx, cu))
    assert media.shape == expected_media.shape == (12, 32)
    assert rel_err(expected_media, media) < 1e-5
    assert rel_err(expected_logits, logits) < 1e-4
