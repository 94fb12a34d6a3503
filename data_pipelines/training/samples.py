"""Raw shard sample -> training sample: parse, fit the token budget, tokenize, decode media.

Two steps, so a loader can pack before it decodes: `plan_sample` reads only image headers and
video container indexes and gives the exact tokens (`SamplePlan`); `decode_media` then cuts the
tiles and frames. `build_sample` does both.

The exact token count is known before any tile is cut: when a sample would overflow the
sequence length, images degrade along the tile ladder 12->8->6->4->2->1 and videos drop frames
uniformly; only then is the sample skipped (reason `too_long`). Under EVS a video counts the
tokens it will keep after pruning (`data_pipelines.training.evs`), at a rate drawn per video.
"""

from __future__ import annotations

import random
import sys
import zlib
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

import numpy as np
import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import (
    MediaSlot,
    SampleError,
    apply_reasoning_mode,
    frame_label,
    media_token_count,
    parse_messages,
    placeholder_order,
    template_segments,
    tokenize_conversation,
    tokenize_with_media_spans,
)
from data_pipelines.training.decode import (
    MediaDecodeError,
    VideoProbe,
    decode_image,
    decode_video_frames,
    frames_to_tiles,
    probe_image,
    probe_video,
)
from data_pipelines.training.evs import EvsConfig, kept_token_count, sample_q
from data_pipelines.training.shards import DataError, RawSample, parse_json_member
from data_pipelines.training.tiling import TilingConfig, choose_tile_grid, num_tiles, tile_image

TILE_LADDER = (12, 8, 6, 4, 2, 1)
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
VIDEO_SUFFIXES = ("mp4", "webm", "mkv", "avi", "mov")


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
    max_json_bytes: int = 16 * 1024 * 1024  # data.max_json_bytes


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
        """The tokenizer's chat template as (messages, add_generation_prompt) -> text, or None
        (mode "builtin", or "auto" with a tokenizer that has none; "tokenizer" requires one)."""
        if mode == "builtin":
            return None
        if not getattr(self.hf, "chat_template", None):
            if mode == "tokenizer":
                raise DataError(f"data.chat_template=tokenizer but the tokenizer in {self.path or '(memory)'} has no "
                                "chat template: add one or set data.chat_template=auto")
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


