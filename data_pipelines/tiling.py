"""Dynamic-resolution image tiling (InternVL `dynamic_preprocess` rule) and normalisation.

An image becomes a `cols x rows` grid of square tiles plus, when the grid has more than one
tile, a thumbnail of the whole image. The grid is chosen from the image size alone, so the
token count of an image is known before any pixel is touched (`num_tiles`), which the budget
and packing code rely on.

Tiles leave the data pipeline as uint8 (4x smaller to move and pin than float32);
`normalize_tiles` turns them into model inputs on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

GRID_MODES = ("internvl", "area")

RESAMPLE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,  # InternVL and the Nemotron VL processors use bicubic
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

# (mean, std) per channel, on pixel values scaled to [0, 1].
# - radio: the Nemotron Nano V2 VL checkpoints ship `norm_mean`/`norm_std` in their HF config and
#   apply them inside the model (vLLM `nano_nemotron_vl.input_conditioner`); the values are the
#   OpenAI CLIP constants.
# - clip: OpenAI CLIP preprocessing.
# - siglip: SigLIP / SigLIP2 image processors (maps [0, 1] to [-1, 1]).
# - imagenet: torchvision / timm ImageNet defaults (InternVL's own processor uses these).
IMAGE_NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "radio": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class TilingConfig:
    """How one image is cut into tiles.

    The defaults are the published Nemotron Nano V2 VL setting: 512 px tiles, 1..12 tiles,
    a thumbnail when there is more than one tile, InternVL grid choice, bicubic resize.
    """

    tile_size: int = 512
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    grid_mode: str = "internvl"  # or "area"
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise ValueError(
                f"tile_size must be a positive int (e.g. 512), got {self.tile_size!r}"
            )
        if not isinstance(self.min_tiles, int) or self.min_tiles < 1:
            raise ValueError(f"min_tiles must be an int >= 1, got {self.min_tiles!r}")
        if not isinstance(self.max_tiles, int) or self.max_tiles < self.min_tiles:
            raise ValueError(
                f"max_tiles must be an int >= min_tiles ({self.min_tiles}), got {self.max_tiles!r}; "
                "set max_tiles to at least min_tiles"
            )
        if not isinstance(self.use_thumbnail, bool):
            raise ValueError(f"use_thumbnail must be true or false, got {self.use_thumbnail!r}")
        if self.grid_mode not in GRID_MODES:
            raise ValueError(f"grid_mode must be one of {GRID_MODES}, got {self.grid_mode!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(
                f"resample must be one of {tuple(RESAMPLE_FILTERS)}, got {self.resample!r}"
            )


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All `(cols, rows)` with `min_tiles <= cols * rows <= max_tiles`, fewest tiles first.

    Same set and order as InternVL's `target_ratios`. Its sort is by tile count only; grids
    with equal counts never tie on aspect ratio, so the order among them (here: by cols)
    cannot change which grid wins.
    """
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles // cols + 1)
        if cols * rows >= min_tiles
    ]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def _closest_aspect_grid(
    width: int, height: int, grids: list[tuple[int, int]], tile_size: int
) -> tuple[int, int]:
    """InternVL `find_closest_aspect_ratio`.

    Walk the grids from fewest tiles up and keep the one whose cols/rows is closest to the
    image's width/height. On an exact tie (same float distance, e.g. 2:1 vs 4:2) a later,
    larger grid replaces the kept one only when the image has more than half the pixels the
    larger grid would hold, so small images are not blown up into many tiles.
    Starts from (1, 1) as InternVL does, even when min_tiles > 1 (then any grid beats it).
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def _best_resolution_grid(
    width: int, height: int, grids: list[tuple[int, int]], tile_size: int
) -> tuple[int, int]:
    """LLaVA-NeXT `select_best_resolution` over the tile grids.

    For each grid canvas (cols*tile x rows*tile) the image is scaled to fit inside it with its
    aspect kept; `effective` = pixels of that fitted image, capped at the original pixel count
    (upscaling adds no information); `wasted` = canvas pixels - effective. Pick the grid with
    the largest `effective`; among equal ones the smallest `wasted`; among equal ones the
    first (fewest tiles). Unlike the InternVL rule this never spends tiles on a small image
    (they would only add waste) and grows the grid with the image's resolution.
    """
    best, best_effective, best_wasted = grids[0], -1, float("inf")
    for cols, rows in grids:
        canvas_w, canvas_h = cols * tile_size, rows * tile_size
        scale = min(canvas_w / width, canvas_h / height)
        fitted = int(width * scale) * int(height * scale)
        effective = min(fitted, width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cols, rows), effective, wasted
    return best


def choose_tile_grid(width: int, height: int, cfg: TilingConfig) -> tuple[int, int]:
    """`(cols, rows)` of the tile grid for a `width x height` image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    grids = candidate_grids(cfg.min_tiles, cfg.max_tiles)
    if cfg.grid_mode == "internvl":
        return _closest_aspect_grid(width, height, grids, cfg.tile_size)
    return _best_resolution_grid(width, height, grids, cfg.tile_size)


