"""Cached generation (conv + SSM states, KV cache) equals re-running the full forward every step."""

from __future__ import annotations

import pytest
import torch

from train.config.schema import LanguageModelConfig, ModelConfig
from train.chat.generate import greedy_tokens
from train.model.language_model import HybridLanguageModel, packing_metadata
from train.model.vlm import VisionLanguageModel

NEW_TOKENS = 20
VOCAB = 256
IMAGE_TOKEN = 7


def lm_config(pattern: str, n_groups: int, **overrides) -> LanguageModelConfig:
    # chunk_size 8 < prompt length, so prefill's final SSM state crosses chunk boundaries.
    return LanguageModelConfig(pattern=pattern, hidden_size=32, vocab_size=VOCAB, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                               ssm_state_size=8, n_groups=n_groups, conv_kernel=4, chunk_size=8, mlp_hidden_size=64,
                               **overrides)


def build_lm(pattern: str, n_groups: int, seed: int = 0) -> HybridLanguageModel:
    model = HybridLanguageModel(lm_config(pattern, n_groups))
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def cached_greedy(lm: HybridLanguageModel, embeds: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits each was chosen from (steps, V), through lm.prefill + lm.decode_step."""
    logits, cache = lm.prefill(embeds, embeds.shape[1] + steps)
    tokens, chosen_from = [], []
    for _ in range(steps):
        chosen_from.append(logits[0])
        token = logits.argmax(dim=-1)
        tokens.append(int(token))
        logits = lm.decode_step(token, cache)
    return tokens, torch.stack(chosen_from)


@torch.no_grad()
def uncached_greedy(next_logits, input_ids: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding that re-runs the full forward over the growing sequence at every step."""
    ids, tokens, chosen_from = input_ids, [], []
    for _ in range(steps):
        logits = next_logits(ids)  # (V,) at the last position
        chosen_from.append(logits)
        token = int(logits.argmax())
        tokens.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, torch.stack(chosen_from)


@pytest.mark.parametrize("pattern,n_groups", [("M", 2), ("*", 1), ("-", 1), ("M-M*", 2), ("*M-M", 1),
                                              ("M-M*M-M-", 2)])
@pytest.mark.parametrize("prompt_length", [2, 19])  # shorter than the conv window; several scan chunks
def test_cached_generation_equals_uncached(pattern, n_groups, prompt_length):
    lm = build_lm(pattern, n_groups)
    prompt = torch.randint(IMAGE_TOKEN + 1, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(1))
    expected, expected_logits = uncached_greedy(lambda ids: lm(ids)[0, -1], prompt, NEW_TOKENS)
    tokens, logits = cached_greedy(lm, lm.backbone.embeddings(prompt), NEW_TOKENS)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    assert list(greedy_tokens(lm, lm.backbone.embeddings(prompt), NEW_TOKENS)) == expected


def test_cached_step_logits_match_the_forward_in_float64():
    # In float64 the recurrent step and the chunked scan agree to rounding of the last digits.
    lm = build_lm("M-M*M-M-", 2).double()
    prompt = torch.randint(IMAGE_TOKEN + 1, VOCAB, (1, 13), generator=torch.Generator().manual_seed(2))
    expected, expected_logits = uncached_greedy(lambda ids: lm(ids)[0, -1], prompt, NEW_TOKENS)
    tokens, logits = cached_greedy(lm, lm.backbone.embeddings(prompt), NEW_TOKENS)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_decode_step_clamps_dt_as_the_prefill_scan_does():
    # A time_step_limit that binds at both ends (dt_bias spread so softplus falls below, inside and
    # above it): the recurrent step and the chunked scan must clamp alike, or the logits part.
    model = HybridLanguageModel(lm_config("M-M*", 2, time_step_limit=[0.02, 0.05]))
    model.reset_parameters(torch.Generator().manual_seed(3))
    lm = model.double().eval()
    for mixer in (lm.backbone.layers[0].mixer, lm.backbone.layers[2].mixer):
        mixer.dt_bias.copy_(torch.tensor([-12.0, -3.5, -3.0, 2.0]))
        assert mixer.dt_limit == (0.02, 0.05)
    prompt = torch.randint(IMAGE_TOKEN + 1, VOCAB, (1, 13), generator=torch.Generator().manual_seed(2))
    expected, expected_logits = uncached_greedy(lambda ids: lm(ids)[0, -1], prompt, NEW_TOKENS)
    tokens, logits = cached_greedy(lm, lm.backbone.embeddings(prompt), NEW_TOKENS)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-10)


def test_greedy_tokens_stops_at_a_stop_token_and_at_the_limit():
    lm = build_lm("M-M*", 2)
    embeds = lm.backbone.embeddings(torch.tensor([[20, 30, 40, 50]]))
    full = list(greedy_tokens(lm, embeds, 6))
    assert len(full) == 6
    stop = full[2]
    assert list(greedy_tokens(lm, embeds, 6, stop_ids=[stop])) == full[:full.index(stop)]
    assert list(greedy_tokens(lm, embeds, 0)) == []


def test_decode_step_refuses_to_overrun_the_cache():
    lm = build_lm("*", 1)
    logits, cache = lm.prefill(lm.backbone.embeddings(torch.tensor([[9, 10, 11]])), capacity=4)
    logits = lm.decode_step(logits.argmax(-1), cache)
    with pytest.raises(ValueError, match="cache is full"):
        lm.decode_step(logits.argmax(-1), cache)


def test_cached_generation_with_image_tiles_equals_the_training_forward():
    cfg = ModelConfig(language_model=lm_config("M-M*M-", 2))
    model = VisionLanguageModel(cfg, image_token_id=IMAGE_TOKEN)
    model.reset_parameters(seed=3)
    model.eval()
    tiles = torch.randint(0, 256, (3, 3, cfg.vision.image_size, cfg.vision.image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(4))
    media = [IMAGE_TOKEN] * (3 * cfg.tokens_per_tile)
    prompt = torch.tensor([[40, 41, 42, 8] + media + [9, 50, 51, 52, 53]])

    def training_forward(ids: torch.Tensor) -> torch.Tensor:
        # The path training takes: media spliced inside `hidden_states`, then the output head.
        seq_idx, cu_seqlens = packing_metadata(ids.shape, None, ids.device)
        return model.language_model.lm_head(model.hidden_states(ids, tiles, seq_idx, cu_seqlens))[0, -1]

    expected, expected_logits = uncached_greedy(training_forward, prompt, NEW_TOKENS)
    assert IMAGE_TOKEN not in expected  # a generated media token would make the reference splice fail
    embeds = model.embed_inputs(prompt, tiles)
    tokens, logits = cached_greedy(model.language_model, embeds, NEW_TOKENS)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    # The media really reach the answer: other pixels give other logits.
    other = model.embed_inputs(prompt, 255 - tiles)
    assert not torch.allclose(model.language_model.prefill(other, prompt.shape[1])[0], logits[:1])


def test_embed_inputs_checks_the_media_token_count():
    model = VisionLanguageModel(ModelConfig(language_model=lm_config("M", 2)), image_token_id=IMAGE_TOKEN).eval()
    tiles = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="media tokens"):
        model.embed_inputs(torch.tensor([[IMAGE_TOKEN, 20]]), tiles)