def media_members(raw: RawSample, prefix: str, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the `<prefix><i>.<ext>` members, in order of i."""
    found = {}
    for name in raw.members:
        stem, _, ext = name.partition(".")
        if stem.startswith(prefix) and stem[len(prefix):].isdigit():
            if ext.lower() not in suffixes:  # e.g. a .gif: say so, rather than miscount the placeholders
                raise SampleError("unsupported_media", f"member {name!r}: .{ext} is not read; convert it to one of "
                                                       f"{', '.join('.' + s for s in suffixes)}")
            found[int(stem[len(prefix):])] = name
    if sorted(found) != list(range(len(found))):
        raise SampleError("missing_member", f"{prefix} members are not numbered 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


@dataclass(frozen=True)
class MediaPlan:
    """How one media member becomes tiles once its sample is chosen for a row."""

    member: str  # shard member name, e.g. "img0.jpg"
    num_tiles: int  # tiles it yields (thumbnail included) = frames for a video
    grid: tuple[int, int] = (0, 0)  # image: (cols, rows), chosen from the header size
    video: VideoProbe | None = None  # video: what the container index said
    frames: tuple[int, ...] = ()  # video: source frame indices to decode (after thinning)


@dataclass
class SamplePlan:
    """A sample with its tokens and exact length but no pixels: what the packer buffers.

    About 16 bytes a token plus a few hundred per media item, where the built sample's tiles take
    786 KB each (512 px); `decode_media` turns the plan into tiles after packing chose it.
    """

    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64
    media: tuple[MediaPlan, ...]  # in token order
    source: str
    key: str
    position: tuple = ()  # as Sample.position
    video_evs: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), dtype=np.int64))
    # Switches away from the configured path this sample took (counted per source, warned once):
    # `chat_template_fallback` (the tokenizer's template is not prefix-stable here: ChatML used),
    # `video_pyav_fallback` (decord missing or failed on a video: PyAV read it).
    notes: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return sum(m.num_tiles for m in self.media)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (the part that grows with the sample)."""
        return self.input_ids.nbytes + self.labels.nbytes + self.video_evs.nbytes

    def with_tiles(self, tiles: torch.Tensor) -> Sample:
        if tiles.shape[0] != self.num_tiles:
            raise ValueError(f"sample {self.key}: {tiles.shape[0]} tiles for {self.num_tiles} planned")
        return Sample(self.input_ids, self.labels, tiles, self.source, self.key, self.position, self.video_evs)


def build_sample(raw: RawSample, source: str, spec: SampleSpec, tokenizer: Tokenizer) -> Sample:
    """Everything from raw bytes to token ids and uint8 tiles. Raises SampleError / MediaDecodeError."""
    plan = plan_sample(raw, source, spec, tokenizer)
    return plan.with_tiles(decode_media(plan.media, raw, spec))


_warned_unexpected: set[str] = set()


def plan_sample(raw: RawSample, source: str, spec: SampleSpec, tokenizer: Tokenizer) -> SamplePlan:
    """Raw bytes -> tokens, labels and a media plan, reading only image headers and video
    container indexes. Raises SampleError / MediaDecodeError (media that cannot even be opened).

    One sample must never end a run: an error nothing here foresaw (a tokenizer or a library
    refusing odd input) is a counted `bad_sample` skip, its first occurrence of each kind printed
    with the sample's key so it can be found and fixed."""
    try:
        return _plan_sample(raw, source, spec, tokenizer)
    except (SampleError, MediaDecodeError, DataError):  # DataError: the settings, not this sample, are wrong
        raise
    except Exception as err:  # noqa: BLE001 (see the docstring)
        kind = type(err).__name__
        if kind not in _warned_unexpected:
            _warned_unexpected.add(kind)
            print(f"warning: sample {raw.key!r} (source {source!r}) skipped as bad_sample: {kind}: {err}"[:400],
                  file=sys.stderr, flush=True)
        raise SampleError("bad_sample", f"{kind}: {err}") from None


def _plan_sample(raw: RawSample, source: str, spec: SampleSpec, tokenizer: Tokenizer) -> SamplePlan:
    if raw.dropped:  # a member the reader refused (unsafe name, link): the sample is not what it claims
        name, reason = raw.dropped[0]
        raise SampleError(reason, f"member {name!r} is never read")
    size = len(raw.members.get("json", b""))
    if size > spec.max_json_bytes:
        raise SampleError("too_large", f"JSON member of {size:,} bytes > data.max_json_bytes={spec.max_json_bytes:,}")
    try:
        doc = parse_json_member(raw)
    except ValueError as err:
        raise SampleError(str(err)) from None
    messages = parse_messages(doc)
    order = placeholder_order(messages)
    n_images, n_videos = order.count("image"), order.count("video")
    image_members = media_members(raw, "img", IMAGE_SUFFIXES)
    video_members = media_members(raw, "vid", VIDEO_SUFFIXES)
    if (n_images, n_videos) != (len(image_members), len(video_members)):
        raise SampleError(
            "placeholder_mismatch",
            f"{n_images} <image> / {n_videos} <video> placeholders for {len(image_members)} images / {len(video_members)} videos",
        )
    messages = apply_reasoning_mode(messages, spec.reasoning_on_ratio, sample_rng(spec.seed, raw))

    image_sizes = [probe_image(raw.members[m]) for m in image_members]  # (width, height) as displayed
    videos = [probe_video(raw.members[m], target_fps=spec.video_fps, max_frames=spec.max_frames)
              for m in video_members]
    evs_rng = sample_rng(spec.seed, raw, "evs")
    video_q = [sample_q(spec.evs, evs_rng) if spec.evs.enabled else None for _ in videos]

    max_tiles, frame_keep = _fit_budget(messages, image_sizes, videos, video_q, order, spec, tokenizer)
    tiling = _capped(spec.tiling, max_tiles)
    images = [MediaPlan(m, num_tiles(w, h, tiling), grid=choose_tile_grid(w, h, tiling))
              for m, (w, h) in zip(image_members, image_sizes)]
    clips = [MediaPlan(m, len(keep), video=v, frames=tuple(v.indices[j] for j in keep))
             for m, v, keep in zip(video_members, videos, frame_keep)]
    slots = _slots(order, [i.num_tiles for i in images], videos, frame_keep, video_q, spec.tokens_per_tile)
    template = tokenizer.template(spec.chat_template)
    segments = template_segments(messages, template) if template is not None else None
    notes = []
    if template is not None and segments is None:
        if spec.chat_template == "tokenizer":
            raise DataError(f"sample {raw.key} ({raw.shard}): the tokenizer's chat template is not prefix-stable on "
                            "this conversation (it rewrites earlier turns), and data.chat_template=tokenizer forbids "
                            "the ChatML fallback: fix the template or set data.chat_template=auto")
        notes.append("chat_template_fallback")
    if any(v.backend == "pyav" for v in videos):
        notes.append("video_pyav_fallback")
    ids, labels, spans = tokenize_with_media_spans(messages, slots, tokenizer.encode, tokenizer.special_ids,
                                                   template, spec.loss_on_think, segments=segments)
    image_iter, clip_iter = iter(images), iter(clips)
    media = tuple(next(image_iter) if kind == "image" else next(clip_iter) for kind in order)
    return SamplePlan(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), media, source, raw.key,
                      video_evs=_video_evs_rows(slots, spans), notes=tuple(notes))


