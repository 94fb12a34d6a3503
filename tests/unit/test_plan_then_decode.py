"""Plan first, decode after packing: a plan's tokens are exactly the built sample's, the packer
buffer holds no pixels, and media that fails only at decode leaves a counted hole in its row."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_pipelines.synth import KINDS
from data_pipelines.training.config import SourceConfig
from data_pipelines.training.loader import PackedBatchStream
from data_pipelines.training.samples import SamplePlan, SampleSpec, build_sample, decode_media, plan_sample
from data_pipelines.training.shards import RawSample, expand_shard_paths, iter_shard
from data_pipelines.training.tiling import TilingConfig
from tests.shard_writer import write_shard
from tests.batches import assert_same_batches

SPEC = SampleSpec(seq_length=1024, tokens_per_tile=4, tiling=TilingConfig(tile_size=64, max_tiles=6),
                  video_fps=2.0, max_frames=8)
SHORT_ROWS = SampleSpec(seq_length=128, tokens_per_tile=4, tiling=TilingConfig(tile_size=64, max_tiles=6))
QA = [{"role": "user", "content": "<image> What is it?"}, {"role": "assistant", "content": "Noise."}]


def _raws(synth_data, kind, count=6):
    shard = expand_shard_paths(str(synth_data.shard_dirs[kind]))[0]
    return [raw for _, raw in zip(range(count), iter_shard(shard))]


@pytest.mark.parametrize("kind", KINDS)
def test_plan_has_the_built_samples_tokens_and_tile_count(synth_data, tokenizer, kind):
    for raw in _raws(synth_data, kind):
        plan = plan_sample(raw, kind, SPEC, tokenizer)
        built = build_sample(raw, kind, SPEC, tokenizer)
        assert np.array_equal(plan.input_ids, built.input_ids) and np.array_equal(plan.labels, built.labels)
        assert np.array_equal(plan.video_evs, built.video_evs)
        assert plan.num_tiles == built.tiles.shape[0]
        assert decode_media(plan.media, raw, SPEC).equal(built.tiles)


def _jpeg(width: int, height: int, orientation: int = 1, quality: int = 90) -> bytes:
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, exif=exif)
    return buf.getvalue()


def _raw(members: dict[str, bytes], key: str = "k") -> RawSample:
    raw = RawSample(key=key, shard="s.tar", index=0)
    raw.members = {"json": json.dumps({"messages": QA}).encode(), **members}
    return raw


@pytest.mark.parametrize("size, orientation", [((1999, 391), 1), ((391, 1999), 6), ((1030, 770), 8)])
def test_grid_comes_from_the_header_even_when_the_decoder_scales_down(tokenizer, size, orientation):
    # Large JPEGs decode at 1/2..1/8 scale, which rounds the aspect: tiles must follow the plan.
    spec = SampleSpec(seq_length=2048, tokens_per_tile=4, tiling=TilingConfig(tile_size=32, max_tiles=12))
    raw = _raw({"img0.jpg": _jpeg(*size, orientation=orientation)})
    plan = plan_sample(raw, "t", spec, tokenizer)
    cols, rows = plan.media[0].grid
    # Orientation 6 and 8 turn the stored image: the grid follows the displayed shape.
    wide = size[0] > size[1] if orientation < 5 else size[1] > size[0]
    assert (cols > rows) == wide
    assert build_sample(raw, "t", spec, tokenizer).tiles.shape[0] == plan.num_tiles == cols * rows + 1


def _stream(shard_dir, tokenizer, workers=0, pack_buffer=8, spec=SPEC):
    return PackedBatchStream([SourceConfig("mixed", str(shard_dir), 1.0)], spec, tokenizer, micro_batch_size=1,
                             pack_buffer=pack_buffer, num_workers=workers)


@pytest.fixture()
def shard_with_a_late_failure(tmp_path):
    """Good images, and one JPEG whose header opens but whose body is cut: it fails only at decode."""
    good = [(f"good{i:02d}", {"json": json.dumps({"messages": QA}).encode(), "img0.jpg": _jpeg(96 + i, 64)})
            for i in range(12)]
    cut = _jpeg(200, 120)
    late = ("late", {"json": json.dumps({"messages": QA}).encode(), "img0.jpg": cut[: len(cut) // 2]})
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    write_shard(shard_dir / "shard-000000.tar", [late] + good)
    return shard_dir


@pytest.mark.parametrize("workers", [0, 2])
def test_a_decode_failure_after_packing_is_a_counted_hole(shard_with_a_late_failure, tokenizer, workers):
    stream = _stream(shard_with_a_late_failure, tokenizer, workers)
    chosen = []
    choose = stream.packer.pop_row
    stream.packer.pop_row = lambda: chosen.append(choose()) or chosen[-1]
    try:
        batch = stream.next_batch()
    finally:
        stream.close()
    first_row = chosen[0]
    assert "late" in [p.key for p in first_row]  # the oldest sample is always in the first row
    planned_tokens = sum(p.length for p in first_row)
    late = next(p for p in first_row if p.key == "late")
    # The row keeps its other samples; the failed one's tokens are padding.
    assert batch.num_samples == len(first_row) - 1
    assert batch.num_real_tokens == planned_tokens - late.length
    assert stream.skipped == {"corrupt_image": 1}
    assert stream.skipped_by_source == {"mixed/corrupt_image": 1}
    assert stream.samples_by_source == {"mixed": len(first_row) - 1}
    assert stream.state_dict()["skipped"] == {"corrupt_image": 1}


def test_the_buffer_holds_plans_not_pixels(shard_with_a_late_failure, tokenizer):
    stream = _stream(shard_with_a_late_failure, tokenizer, pack_buffer=8, spec=SHORT_ROWS)
    stream.next_batch()
    assert stream.packer.buffer and all(isinstance(p, SamplePlan) for p in stream.packer.buffer)
    assert not any(hasattr(p, "tiles") for p in stream.packer.buffer)
    # A plan costs its token arrays: 16 bytes a token, no tile bytes.
    assert all(p.nbytes == 16 * p.length for p in stream.packer.buffer)


def test_resume_after_a_hole_is_exact(shard_with_a_late_failure, tokenizer):
    straight = _stream(shard_with_a_late_failure, tokenizer, pack_buffer=4, spec=SHORT_ROWS)
    expected = [straight.next_batch() for _ in range(4)]
    first = _stream(shard_with_a_late_failure, tokenizer, pack_buffer=4, spec=SHORT_ROWS)
    got = [first.next_batch() for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _stream(shard_with_a_late_failure, tokenizer, pack_buffer=4, spec=SHORT_ROWS)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(2)]
    assert_same_batches(got, expected)
    assert straight.epochs < 1  # one pass: the late failure is met once
    assert resumed.skipped == straight.skipped == {"corrupt_image": 1}
    assert resumed.samples_by_source == straight.samples_by_source


def _internvl_tiles(data: bytes, tile: int, max_tiles: int) -> tuple[tuple[int, int], np.ndarray]:
    """An independent build of one image's tiles, written here from InternVL's published rule
    (`dynamic_preprocess`): the whole image decoded by Pillow and turned upright by its EXIF, the
    grid (cols, rows) with 1..max_tiles tiles whose aspect is closest to the image's (on a tie, the
    larger grid when the image has more than half its pixels), a resize to the grid, the tiles in
    row-major order, and a thumbnail of the whole image when there is more than one tile."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    width, height = image.size
    grids = sorted({(c, r) for n in range(1, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if c * r <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    cols, rows = best
    resized = np.asarray(image.resize((tile * cols, tile * rows), Image.BICUBIC))
    tiles = [resized[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        tiles.append(np.asarray(image.resize((tile, tile), Image.BICUBIC)))
    return best, np.stack(tiles).transpose(0, 3, 1, 2)  # (N, 3, tile, tile)


@pytest.mark.parametrize("kind", ["image", "multi_image"])
def test_plan_and_decode_agree_with_an_independent_internvl_build(synth_data, tokenizer, kind):
    """Grids and tile counts equal, pixels close (the resize filters differ slightly): the plan, our
    decode and a build that shares no code with them."""
    spec = SampleSpec(seq_length=16384, tokens_per_tile=4, tiling=TilingConfig(tile_size=64, max_tiles=6))
    for raw in _raws(synth_data, kind):
        plan = plan_sample(raw, kind, spec, tokenizer)
        tiles = decode_media(plan.media, raw, spec)
        expected = [_internvl_tiles(raw.members[m.member], 64, 6) for m in plan.media]
        assert [m.grid for m in plan.media] == [grid for grid, _ in expected]
        reference = np.concatenate([t for _, t in expected])
        assert tiles.shape == reference.shape == (plan.num_tiles, 3, 64, 64)
        # Mean difference under one level of 255 (measured: below 0.1); a tile out of place costs tens.
        assert np.abs(tiles.numpy().astype(np.int16) - reference.astype(np.int16)).mean() < 1
