"""The data-throughput bench measures what it claims: its inputs, its reference path, its clock.

Real parts throughout: JPEGs and an H.264 MP4 made by the bench's own generators, real tar
shards read by `shards.iter_shard`, `build_sample` with the embedded synthetic tokenizer.
"""

from __future__ import annotations

import io
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.synth import ensure_embedded_data
from data_pipelines.training import samples as samples_module
from data_pipelines.training.decode import sample_frame_indices
from data_pipelines.training.samples import Tokenizer, build_sample
from data_pipelines.training.shards import iter_shard
from data_pipelines.training.tiling import TilingConfig, choose_tile_grid, num_tiles
from tests.bench import bench_data_throughput as bench

REAL = TilingConfig(tile_size=bench.TILE, max_tiles=bench.MAX_TILES)


def test_image_sizes_are_2_to_3_megapixel_photos_of_many_shapes():
    assert len(bench.IMAGE_SIZES) == 24 and len(set(bench.IMAGE_SIZES)) == 24
    for width, height in bench.IMAGE_SIZES:
        assert 2.0 <= width * height / 1e6 <= 3.0, (width, height)
    aspects = {Fraction(w, h).limit_denominator(20) for w, h in bench.IMAGE_SIZES}
    assert len(aspects) >= 10
    assert any(w > h for w, h in bench.IMAGE_SIZES) and any(w < h for w, h in bench.IMAGE_SIZES)
    tiles = [num_tiles(w, h, REAL) for w, h in bench.IMAGE_SIZES]
    assert min(tiles) >= 7 and max(tiles) == bench.MAX_TILES + 1  # real settings: 12 + thumbnail
    stats = bench.image_set_stats([b""] * len(bench.IMAGE_SIZES))
    assert stats["tiles_per_image"]["max"] == 13 and 9 <= stats["tiles_per_image"]["mean"] <= 11


def test_reference_grid_rule_is_internvls_and_ours():
    for width, height in bench.IMAGE_SIZES + ((512, 512), (1024, 1024), (300, 900), (100, 10)):
        assert bench.internvl_grid(width, height) == choose_tile_grid(width, height, REAL)


def test_photo_jpeg_is_a_quality_90_photo_not_flat_colour():
    width, height = bench.IMAGE_SIZES[0]
    data = bench.photo_jpeg(width, height, seed=0)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (width, height) and image.mode == "RGB"
    q90 = io.BytesIO()
    Image.new("RGB", (16, 16)).save(q90, "JPEG", quality=90)
    assert image.quantization == Image.open(q90).quantization  # the same tables: quality 90
    bits_per_pixel = 8 * len(data) / (width * height)
    assert 1.5 <= bits_per_pixel <= 5.0  # a q90 photo; flat colours would be well under 0.5
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 30 and np.abs(np.diff(pixels, axis=1)).mean() > 3  # broad and fine detail
    assert bench.photo_jpeg(width, height, seed=0) == data  # one fixed image set per seed


@pytest.mark.parametrize("size", [(2000, 1500), (1920, 1080)])  # 12 + thumbnail; x grows while y shrinks
def test_ours_and_reference_cut_the_same_tiles_with_close_pixels(size):
    data = bench.photo_jpeg(*size, seed=1)
    ours = bench.ours_tiles(data, bench.Phases())
    reference = bench.reference_tiles(data, bench.Phases())
    assert ours.dtype == torch.uint8 and reference.dtype == torch.float32
    assert ours.shape == reference.shape == (num_tiles(*size, REAL), 3, bench.TILE, bench.TILE)
    fidelity = bench.image_fidelity([data])
    assert fidelity["same_grids"]
    assert fidelity["within_1_level"] >= 0.999 and fidelity["mean_abs_diff"] <= 0.3
    assert fidelity["max_abs_diff"] <= 12  # bicubic overshoot is clipped between passes in each
    assert bench.decode_alone(data, bench.Phases()) == ours.shape[0]


def test_phases_are_exclusive_and_wrappers_are_removed():
    phases = bench.Phases()
    original = samples_module.decode_image

    def spin(seconds: float) -> None:
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    with bench.phases_of(phases, {(samples_module, "decode_image"): "decode"}):
        assert samples_module.decode_image is not original
        with phases("outer"):
            spin(0.02)
            with phases("inner"):
                spin(0.03)
    assert samples_module.decode_image is original
    assert 0.02 <= phases.cpu["outer"] < 0.03 and phases.cpu["inner"] >= 0.03  # not counted twice


def test_mix_shards_give_real_samples_with_the_claimed_media(tmp_path):
    small = bench.photo_jpeg(1024, 768, seed=2)  # small, to stay fast: tile counts are what matter
    video = bench.video_mp4(seconds=2, seed=3)
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == bench.VIDEO_SIZE and stream.codec_context.name == "h264"
        assert stream.average_rate == bench.VIDEO_NATIVE_FPS
        assert sum(1 for _ in container.decode(stream)) == 2 * bench.VIDEO_NATIVE_FPS
    shard = bench.write_media_shard(tmp_path / "mix.tar", [([small], []), ([small] * 3, []), ([], [video])])
    embedded = ensure_embedded_data(tmp_path / "embedded", {"image": 1, "video": 1, "multi_image": 1, "text": 8})
    tokenizer = Tokenizer.load(str(embedded.tokenizer_dir))

    built = [build_sample(raw, "mix", bench.spec(), tokenizer) for raw in iter_shard(str(shard))]
    per_image = num_tiles(1024, 768, REAL)
    frames = len(sample_frame_indices(2 * bench.VIDEO_NATIVE_FPS, bench.VIDEO_NATIVE_FPS, bench.VIDEO_FPS))
    assert [s.tiles.shape[0] for s in built] == [per_image, 3 * per_image, frames]
    for sample in built:
        assert sample.tiles.dtype == torch.uint8 and sample.tiles.shape[1:] == (3, bench.TILE, bench.TILE)
        assert sample.length > sample.tiles.shape[0] * bench.TOKENS_PER_TILE  # plus the conversation


def test_summaries_take_medians_and_shares():
    passes = [bench.Pass(cpu=c, wall=2 * c, samples=4, visual_tokens=1000, text_tokens=0,
                         phases_cpu={"decode": c / 2}) for c in (1.0, 2.0, 4.0)]
    summary = bench.summarize("x", passes)
    assert summary["visual_tokens_per_s"] == 500 and summary["visual_tokens_per_s_wall"] == 250
    assert summary["shares"] == {"decode": 0.5, "other": 0.5}
