"""Raw shard sample -> training sample: parse, decode media, fit the token budget, tokenize.

The exact token count is known before any tile is cut: when a sample would overflow the
sequence length, images degrade along the tile ladder 12->8->6->4->2->1 and videos drop frames
uniformly; only then is the sample skipped (reason `too_long`). Under EVS a video counts the
tokens it will keep after pruning (`data_pipelines.evs`), at a rate drawn per video.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from data_pipelines import special_tokens as st
from data_pipelines.conversation import (
    MediaSlot, SampleError, apply_reasoning_mode, frame_label, media_token_count,
    parse_messages, placeholder_order, tokenize_conversation, tokenize_with_media_spans,
)
from data_pipelines.decode import VideoFrames, decode_image, decode_video, frames_to_tiles
from data_pipelines.evs import EvsConfig, kept_token_count, sample_q
from data_pipelines.shards import RawSample, parse_json_member
from data_pipelines.tiling import TilingConfig, choose_tile_grid, tile_image

TILE_LADDER = (12, 8, 6, 4, 2, 1)
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class SampleSpec:
    """Plain values the data side needs from the recipe (it never imports `train`)."""

    seq_length: int
    tokens_per_tile: int
    tiling: TilingConfig
    video_fps: float = 2.0
    max_frames: int = 128
    reasoning_on_ratio: float = 0.0
    # "auto": the tokenizer's own chat template when it has one; "builtin": our ChatML rendering.
    chat_template: str = "auto"
    loss_on_think: bool = True
    seed: int = 0
    evs: EvsConfig = EvsConfig()


@dataclass
class Sample:
    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, -100 where not supervised
    tiles: torch.Tensor  # (N, 3, T, T) uint8: image tiles and video frames in token order
    source: str
    key: str
    # (source index, shard path, index in shard): where to rebuild it from after a resume.
    position: tuple = ()
    # (V, 5) int64, one row per video under EVS: [first tile, frames, kept tokens, span start,
    # span length], tiles and span in this sample's coordinates (the span: all the video's tokens).
    video_evs: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), dtype=np.int64))

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Tokenizer:
    """The few tokenizer operations the data path needs, over an HF tokenizer."""

    hf: object
    path: str = ""  # where it was loaded from, so worker processes can load it too
    special_ids: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        ids = {tok: self.hf.convert_tokens_to_ids(tok) for tok in st.ALL_SPECIAL_TOKENS}
        unknown = [t for t, i in ids.items() if i is None or (i == self.hf.unk_token_id and t != st.UNK)]
        if unknown:
            raise ValueError(f"tokenizer lacks special tokens {unknown}; add them before training")
        self.special_ids = ids

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), path=str(path))

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def template(self, mode: str):
        """The tokenizer's chat template as (messages, add_generation_prompt) -> text, or None."""
        if mode == "builtin" or not getattr(self.hf, "chat_template", None):
            return None
        return lambda messages, add_generation_prompt: self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    @cached_property
    def vocab_size(self) -> int:
        return len(self.hf)


def sample_rng(seed: int, raw: RawSample, stream: str = "") -> random.Random:
    """Per-sample randomness that depends only on the sample's identity, so re-decoding a sample
    (after resume) reproduces it exactly. Each `stream` is independent, so one decision's draws
    (EVS rates) never shift another's (reasoning mode)."""
    key = f"{seed}|{raw.shard}|{raw.index}" + (f"|{stream}" if stream else "")
    return random.Random(zlib.crc32(key.encode()))


def _media_members(raw: RawSample, prefix: str, suffixes: tuple[str, ...]) -> list[bytes]:
    found = {}
    for name, data in raw.members.items():
        stem, _, ext = name.partition(".")
        if stem.startswith(prefix) and stem[len(prefix):].isdigit() and ext in suffixes:
            found[int(stem[len(prefix):])] = data
    if sorted(found) != list(range(len(found))):
        raise SampleError("missing_member", f"{prefix} members are not numbered 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


def build_sample(raw: RawSample, source: str, spec: SampleSpec, tokenizer: Tokenizer) -> Sample:
    """Everything from raw bytes to token ids and uint8 tiles. Raises SampleError / MediaDecodeError."""
    try:
        doc = parse_json_member(raw)
    except ValueError as err:
        raise SampleError(str(err)) from None
    messages = parse_messages(doc)
    order = placeholder_order(messages)
    n_images, n_videos = order.count("image"), order.count("video")
    image_bytes = _media_members(raw, "img", IMAGE_SUFFIXES)
    video_bytes = _media_members(raw, "vid", ("mp4", "webm", "mkv", "avi", "mov"))
    if (n_images, n_videos) != (len(image_bytes), len(video_bytes)):
        raise SampleError(
            "placeholder_mismatch",
            f"{n_images} <image> / {n_videos} <video> placeholders for {len(image_bytes)} images / {len(video_bytes)} videos",
        )
    messages = apply_reasoning_mode(messages, spec.reasoning_on_ratio, sample_rng(spec.seed, raw))

    target_pixels = (spec.tiling.tile_size ** 2) * (spec.tiling.max_tiles + 1)
    images = [decode_image(b, target_pixels=target_pixels) for b in image_bytes]
    videos = [decode_video(b, target_fps=spec.video_fps, max_frames=spec.max_frames) for b in video_bytes]
    evs_rng = sample_rng(spec.seed, raw, "evs")
    video_q = [sample_q(spec.evs, evs_rng) if spec.evs.enabled else None for _ in videos]

    max_tiles, frame_keep = _fit_budget(messages, images, videos, video_q, order, spec, tokenizer)
    # replace keeps every other field (resample, resize_backend) as the spec set it.
    tiling = replace(spec.tiling, min_tiles=min(spec.tiling.min_tiles, max_tiles), max_tiles=max_tiles)
    image_tiles = [tile_image(img, tiling) for img in images]
    video_tiles = [frames_to_tiles(v.frames[keep], spec.tiling.tile_size, spec.tiling.resample, spec.tiling.resize_backend)
                   for v, keep in zip(videos, frame_keep)]
    slots = _slots(order, [t.shape[0] for t in image_tiles], videos, frame_keep, video_q, spec.tokens_per_tile)
    ids, labels, spans = tokenize_with_media_spans(messages, slots, tokenizer.encode, tokenizer.special_ids,
                                                   tokenizer.template(spec.chat_template), spec.loss_on_think)

    image_iter, video_iter = iter(image_tiles), iter(video_tiles)
    ordered = [next(image_iter) if kind == "image" else next(video_iter) for kind in order]
    if len(ordered) == 1:  # one image or video: its tiles as they are (cat would copy ~10 MB)
        tiles = ordered[0]
    else:
        tiles = torch.cat(ordered) if ordered else torch.zeros(0, 3, spec.tiling.tile_size, spec.tiling.tile_size, dtype=torch.uint8)
    return Sample(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), tiles, source, raw.key,
                  video_evs=_video_evs_rows(slots, spans))


