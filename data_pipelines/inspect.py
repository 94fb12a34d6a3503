"""Show what training sees: a few samples, or one packed batch, rendered as an HTML page.

Samples are built by `build_sample` (in `--packed` mode planned by `plan_sample`, packed by
`Packer`, then the chosen ones decoded and collated), exactly as the training loader does. For each sample the page shows each image's tiles on their
grid beside the thumbnail and each video's frames with their timestamps (PNG files under
`media/`, referenced relatively), the token stream with loss-masked tokens (label -100) greyed,
supervised tokens highlighted and media token runs collapsed to a badge such as
`<image x 1024 tokens>`, and the token counts per part (text, media, supervised).

CLI: `python -m data_pipelines.inspect SHARD_DIR --tokenizer DIR --out OUT_DIR [--num 4] [--packed]
[--seq-length N ...]` writes `OUT_DIR/index.html` and `OUT_DIR/media/*.png`.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_pipelines.lint import add_sample_spec_arguments, sample_spec_from_args
from data_pipelines.training import special_tokens as st
from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.conversation import IGNORE_INDEX, SampleError
from data_pipelines.training.decode import MediaDecodeError, probe_image
from data_pipelines.training.packing import Packer, collate_rows
from data_pipelines.training.samples import (
    IMAGE_SUFFIXES,
    TILE_LADDER,
    Sample,
    SamplePlan,
    SampleSpec,
    Tokenizer,
    build_sample,
    decode_media,
    plan_sample,
)
from data_pipelines.training.shards import ShardError, RawSample, expand_shard_paths, index_shard, read_indexed_sample
from data_pipelines.training.tiling import choose_tile_grid, num_tiles

# The text `frame_label` writes before each video frame's block.
_FRAME_LABEL = re.compile(r"Frame (\d+) sampled at ([0-9.]+) seconds: $")
_LABEL_WINDOW = 48  # tokens before a block searched for its frame label
FRAMES_PER_SHEET_ROW = 8
GAP = 6  # pixels between tiles in the PNGs


# --------------------------------------------------------------------------------------
# Token stream -> parts
# --------------------------------------------------------------------------------------


@dataclass
class MediaBlock:
    """One `<img> <image>*n </img>` run: a whole image, or one video frame."""

    start: int  # token position of <img>
    stop: int  # one past </img>
    context_tokens: int
    frame: int | None = None  # 1-based frame number when a frame label precedes the block
    timestamp: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


@dataclass
class TextRun:
    start: int
    stop: int
    supervised: bool
    special: bool


def find_media_blocks(ids: np.ndarray, tokenizer: Tokenizer) -> list[MediaBlock]:
    """Media blocks in token order, each video frame tagged with the label the template put before it."""
    start_id, end_id = tokenizer.special_ids[st.IMG_START], tokenizer.special_ids[st.IMG_END]
    starts = np.flatnonzero(ids == start_id)
    ends = np.flatnonzero(ids == end_id)
    blocks, previous_stop = [], 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        block = MediaBlock(start, end + 1, end - start - 1)
        window = ids[max(previous_stop, start - _LABEL_WINDOW):start].tolist()
        label = _FRAME_LABEL.search(decode(tokenizer, window))
        if label:
            block.frame, block.timestamp = int(label.group(1)), float(label.group(2))
        blocks.append(block)
        previous_stop = block.stop
    return blocks


def text_runs(ids: np.ndarray, labels: np.ndarray, start: int, stop: int, special: set[int]) -> list[TextRun]:
    """[start, stop) split where supervision or special-ness changes."""
    runs: list[TextRun] = []
    for i in range(start, stop):
        sup, spec = bool(labels[i] != IGNORE_INDEX), int(ids[i]) in special
        if runs and runs[-1].supervised == sup and runs[-1].special == spec:
            runs[-1].stop = i + 1
        else:
            runs.append(TextRun(i, i + 1, sup, spec))
    return runs


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class TokenCounts:
    total: int
    text: int
    media: int  # tokens of media blocks, <img> and </img> included
    supervised: int
    tiles: int

    @classmethod
    def of(cls, ids: np.ndarray, labels: np.ndarray, blocks: list[MediaBlock], tiles: int) -> "TokenCounts":
        media = sum(b.num_tokens for b in blocks)
        return cls(len(ids), len(ids) - media, media, int((labels != IGNORE_INDEX).sum()), tiles)


# --------------------------------------------------------------------------------------
# Media items -> PNGs
# --------------------------------------------------------------------------------------


@dataclass
class ImageItem:
    block: MediaBlock
    tiles: torch.Tensor  # (N, 3, T, T) uint8, grid row-major then the thumbnail
    grid: tuple[int, int] | None  # (cols, rows); None when it cannot be recovered


@dataclass
class VideoItem:
    blocks: list[MediaBlock] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)  # (3, T, T) uint8 each


def image_grid(raw_image: bytes | None, tile_count: int, spec: SampleSpec) -> tuple[int, int] | None:
    """The (cols, rows) `build_sample` cut this image into: the tile cap on the ladder whose grid gives
    `tile_count` tiles for the image's size as its header gives it (what `plan_sample` uses)."""
    if raw_image is None:
        return None
    try:
        width, height = probe_image(raw_image)
    except MediaDecodeError:
        return None
    tiling = spec.tiling
    for cap in [tiling.max_tiles] + [m for m in TILE_LADDER if m < tiling.max_tiles]:
        cfg = replace(tiling, min_tiles=min(tiling.min_tiles, cap), max_tiles=cap)
        if num_tiles(width, height, cfg) == tile_count:
            return choose_tile_grid(width, height, cfg)
    return None