def decode_media(media: tuple[MediaPlan, ...], raw: RawSample, spec: SampleSpec) -> torch.Tensor:
    """(N, 3, T, T) uint8: the planned media's tiles and frames in token order.

    Raises MediaDecodeError when a file that opened at planning time fails to decode (a corrupt
    body, a truncated stream)."""
    target_pixels = (spec.tiling.tile_size ** 2) * (spec.tiling.max_tiles + 1)
    parts = []
    for item in media:
        data = raw.members[item.member]
        if item.video is None:
            parts.append(tile_image(decode_image(data, target_pixels=target_pixels), spec.tiling, grid=item.grid))
        else:
            frames = decode_video_frames(data, item.video, item.frames)  # (T, H, W, 3)
            parts.append(frames_to_tiles(frames, spec.tiling.tile_size, spec.tiling.resample,
                                         spec.tiling.resize_backend))
    if len(parts) == 1:  # one image or video: its tiles as they are (cat would copy ~10 MB)
        return parts[0]
    size = spec.tiling.tile_size
    return torch.cat(parts) if parts else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _capped(tiling: TilingConfig, max_tiles: int) -> TilingConfig:
    # replace keeps every other field (thumbnail, grid mode) as the spec set it.
    return replace(tiling, min_tiles=min(tiling.min_tiles, max_tiles), max_tiles=max_tiles)


def _video_slot(video: VideoProbe, keep: np.ndarray, tokens_per_tile: int, q: float | None) -> MediaSlot:
    labels = tuple(frame_label(i, video.timestamps[j]) for i, j in enumerate(keep))
    kept = None if q is None or not len(keep) else kept_token_count(len(keep), tokens_per_tile, q)
    return MediaSlot("video", len(keep), tokens_per_tile, labels, kept)


def _slots(order: list[str], tiles_per_image: list[int], videos: list[VideoProbe], frame_keep: list[np.ndarray],
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


def _fit_budget(messages, image_sizes, videos, video_q, order, spec: SampleSpec, tokenizer: Tokenizer):
    """Largest tile cap on the ladder (and then the most video frames) that fits seq_length."""
    text_only, _ = tokenize_conversation(
        messages, [MediaSlot(kind, 0, 0) for kind in order], tokenizer.encode, tokenizer.special_ids,
        tokenizer.template(spec.chat_template))
    base = len(text_only) - 2 * order.count("image")  # empty image blocks still count their 2 markers
    ladder = [m for m in TILE_LADDER if m < spec.tiling.max_tiles]
    ladder = [spec.tiling.max_tiles] + ladder
    all_frames = [np.arange(len(v.indices)) for v in videos]
    encode_label = lru_cache(maxsize=None)(lambda text: tuple(tokenizer.encode(text)))

    def video_tokens(keeps: list[np.ndarray], encode=encode_label) -> int:
        return sum(media_token_count(_video_slot(v, k, spec.tokens_per_tile, q), encode)
                   for v, k, q in zip(videos, keeps, video_q))

    def image_tokens(max_tiles: int) -> int:
        tiling = _capped(spec.tiling, max_tiles)
        return sum(num_tiles(w, h, tiling) * spec.tokens_per_tile + 2 for w, h in image_sizes)

    full_video = video_tokens(all_frames)
    for max_tiles in ladder:
        if base + image_tokens(max_tiles) + full_video <= spec.seq_length:
            return max_tiles, all_frames
    # Images at one tile each; now thin every video uniformly until it fits.
    room = spec.seq_length - base - image_tokens(1)
    longest = max((len(k) for k in all_frames), default=0)
    for keep_count in range(longest - 1, 0, -1):
        keeps = [_uniform_subset(len(k), min(len(k), keep_count)) for k in all_frames]
        # Labels only add tokens: a count that overflows without them is out before any is
        # tokenized (each count has its own labels, so encoding them all would be O(frames^2)).
        if video_tokens(keeps, encode=lambda label: ()) <= room and video_tokens(keeps) <= room:
            return 1, keeps
    raise SampleError("too_long", f"needs more than {spec.seq_length} tokens even at 1 tile and 1 frame")


def _uniform_subset(n: int, k: int) -> np.ndarray:
    """k indices spread uniformly over range(n), always including the first frame."""
    return np.unique(np.linspace(0, n - 1, num=k).round().astype(np.int64))

