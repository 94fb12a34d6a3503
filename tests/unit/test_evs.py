"""Efficient video sampling: planned counts, the keep mask, the span relayout, and the whole path
from a real video shard through the data side, the packer and the model."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import (
    IGNORE_INDEX,
    MediaSlot,
    Message,
    frame_label,
    tokenize_with_media_spans,
)
from data_pipelines.training.evs import EvsConfig, kept_token_count, provisional_frame_counts, sample_q
from data_pipelines.training.packing import collate_rows
from data_pipelines.training.samples import SampleSpec, build_sample
from data_pipelines.training.shards import expand_shard_paths, iter_shard
from data_pipelines.training.tiling import TilingConfig
from train.config.schema import LanguageModelConfig, ModelConfig, VisionConfig
from train.model.evs import apply_evs, evs_dissimilarity, evs_keep_mask, prune_videos, relayout_video_span
from train.model.vlm import VisionLanguageModel

LM = LanguageModelConfig(pattern="M*-", hidden_size=32, vocab_size=1024, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8, n_groups=1,
                         chunk_size=16, mlp_hidden_size=32)
TPT = 4  # tokens per 64 px tile of the tiny ViT (4x4 patches, pixel shuffle 0.5)


# ---- planned counts and rates (data side) -----------------------------------------------

@pytest.mark.parametrize("frames, per_frame, q, expected", [
    (128, 256, 0.0, 32768), (128, 256, 0.5, 16384), (128, 256, 0.75, 8192),
    (3, 5, 0.5, 7),  # int(7.5): rounds down
    (1, 256, 0.9, 256), (4, 4, 0.99, 4),  # never below one frame's worth: frame 0 stays whole
])
def test_kept_token_count(frames, per_frame, q, expected):
    assert kept_token_count(frames, per_frame, q) == expected


@pytest.mark.parametrize("bad", [dict(q=1.0), dict(q=-0.1)])
def test_kept_token_count_rejects_bad_rates(bad):
    with pytest.raises(ValueError, match="q="):
        kept_token_count(8, 4, **bad)


@pytest.mark.parametrize("cfg, field", [
    (EvsConfig(mode="sometimes"), "data.evs.mode"),
    (EvsConfig(mode="fixed", q=1.0), "data.evs.q="),
    (EvsConfig(mode="range", q_min=0.6, q_max=0.2), "data.evs.q_min"),
    (EvsConfig(mode="range", q_max=-0.5), "data.evs.q_max"),
])
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg.validate("data.evs")


def test_recipes_carry_evs_and_bad_overrides_fail_by_name():
    from train.config.compose import load_config
    from train.config.schema import ConfigError

    assert load_config("stage2_video_sft", ["smoke=cpu"]).data.evs == EvsConfig("range", 0.0, 0.0, 0.75)
    assert load_config("stage4_long_context", ["smoke=cpu"]).data.evs.mode == "range"
    assert load_config("stage1_image_sft", ["smoke=cpu"]).data.evs.mode == "off"
    with pytest.raises(ConfigError, match=r"data\.evs\.q_max=1\.5"):
        load_config("stage2_video_sft", ["smoke=cpu", "data.evs.q_max=1.5"])


def test_sample_q_modes_and_determinism():
    rng = random.Random(3)
    before = rng.getstate()
    assert sample_q(EvsConfig(), rng) == 0.0
    assert sample_q(EvsConfig(mode="fixed", q=0.3), rng) == 0.3
    assert rng.getstate() == before  # only `range` draws
    cfg = EvsConfig(mode="range", q_min=0.2, q_max=0.6)
    draws = [sample_q(cfg, random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    spread = [sample_q(cfg, rng) for _ in range(200)]
    assert all(0.2 <= q <= 0.6 for q in spread) and max(spread) - min(spread) > 0.3


@pytest.mark.parametrize("frames, kept", [(1, 4), (5, 4), (5, 20), (5, 11), (8, 13), (3, 9)])
def test_provisional_counts_keep_frame_zero_and_the_total(frames, kept):
    counts = provisional_frame_counts(frames, 4, kept)
    assert len(counts) == frames and sum(counts) == kept and counts[0] == 4
    assert all(0 <= c <= 4 for c in counts) and max(counts[1:] or [0]) - min(counts[1:] or [0]) <= 1


# ---- the keep mask (model side) ---------------------------------------------------------

def reference_keep(tokens: np.ndarray, kept: int) -> list[int]:
    """Flat indices EVS keeps, computed without torch: explicit cosines, rank by (-score, index)."""
    frames, per_frame, _ = tokens.shape
    scores = []
    for t in range(frames):
        for p in range(per_frame):
            if t == 0:
                scores.append(float("inf"))
                continue
            a, b = tokens[t, p], tokens[t - 1, p]
            scores.append(1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    ranked = sorted(range(frames * per_frame), key=lambda i: (-scores[i], i))
    return sorted(ranked[:kept])


def test_q0_keeps_everything_unchanged():
    tokens = torch.randn(6, 5, 8)
    kept, counts = apply_evs(tokens, 6 * 5)
    assert torch.equal(kept, tokens.flatten(0, 1)) and counts.tolist() == [5] * 6


@pytest.mark.parametrize("q", [0.1, 0.5, 0.75, 0.9])
def test_counts_are_exact_frame_zero_whole_and_order_kept(q):
    gen = torch.Generator().manual_seed(int(q * 100))
    tokens = torch.randn(7, 6, 5, generator=gen, dtype=torch.float64)
    kept = kept_token_count(7, 6, q)
    out, counts = apply_evs(tokens, kept)
    mask = evs_keep_mask(tokens, kept)
    assert out.shape == (kept, 5) and int(mask.sum()) == kept and int(counts.sum()) == kept
    assert mask[0].all() and counts.tolist() == mask.sum(1).tolist()
    expected = reference_keep(tokens.numpy(), kept)
    assert torch.nonzero(mask.flatten()).squeeze(1).tolist() == expected
    # original frame-major order: the kept rows are the tokens at increasing flat indices
    assert torch.equal(out, tokens.flatten(0, 1)[expected])


def test_ties_break_towards_earlier_positions():
    frame = 2.0 * torch.eye(4)[None]  # axis-aligned tokens: cos with themselves is exactly 1
    static = frame.expand(5, 4, 4).clone()  # nothing moves: every later token scores exactly 0
    assert evs_keep_mask(static, 10).flatten().tolist() == [True] * 10 + [False] * 10
    assert torch.isinf(evs_dissimilarity(static)[0]).all()


def test_gradients_reach_kept_tokens_only():
    tokens = torch.randn(4, 3, 6, requires_grad=True)
    out, _ = apply_evs(tokens, 7)
    out.sum().backward()
    mask = evs_keep_mask(tokens, 7)
    assert torch.equal(tokens.grad[mask], torch.ones(7, 6)) and not tokens.grad[~mask].any()


def moving_square(textured: bool) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """8 frames of 128x128 px: a static background (plain or fixed noise) and a 16 px square that
    moves one 32 px token cell per frame along a U-shaped path through the 4x4 token grid."""
    path = [(1, 0), (1, 1), (1, 2), (1, 3), (2, 3), (2, 2), (2, 1), (2, 0)]
    background = (np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8) if textured
                  else np.full((128, 128, 3), (90, 120, 160), dtype=np.uint8))
    frames = []
    for row, col in path:
        frame = background.copy()
        frame[row * 32 + 8:row * 32 + 24, col * 32 + 8:col * 32 + 24] = (230, 30, 30)
        frames.append(frame)
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous(), path


@pytest.mark.parametrize("textured", [False, True])
def test_moving_square_keeps_its_path(textured):
    """Through our real ViT + projector (random init): the kept tokens are frame 0 and, in every
    later frame, the two cells the square left and entered. Random features suffice because an
    unchanged cell's features move only through attention mixing, a small relative change, and
    1 - cos is quadratic in it (~1e-6 here against >= 0.1 for the square's cells)."""
    cfg = ModelConfig(language_model=LM, vision=VisionConfig(image_size=128, patch_size=16, hidden_size=32,
                                                             num_layers=2, num_heads=2))
    model = VisionLanguageModel(cfg, image_token_id=10, image_end_id=9)
    model.reset_parameters(0)
    tiles, path = moving_square(textured)
    with torch.no_grad():
        tokens = model.embed_media(tiles).view(8, cfg.tokens_per_tile, -1)  # (T, 16, D)
    expected = torch.zeros(8, 4, 4, dtype=torch.bool)
    expected[0] = True
    for t in range(1, 8):
        expected[t][path[t - 1]] = expected[t][path[t]] = True
    kept = kept_token_count(8, 16, q=0.765625)  # = 16 + 7 frames x 2 cells
    assert kept == 30
    assert torch.equal(evs_keep_mask(tokens, kept), expected.view(8, 16))


# ---- the span relayout ------------------------------------------------------------------

def video_ids(tokenizer, labels: tuple[str, ...], counts: list[int]) -> list[int]:
    """A video's tokens written directly with the given per-frame counts (the served layout)."""
    ids = tokenizer.special_ids
    out: list[int] = []
    for label, count in zip(labels, counts):
        out += tokenizer.encode(label) + [ids[st.IMG_START]] + [ids[st.IMG_CONTEXT]] * count + [ids[st.IMG_END]]
    return out


@pytest.mark.parametrize("counts", [[4, 0, 0, 0, 0], [4, 4, 4, 4, 4], [4, 0, 3, 4, 1], [4, 1, 1, 1, 1]])
def test_relayout_writes_the_real_per_frame_counts(tokenizer, counts):
    labels = tuple(frame_label(i, 0.5 * i) for i in range(5))
    slot = MediaSlot("video", 5, 4, labels, kept_tokens=sum(counts))
    messages = [Message("user", "<video> What moves?"), Message("assistant", "A square.")]
    ids, labels_out, spans = tokenize_with_media_spans(messages, [slot], tokenizer.encode, tokenizer.special_ids)
    (start, length), = spans
    provisional = ids[start:start + length]
    assert provisional == video_ids(tokenizer, labels, provisional_frame_counts(5, 4, sum(counts)))
    assert all(label == IGNORE_INDEX for label in labels_out[start:start + length])
    out = relayout_video_span(torch.tensor(provisional), torch.tensor(counts), tokenizer.special_ids[st.IMG_CONTEXT],
                              tokenizer.special_ids[st.IMG_END])
    assert out.tolist() == video_ids(tokenizer, labels, counts)


def test_relayout_rejects_a_span_that_does_not_match(tokenizer):
    span = torch.tensor(video_ids(tokenizer, ("a", "b"), [4, 2]))
    ctx, end = tokenizer.special_ids[st.IMG_CONTEXT], tokenizer.special_ids[st.IMG_END]
    with pytest.raises(ValueError, match="context tokens"):
        relayout_video_span(span, torch.tensor([4, 3]), ctx, end)
    with pytest.raises(ValueError, match="markers"):
        relayout_video_span(span[:-1], torch.tensor([4, 2]), ctx, end)


# ---- the whole path: real video shard -> sample -> packed batch -> model ----------------

def video_spec(evs: EvsConfig, seq_length: int = 2048) -> SampleSpec:
    return SampleSpec(seq_length=seq_length, tokens_per_tile=TPT, tiling=TilingConfig(tile_size=64, max_tiles=4),
                      video_fps=2.0, max_frames=8, evs=evs)


def video_raws(synth_data, count: int):
    shard = expand_shard_paths(str(synth_data.shard_dirs["video"]))[0]
    return [raw for raw, _ in zip(iter_shard(shard), range(count))]


def tiny_vlm(tokenizer) -> VisionLanguageModel:
    model = VisionLanguageModel(ModelConfig(language_model=LM), image_token_id=tokenizer.special_ids[st.IMG_CONTEXT],
                                image_end_id=tokenizer.special_ids[st.IMG_END])
    model.reset_parameters(0)
    return model.double()


def row_length(rows) -> int:
    """Shortest padded row that holds the longest row (short rows keep the float64 forwards fast)."""
    return -(-max(sum(s.length for s in row) for row in rows) // 64) * 64


def test_sample_length_is_planned_exactly(synth_data, tokenizer):
    raw = video_raws(synth_data, 1)[0]
    full = build_sample(raw, "v", video_spec(EvsConfig()), tokenizer)
    pruned = build_sample(raw, "v", video_spec(EvsConfig(mode="fixed", q=0.5)), tokenizer)
    frames = full.tiles.shape[0]
    kept = kept_token_count(frames, TPT, 0.5)
    assert torch.equal(pruned.tiles, full.tiles)  # the ViT still sees every frame
    assert pruned.length == full.length - (frames * TPT - kept)
    (first, t, k, start, length), = pruned.video_evs.tolist()
    assert (first, t, k) == (0, frames, kept)
    span = pruned.input_ids[start:start + length]
    assert int((span == tokenizer.special_ids[st.IMG_CONTEXT]).sum()) == kept
    end = tokenizer.special_ids[st.IMG_END]
    assert int((span == end).sum()) == frames and span[-1] == end
    assert (pruned.labels[start:start + length] == IGNORE_INDEX).all()
    assert len(full.video_evs) == 0


def test_q_is_drawn_per_video_and_reproducible(synth_data, tokenizer):
    spec = video_spec(EvsConfig(mode="range", q_min=0.0, q_max=0.9))
    raws = video_raws(synth_data, 8)
    first = [build_sample(r, "v", spec, tokenizer) for r in raws]
    again = [build_sample(r, "v", spec, tokenizer) for r in raws]
    assert all(np.array_equal(a.video_evs, b.video_evs) and np.array_equal(a.input_ids, b.input_ids)
               for a, b in zip(first, again))
    kept_share = {round(s.video_evs[0, 2] / (s.video_evs[0, 1] * TPT), 3) for s in first}
    assert len(kept_share) > 2
    # EVS draws from its own per-sample stream: the reasoning-mode text before the video is unchanged.
    off = [build_sample(r, "v", dataclasses.replace(spec, evs=EvsConfig(), reasoning_on_ratio=0.5), tokenizer)
           for r in raws]
    on = [build_sample(r, "v", dataclasses.replace(spec, reasoning_on_ratio=0.5), tokenizer) for r in raws]
    for a, b in zip(off, on):
        start = int(b.video_evs[0, 3])
        assert np.array_equal(a.input_ids[:start], b.input_ids[:start])


def test_budget_counts_kept_tokens_so_more_frames_fit(synth_data, tokenizer):
    raws = video_raws(synth_data, 8)
    raw = max(raws, key=lambda r: build_sample(r, "v", video_spec(EvsConfig()), tokenizer).tiles.shape[0])
    full = build_sample(raw, "v", video_spec(EvsConfig()), tokenizer)
    frames = full.tiles.shape[0]
    tight = full.length - 2 * TPT  # two frames too short without EVS
    thinned = build_sample(raw, "v", video_spec(EvsConfig(), seq_length=tight), tokenizer)
    pruned = build_sample(raw, "v", video_spec(EvsConfig(mode="fixed", q=0.75), seq_length=tight), tokenizer)
    assert thinned.tiles.shape[0] < frames == pruned.tiles.shape[0]
    assert pruned.length <= tight


def test_fixed_q0_is_the_identity_end_to_end(synth_data, tokenizer):
    raws = video_raws(synth_data, 2)
    off = [build_sample(r, "v", video_spec(EvsConfig()), tokenizer) for r in raws]
    q0 = [build_sample(r, "v", video_spec(EvsConfig(mode="fixed", q=0.0)), tokenizer) for r in raws]
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(off, q0))
    model = tiny_vlm(tokenizer)
    batch_off, batch_q0 = collate_rows([off], row_length([off]), 3), collate_rows([q0], row_length([q0]), 3)
    assert batch_q0.video_evs.shape == (2, 5) and batch_off.video_evs.shape == (0, 5)
    with torch.no_grad():
        loss_off, n_off = model(batch_off)
        loss_q0, n_q0 = model(batch_q0)
    assert n_off == n_q0 and torch.equal(loss_off, loss_q0)


def test_packed_evs_forward_equals_per_sample_forwards(synth_data, tokenizer):
    """Batch coordinates are right: pruning two videos packed in one row (plus an image sample
    before them, shifting tiles and positions) gives the per-sample losses."""
    spec = video_spec(EvsConfig(mode="range", q_min=0.3, q_max=0.8))
    videos = [build_sample(r, "v", spec, tokenizer) for r in video_raws(synth_data, 2)]
    image_shard = expand_shard_paths(str(synth_data.shard_dirs["image"]))[0]
    image = build_sample(next(iter_shard(image_shard)), "i", spec, tokenizer)
    samples = [image] + videos
    model = tiny_vlm(tokenizer)

    def loss(rows):
        b = collate_rows(rows, row_length(rows), 3)
        return model(b)

    with torch.no_grad():
        packed, n_packed = loss([samples])
        split, n_split = loss([[s] for s in samples])
        video_first, _ = loss([[videos[1]], videos[:1] + [image]])  # second row: span starts offset by a row
    assert n_packed == n_split
    assert torch.allclose(packed, split, rtol=1e-10) and torch.allclose(video_first, split, rtol=1e-10)


def test_prune_videos_shrinks_media_to_the_kept_tokens(synth_data, tokenizer):
    spec = video_spec(EvsConfig(mode="fixed", q=0.6))
    samples = [build_sample(r, "v", spec, tokenizer) for r in video_raws(synth_data, 2)]
    batch = collate_rows([samples], row_length([samples]), 3)
    model = tiny_vlm(tokenizer)
    with torch.no_grad():
        media = model.embed_media(batch.tiles)
        pruned, ids = prune_videos(media, batch.input_ids, batch.video_evs, TPT,
                                   tokenizer.special_ids[st.IMG_CONTEXT], tokenizer.special_ids[st.IMG_END])
    context_slots = int((ids == tokenizer.special_ids[st.IMG_CONTEXT]).sum())
    assert pruned.shape[0] == int(batch.video_evs[:, 2].sum()) == context_slots
    first, frames, kept, start, length = batch.video_evs[1].tolist()
    video = media[first * TPT:(first + frames) * TPT].view(frames, TPT, -1)
    kept_tokens, counts = apply_evs(video, kept)
    assert torch.equal(pruned[-kept:], kept_tokens)
    # each frame's block of the rewritten span holds that frame's kept tokens
    span = ids.flatten()[start:start + length]
    ends = torch.nonzero(span == tokenizer.special_ids[st.IMG_END]).squeeze(1)
    starts = torch.nonzero(span == tokenizer.special_ids[st.IMG_START]).squeeze(1)
    assert (ends - starts - 1).tolist() == counts.tolist()
    outside = torch.ones_like(ids.flatten(), dtype=torch.bool)
    for _, _, _, start, length in batch.video_evs.tolist():
        outside[start:start + length] = False
    assert torch.equal(ids.flatten()[outside], batch.input_ids.flatten()[outside])