def num_tiles(width: int, height: int, cfg: TilingConfig) -> int:
    """Tiles `tile_image` will return for this size, thumbnail included, without decoding."""
    cols, rows = choose_tile_grid(width, height, cfg)
    grid = cols * rows
    return grid + 1 if (cfg.use_thumbnail and grid > 1) else grid


def _to_rgb(image: Image.Image) -> Image.Image:
    # `decode_image` already returns RGB with alpha and 16-bit handled; this only guards
    # callers that pass PIL images from elsewhere.
    return image if image.mode == "RGB" else image.convert("RGB")


def _split_grid(canvas: np.ndarray, cols: int, rows: int, tile: int) -> np.ndarray:
    """Cut a `(rows*tile, cols*tile, 3)` array into `(rows*cols, 3, tile, tile)`, row-major."""
    blocks = canvas.reshape(rows, tile, cols, tile, 3)  # (R, t, C, t, 3) view
    blocks = blocks.transpose(0, 2, 4, 1, 3)  # (R, C, 3, t, t) view
    return blocks.reshape(rows * cols, 3, tile, tile)  # (N, 3, t, t), one copy


def tile_image(image: Image.Image, cfg: TilingConfig) -> torch.Tensor:
    """Image -> uint8 tiles `(N, 3, tile, tile)`: grid tiles row-major, then the thumbnail.

    One resize to the whole grid canvas, then the tiles are reshaped out of that single
    array (no per-tile crops). The thumbnail is resized from the original image, as InternVL
    does, and is added only when the grid has more than one tile.
    """
    image = _to_rgb(image)
    tile = cfg.tile_size
    resample = RESAMPLE_FILTERS[cfg.resample]
    cols, rows = choose_tile_grid(image.width, image.height, cfg)

    canvas = np.asarray(image.resize((cols * tile, rows * tile), resample=resample))  # (H, W, 3)
    tiles = _split_grid(canvas, cols, rows, tile)  # (cols*rows, 3, t, t)
    if cfg.use_thumbnail and cols * rows > 1:
        thumb = np.asarray(image.resize((tile, tile), resample=resample))  # (t, t, 3)
        tiles = np.concatenate([tiles, thumb.transpose(2, 0, 1)[None]], axis=0)  # (N, 3, t, t)
    return torch.from_numpy(np.ascontiguousarray(tiles))


def normalize_tiles(
    tiles_uint8: torch.Tensor,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """uint8 `(..., 3, H, W)` -> float32 `(x / 255 - mean) / std`, on the tiles' device."""
    if tiles_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize_tiles expects uint8 tiles, got {tiles_uint8.dtype}")
    if tiles_uint8.dim() < 3 or tiles_uint8.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) tiles, got shape {tuple(tiles_uint8.shape)}")
    device = tiles_uint8.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    pixels = tiles_uint8.to(torch.float32).div_(255.0)
    return pixels.sub_(mean_t).div_(std_t)