def group_media(blocks: list[MediaBlock], tiles: torch.Tensor, tokens_per_tile: int, raw: RawSample | None,
                spec: SampleSpec) -> list[ImageItem | VideoItem]:
    """Blocks + the sample's tiles (token order) -> images and videos; frame 1 opens a new video."""
    items: list[ImageItem | VideoItem] = []
    raw_images = _raw_images(raw)
    next_tile, image_index = 0, 0
    for block in blocks:
        if block.frame is not None:
            if block.frame == 1 or not items or not isinstance(items[-1], VideoItem):
                items.append(VideoItem())
            items[-1].blocks.append(block)
            items[-1].frames.append(tiles[next_tile])
            next_tile += 1
        else:
            count = block.context_tokens // tokens_per_tile
            raw_image = raw_images[image_index] if image_index < len(raw_images) else None
            items.append(ImageItem(block, tiles[next_tile:next_tile + count], image_grid(raw_image, count, spec)))
            next_tile += count
            image_index += 1
    return items


def _raw_images(raw: RawSample | None) -> list[bytes]:
    if raw is None:
        return []
    found = {}
    for suffix, data in raw.members.items():
        stem, _, ext = suffix.partition(".")
        if stem.startswith("img") and stem[3:].isdigit() and ext in IMAGE_SUFFIXES:
            found[int(stem[3:])] = data
    return [found[i] for i in sorted(found)]


def _to_pil(tile: torch.Tensor) -> Image.Image:
    return Image.fromarray(tile.permute(1, 2, 0).contiguous().numpy())  # (3, T, T) -> (T, T, 3)


def render_image_item(item: ImageItem, path: Path) -> None:
    """Grid tiles in place (row-major), the thumbnail to the right after a wider gap."""
    n, t = item.tiles.shape[0], item.tiles.shape[-1]
    cols, rows = item.grid if item.grid else (n, 1)
    grid_tiles = cols * rows
    has_thumb = n == grid_tiles + 1
    if grid_tiles > n:  # unrecoverable grid: lay the tiles out in one row
        cols, rows, grid_tiles, has_thumb = n, 1, n, False
    width = cols * t + (cols - 1) * GAP + ((3 * GAP + t) if has_thumb else 0)
    height = rows * t + (rows - 1) * GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for i in range(grid_tiles):
        r, c = divmod(i, cols)
        canvas.paste(_to_pil(item.tiles[i]), (c * (t + GAP), r * (t + GAP)))
    if has_thumb:
        canvas.paste(_to_pil(item.tiles[-1]), (cols * t + (cols - 1) * GAP + 3 * GAP, 0))
    canvas.save(path)