def _video_slot(video: VideoFrames, keep: np.ndarray, tokens_per_tile: int, q: float | None) -> MediaSlot:
    labels = tuple(frame_label(i, video.timestamps[j]) for i, j in enumerate(keep))
    kept = None if q is None or not len(keep) else kept_token_count(len(keep), tokens_per_tile, q)
    return MediaSlot("video", len(keep), tokens_per_tile, labels, kept)


def _slots(order: list[str], tiles_per_image: list[int], videos: list[VideoFrames], frame_keep: list[np.ndarray],
           video_q: list[float | None], tokens_per_tile: int) -> list[MediaSlot]:
    image_iter = iter(tiles_per_image)
    video_iter = iter(zip(videos, frame_keep, video_q))
    slots = []
    for kind in order:
        if kind == "image":
            slots.append(MediaSlot("image", next(image_iter), tokens_per_tile))
        else:
            video, keep, q = next(video_iter)
            slots.append(_video_slot(video, keep, tokens_per_tile, q))
    return slots


def _video_evs_rows(slots: list[MediaSlot], spans: list[tuple[int, int]]) -> np.ndarray:
    """(V, 5) [first tile, frames, kept, span start, span length] of the slots pruned by EVS."""
    rows, first_tile = [], 0
    for slot, (start, length) in zip(slots, spans):
        if slot.kept_tokens is not None:
            rows.append((first_tile, slot.num_items, slot.kept_tokens, start, length))
        first_tile += slot.num_items
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)


def _tiles_for(image, tiling: TilingConfig, max_tiles: int) -> int:
    cols, rows = choose_tile_grid(image.width, image.height, TilingConfig(
        tile_size=tiling.tile_size, min_tiles=min(tiling.min_tiles, max_tiles), max_tiles=max_tiles,
        use_thumbnail=tiling.use_thumbnail, grid_mode=tiling.grid_mode))
    n = cols * rows
    return n + 1 if (n > 1 and tiling.use_thumbnail) else n


def _fit_budget(messages, images, videos, video_q, order, spec: SampleSpec, tokenizer: Tokenizer):
    """Largest tile cap on the ladder (and then the most video frames) that fits seq_length."""
    text_only, _ = tokenize_conversation(
        messages, [MediaSlot(kind, 0, 0) for kind in order], tokenizer.encode, tokenizer.special_ids,
        tokenizer.template(spec.chat_template))
    base = len(text_only) - 2 * order.count("image")  # empty image blocks still count their 2 markers
    ladder = [m for m in TILE_LADDER if m < spec.tiling.max_tiles]
    ladder = [spec.tiling.max_tiles] + ladder
    all_frames = [np.arange(v.frames.shape[0]) for v in videos]

    def video_tokens(keeps: list[np.ndarray]) -> int:
        return sum(media_token_count(_video_slot(v, k, spec.tokens_per_tile, q), tokenizer.encode)
                   for v, k, q in zip(videos, keeps, video_q))

    def image_tokens(max_tiles: int) -> int:
        return sum(_tiles_for(img, spec.tiling, max_tiles) * spec.tokens_per_tile + 2 for img in images)

    full_video = video_tokens(all_frames)
    for max_tiles in ladder:
        if base + image_tokens(max_tiles) + full_video <= spec.seq_length:
            return max_tiles, all_frames
    # Images at one tile each; now thin every video uniformly until it fits.
    image_min = image_tokens(1)
    longest = max((len(k) for k in all_frames), default=0)
    for keep_count in range(longest - 1, 0, -1):
        keeps = [_uniform_subset(len(k), min(len(k), keep_count)) for k in all_frames]
        if base + image_min + video_tokens(keeps) <= spec.seq_length:
            return 1, keeps
    raise SampleError("too_long", f"needs more than {spec.seq_length} tokens even at 1 tile and 1 frame")


def _uniform_subset(n: int, k: int) -> np.ndarray:
    """k indices spread uniformly over range(n), always including the first frame."""
    return np.unique(np.linspace(0, n - 1, num=k).round().astype(np.int64))

