"""Tile-grid choice (InternVL rule and area rule), tiling layout, normalisation, config checks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.training.tiling import (
    IMAGE_NORMALIZATION,
    TilingConfig,
    candidate_grids,
    choose_tile_grid,
    normalize_tiles,
    num_tiles,
    tile_image,
)


# ---- an independent, literal re-statement of InternVL's dynamic_preprocess grid choice ----
def internvl_grid(width: int, height: int, min_num: int, max_num: int, image_size: int):
    ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    ratios.add((i, j))
    ordered = sorted(ratios, key=lambda r: r[0] * r[1])
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for r in ordered:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff:
            if width * height > 0.5 * image_size * image_size * r[0] * r[1]:
                best = r
    return best


SIZES = [
    # (width, height, expected (cols, rows) for 512 px tiles, 1..12 tiles)
    (512, 512, (1, 1)),  # ties with 2x2 and 3x3, too small for them
    (1024, 1024, (2, 2)),  # big enough for 2x2, not for 3x3
    (1024, 512, (2, 1)),
    (300, 900, (1, 3)),
    (2000, 200, (10, 1)),
    (10, 10, (1, 1)),
    (8000, 6000, (4, 3)),
    (768, 512, (3, 2)),
]


@pytest.mark.parametrize("width,height,expected", SIZES)
def test_internvl_grid_table(width, height, expected):
    cfg = TilingConfig()
    assert choose_tile_grid(width, height, cfg) == expected
    assert internvl_grid(width, height, 1, 12, 512) == expected


def test_internvl_grid_matches_reference_on_random_sizes():
    rng = random.Random(0)
    configs = [TilingConfig(), TilingConfig(min_tiles=2, max_tiles=6), TilingConfig(tile_size=448)]
    for _ in range(400):
        width, height = rng.randint(1, 9000), rng.randint(1, 9000)
        for cfg in configs:
            expected = internvl_grid(width, height, cfg.min_tiles, cfg.max_tiles, cfg.tile_size)
            assert choose_tile_grid(width, height, cfg) == expected, (width, height, cfg)


def test_candidate_grids_match_internvl_target_ratios():
    for lo, hi in [(1, 12), (1, 1), (3, 7), (12, 12)]:
        grids = candidate_grids(lo, hi)
        expected = {(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1)
                    for j in range(1, n + 1) if lo <= i * j <= hi}
        assert set(grids) == expected and len(grids) == len(expected)
        counts = [c * r for c, r in grids]
        assert counts == sorted(counts)


@pytest.mark.parametrize("width,height", [(s[0], s[1]) for s in SIZES] + [(100, 10), (5, 4000)])
def test_min_and_max_tiles_respected(width, height):
    for lo, hi in [(1, 1), (1, 2), (4, 6), (6, 12)]:
        for mode in ("internvl", "area"):
            cols, rows = choose_tile_grid(width, height, TilingConfig(min_tiles=lo, max_tiles=hi,
                                                                      grid_mode=mode))
            assert lo <= cols * rows <= hi


def test_area_mode_rule():
    cfg = TilingConfig(grid_mode="area")
    assert choose_tile_grid(10, 10, cfg) == (1, 1)
    assert choose_tile_grid(8000, 6000, cfg) == (4, 3)
    assert choose_tile_grid(2048, 1024, cfg) == (4, 2)  # covers every pixel, wastes none
    # The aspect rule spends 10 tiles on a tiny 10:1 strip; the area rule does not.
    assert choose_tile_grid(100, 10, TilingConfig()) == (10, 1)
    assert choose_tile_grid(100, 10, cfg) == (1, 1)
    # 1100x500: 3x1 (1536x512) shows it at full resolution with the least padding.
    assert choose_tile_grid(1100, 500, cfg) == (3, 1)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("width,height", [(64, 32), (30, 90), (200, 20), (48, 48), (7, 5)])
def test_tiles_are_exact_blocks_of_one_resize(width, height):
    cfg = TilingConfig(tile_size=16, resize_backend="pil")  # pins Pillow bit-exactness
    image = _random_image(width, height)
    cols, rows = choose_tile_grid(width, height, cfg)
    tiles = tile_image(image, cfg)

    grid = cols * rows
    assert tiles.dtype == torch.uint8 and tiles.is_contiguous()
    assert tiles.shape == (grid + (1 if grid > 1 else 0), 3, 16, 16)
    canvas = np.asarray(image.resize((cols * 16, rows * 16), Image.Resampling.BICUBIC))
    for i in range(grid):
        r, c = divmod(i, cols)  # row-major, as InternVL crops them
        block = canvas[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].transpose(2, 0, 1)
        assert np.array_equal(tiles[i].numpy(), block)
    if grid > 1:
        thumb = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        assert np.array_equal(tiles[-1].numpy(), thumb)


def test_thumbnail_rule_and_num_tiles():
    image = _random_image(64, 32)  # 2x1 grid at tile 32
    assert tile_image(image, TilingConfig(tile_size=32)).shape[0] == 3
    assert tile_image(image, TilingConfig(tile_size=32, use_thumbnail=False)).shape[0] == 2
    single = _random_image(32, 32)
    assert tile_image(single, TilingConfig(tile_size=32)).shape[0] == 1  # no thumbnail for 1
    for w, h in [(64, 32), (32, 32), (10, 100), (500, 37)]:
        for thumb in (True, False):
            cfg = TilingConfig(tile_size=32, use_thumbnail=thumb)
            assert num_tiles(w, h, cfg) == tile_image(_random_image(w, h), cfg).shape[0]


def test_max_tiles_image_gives_12_tiles_plus_thumbnail():
    cfg = TilingConfig(tile_size=8)
    tiles = tile_image(_random_image(32, 24), cfg)  # 4:3 -> 4x3 grid
    assert tiles.shape == (13, 3, 8, 8)


def test_resample_is_configurable_and_non_rgb_input_is_accepted():
    image = _random_image(64, 32)
    bicubic = tile_image(image, TilingConfig(tile_size=16))
    nearest = tile_image(image, TilingConfig(tile_size=16, resample="nearest"))
    assert not torch.equal(bicubic, nearest)
    gray = tile_image(image.convert("L"), TilingConfig(tile_size=16))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_normalize_tiles():
    tiles = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 4, 2)
    mean, std = IMAGE_NORMALIZATION["radio"]
    out = normalize_tiles(tiles, mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 2)
    for ch in range(3):
        assert out[0, ch, 0, 0].item() == pytest.approx(-mean[ch] / std[ch], rel=1e-6)
        assert out[0, ch, 0, 1].item() == pytest.approx((1 - mean[ch]) / std[ch], rel=1e-6)
    assert tiles.dtype == torch.uint8  # input untouched
    with pytest.raises(TypeError):
        normalize_tiles(tiles.float(), mean, std)


def test_normalization_constants():
    assert set(IMAGE_NORMALIZATION) == {"radio", "siglip", "clip", "imagenet"}
    assert IMAGE_NORMALIZATION["radio"] == (
        (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert IMAGE_NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert IMAGE_NORMALIZATION["siglip"] == ((0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("kwargs,field", [
    ({"tile_size": 0}, "tile_size"),
    ({"min_tiles": 0}, "min_tiles"),
    ({"min_tiles": 4, "max_tiles": 2}, "max_tiles"),
    ({"grid_mode": "best"}, "grid_mode"),
    ({"resample": "cubic"}, "resample"),
    ({"use_thumbnail": "yes"}, "use_thumbnail"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TilingConfig(**kwargs)


def test_bad_image_size_rejected():
    with pytest.raises(ValueError):
        choose_tile_grid(0, 10, TilingConfig())