def render_video_item(item: VideoItem, path: Path) -> None:
    """Contact sheet: frames in order, each captioned with its number and timestamp."""
    t = item.frames[0].shape[-1]
    caption = 16
    cols = min(FRAMES_PER_SHEET_ROW, len(item.frames))
    rows = -(-len(item.frames) // cols)
    canvas = Image.new("RGB", (cols * t + (cols - 1) * GAP, rows * (t + caption) + (rows - 1) * GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (frame, block) in enumerate(zip(item.frames, item.blocks)):
        r, c = divmod(i, cols)
        x, y = c * (t + GAP), r * (t + caption + GAP)
        canvas.paste(_to_pil(frame), (x, y))
        draw.text((x + 2, y + t + 2), f"#{block.frame} {block.timestamp:.2f}s", fill=(0, 0, 0))
    canvas.save(path)


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section { border-top: 2px solid #ccc; margin-top: 1.5em; padding-top: .5em; }
table.counts td { padding: 0 .8em 0 0; }
pre.tokens { white-space: pre-wrap; word-break: break-word; background: #fafafa; padding: .6em;
             border: 1px solid #ddd; font-size: 13px; line-height: 1.5; }
span.masked { color: #999; }
span.sup { background: #d4f7d4; color: #064; }
span.special { font-weight: bold; }
span.media { background: #dde8ff; color: #124; border-radius: 3px; padding: 0 3px; }
span.pad { background: #eee; color: #777; border-radius: 3px; padding: 0 3px; }
figure { display: inline-block; margin: .4em 1em .4em 0; vertical-align: top; }
figure img { max-width: 100%; max-height: 420px; border: 1px solid #ccc; }
div.rowbar { display: flex; height: 18px; border: 1px solid #999; margin: .3em 0; }
div.rowbar div { border-right: 1px solid #fff; font-size: 11px; overflow: hidden; color: #fff; padding-left: 2px; }
div.rowbar div.seg { background: #4a7; } div.rowbar div.padseg { background: #bbb; }
"""


@dataclass
class SampleView:
    """One sample to draw: its tokens and tiles (from a Sample or a packed segment) and where it came from."""

    title: str
    ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64
    tiles: torch.Tensor  # (N, 3, T, T) uint8
    raw: RawSample | None


def render_sample(view: SampleView, tokenizer: Tokenizer, spec: SampleSpec, media_dir: Path, prefix: str) -> str:
    """HTML of one sample; writes its PNGs into `media_dir` named after `prefix`."""
    blocks = find_media_blocks(view.ids, tokenizer)
    items = group_media(blocks, view.tiles, spec.tokens_per_tile, view.raw, spec)
    counts = TokenCounts.of(view.ids, view.labels, blocks, int(view.tiles.shape[0]))
    figures = []
    image_no = video_no = 0
    for item in items:
        if isinstance(item, ImageItem):
            name = f"{prefix}_img{image_no}.png"
            render_image_item(item, media_dir / name)
            grid = f"{item.grid[0]}x{item.grid[1]} grid" if item.grid else "grid unknown"
            thumb = " + thumbnail" if item.grid and item.tiles.shape[0] == item.grid[0] * item.grid[1] + 1 else ""
            caption = (f"image {image_no + 1}: {grid}{thumb}, {item.tiles.shape[0]} tiles, "
                       f"{item.block.context_tokens} tokens")
            image_no += 1
        else:
            name = f"{prefix}_vid{video_no}.png"
            render_video_item(item, media_dir / name)
            stamps = ", ".join(f"{b.timestamp:.2f}" for b in item.blocks)
            caption = f"video {video_no + 1}: {len(item.frames)} frames at {stamps} s"
            video_no += 1
        figures.append(f'<figure><img src="media/{name}" alt="{html.escape(caption)}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return (f"<section><h2>{html.escape(view.title)}</h2>\n{_counts_table(counts)}\n"
            f"<div>{''.join(figures)}</div>\n"
            f'<pre class="tokens">{_token_html(view.ids, view.labels, blocks, tokenizer)}</pre></section>\n')


def _counts_table(c: TokenCounts) -> str:
    return (f'<table class="counts" data-total="{c.total}" data-text="{c.text}" data-media="{c.media}" '
            f'data-supervised="{c.supervised}" data-tiles="{c.tiles}">'
            f"<tr><td>total tokens</td><td>{c.total}</td></tr>"
            f"<tr><td>text tokens</td><td>{c.text}</td></tr>"
            f"<tr><td>media tokens (with &lt;img&gt; &lt;/img&gt;)</td><td>{c.media}</td></tr>"
            f"<tr><td>supervised tokens</td><td>{c.supervised}</td></tr>"
            f"<tr><td>tiles + frames</td><td>{c.tiles}</td></tr></table>")


def _token_html(ids: np.ndarray, labels: np.ndarray, blocks: list[MediaBlock], tokenizer: Tokenizer) -> str:
    special = set(tokenizer.special_ids.values())
    out, position = [], 0
    for block in blocks + [None]:
        stop = block.start if block is not None else len(ids)
        for run in text_runs(ids, labels, position, stop, special):
            classes = ("sup" if run.supervised else "masked") + (" special" if run.special else "")
            text = html.escape(decode(tokenizer, ids[run.start:run.stop].tolist()))
            out.append(f'<span class="{classes}">{text}</span>')
        if block is not None:
            kind = "frame" if block.frame is not None else "image"
            out.append(f'<span class="media" title="{block.num_tokens} tokens with &lt;img&gt; &lt;/img&gt;">'
                       f"&lt;{kind} x {block.context_tokens} tokens&gt;</span>")
            position = block.stop
    return "".join(out)


def _page(title: str, summary: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{summary}\n{''.join(body)}"
            "</body></html>\n")


# --------------------------------------------------------------------------------------
# Samples and packed batches
# --------------------------------------------------------------------------------------


@dataclass
class Built:
    sample: Sample | SamplePlan  # a plan until packing chose it (--packed)
    raw: RawSample
    shard: str
    index: int


def build_samples(shards: list[str], spec: SampleSpec, tokenizer: Tokenizer, count: int, decode: bool = True
                  ) -> tuple[list[Built], list[tuple[str, str, str]]]:
    """The first `count` samples training would keep, in shard order; and the skipped (shard, key, reason).
    `decode=False` plans them only (tokens, no pixels), as the loader's packer buffer holds them."""
    built, skipped = [], []
    for shard in shards:
        for index, entry in enumerate(index_shard(shard)):
            if len(built) == count:
                return built, skipped
            raw = read_indexed_sample(shard, index, entry)
            try:
                sample = (build_sample if decode else plan_sample)(raw, "inspect", spec, tokenizer)
            except (SampleError, MediaDecodeError) as err:
                skipped.append((shard, raw.key, err.reason))
                continue
            built.append(Built(sample, raw, shard, index))
    return built, skipped


def render_samples(built: list[Built], tokenizer: Tokenizer, spec: SampleSpec, out: Path) -> list[str]:
    return [render_sample(SampleView(f"{b.raw.key}  ({Path(b.shard).name} #{b.index})", b.sample.input_ids,
                                     b.sample.labels, b.sample.tiles, b.raw), tokenizer, spec, out / "media", f"s{i:03d}")
            for i, b in enumerate(built)]


def pack_batch(planned: list[Built], spec: SampleSpec, tokenizer: Tokenizer, num_rows: int,
               skipped: list[tuple[str, str, str]]) -> tuple[PackedBatch, list[list[Built]]]:
    """One batch of `num_rows` rows, packed from the planned samples and then decoded, as the training
    loader does: media that fails to decode leaves a hole in its row and is added to `skipped`."""
    packer = Packer(spec.seq_length)
    by_id = {id(b.sample): b for b in planned}
    for b in planned:
        packer.add(b.sample)
    rows = []
    for plans in [packer.pop_row() for _ in range(min(num_rows, len(planned))) if packer.buffer]:
        row = []
        for plan in plans:
            b = by_id[id(plan)]
            try:
                b.sample = plan.with_tiles(decode_media(plan.media, b.raw, spec))
            except MediaDecodeError as err:
                skipped.append((b.shard, b.raw.key, err.reason))
                continue
            row.append(b)
        rows.append(row)
    batch = collate_rows([[b.sample for b in row] for row in rows], spec.seq_length,
                         tokenizer.special_ids[st.PAD], spec.tiling.tile_size)
    return batch, rows


def render_batch(batch: PackedBatch, rows: list[list[Built]], tokenizer: Tokenizer, spec: SampleSpec, out: Path
                 ) -> tuple[str, list[str]]:
    """Summary + one section per packed segment, read back from the batch tensors."""
    length = batch.input_ids.shape[1]
    cu = batch.cu_seqlens.tolist()
    sections, segment = [], 0
    for r, row in enumerate(rows):
        bar, row_html = [], []
        for sample_no, b in enumerate(row + [None]):
            if segment + 1 >= len(cu) or cu[segment] >= (r + 1) * length:
                break
            lo, hi = cu[segment] - r * length, cu[segment + 1] - r * length
            width = 100.0 * (hi - lo) / length
            if b is None:  # the row's padding segment
                bar.append(f'<div class="padseg" style="width:{width:.2f}%">pad</div>')
                row_html.append(f'<p><span class="pad">&lt;pad x {hi - lo} tokens&gt;</span> '
                                f"positions {lo}..{hi - 1}</p>")
            else:
                bar.append(f'<div class="seg" style="width:{width:.2f}%">{sample_no + 1}</div>')
                view = SampleView(f"row {r} segment {segment}: {b.raw.key}  (tokens {lo}..{hi - 1})",
                                  batch.input_ids[r, lo:hi].numpy(), batch.labels[r, lo:hi].numpy(),
                                  batch.tiles[batch.media_sample_index == segment], b.raw)
                row_html.append(render_sample(view, tokenizer, spec, out / "media", f"r{r}_seg{segment}"))
            segment += 1
        sections.append(f"<h2>row {r}</h2><div class=\"rowbar\">{''.join(bar)}</div>\n" + "".join(row_html))
    summary = (f"<p>{len(rows)} rows x {length} tokens, {batch.num_samples} samples, {batch.num_real_tokens} real "
               f"tokens ({100.0 * batch.num_real_tokens / batch.input_ids.numel():.1f}% full), "
               f"{batch.num_supervised_tokens} supervised, {batch.tiles.shape[0]} tiles + frames</p>"
               f"<p>cu_seqlens: {html.escape(str(cu))}</p>")
    return summary, sections


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.inspect",
        description="Render samples as training builds them (or one packed batch) to OUT_DIR/index.html with PNGs "
                    "of image tiles and video frames: masked tokens greyed, supervised tokens highlighted, media "
                    "runs collapsed to badges, token counts per part.")
    parser.add_argument("shards", metavar="SHARD_DIR", help="a shard directory or a brace/glob pattern of .tar files")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (data.tokenizer)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="where index.html and media/ go")
    parser.add_argument("--num", type=int, default=4, metavar="N",
                        help="samples to render; with --packed, rows in the batch (default: %(default)s)")
    parser.add_argument("--packed", action="store_true", help="render one packed batch (Packer + collate_rows)")
    parser.add_argument("--pack-buffer", type=int, default=100, metavar="N",
                        help="--packed: samples the packer chooses from, data.pack_buffer (default: %(default)s)")
    add_sample_spec_arguments(parser)
    args = parser.parse_args(argv)
    if args.num < 1 or args.pack_buffer < 1:
        parser.error("--num and --pack-buffer must be >= 1")
    if not Path(args.tokenizer).is_dir():
        parser.error(f"--tokenizer {args.tokenizer!r} is not a directory")
    try:
        args.spec = sample_spec_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def inspect_shards(shards: list[str], tokenizer: Tokenizer, spec: SampleSpec, out: Path, num: int,
                   packed: bool = False, pack_buffer: int = 100) -> Path:
    """Write `out/index.html` (+ `out/media/*.png`); returns the page's path."""
    (out / "media").mkdir(parents=True, exist_ok=True)
    built, skipped = build_samples(shards, spec, tokenizer, max(pack_buffer, num) if packed else num,
                                   decode=not packed)
    if not built:
        raise ValueError(f"no sample in {len(shards)} shards could be built ({len(skipped)} skipped)")
    if packed:
        batch, rows = pack_batch(built, spec, tokenizer, num, skipped)
        summary, body = render_batch(batch, rows, tokenizer, spec, out)
        title = f"packed batch from {len(built)} buffered samples"
    else:
        body = render_samples(built, tokenizer, spec, out)
        summary, title = "", f"{len(built)} samples"
    settings = (f"seq_length {spec.seq_length}, {spec.tiling.tile_size}px tiles x{spec.tiling.min_tiles}.."
                f"{spec.tiling.max_tiles}, {spec.tokens_per_tile} tokens/tile, video {spec.video_fps:g} fps "
                f"&lt;= {spec.max_frames} frames")
    skipped_html = "".join(f"<li>{html.escape(Path(s).name)} {html.escape(k)}: {html.escape(r)}</li>"
                           for s, k, r in skipped)
    summary = (f"<p>{settings}</p>{summary}"
               + (f"<details><summary>{len(skipped)} skipped samples</summary><ul>{skipped_html}</ul></details>"
                  if skipped else ""))
    page = out / "index.html"
    page.write_text(_page(title, summary, body), encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        shards = expand_shard_paths(args.shards)
    except (FileNotFoundError, ShardError) as err:
        print(f"inspect: {err}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.load(args.tokenizer)
    try:
        page = inspect_shards(shards, tokenizer, args.spec, args.out, args.num, args.packed, args.pack_buffer)
    except ValueError as err:
        print(f"inspect: {err}", file=sys.stderr)
        return 1
    print(f"[inspect] wrote {page}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
