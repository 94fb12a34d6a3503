"""Dynamic-resolution image tiling (InternVL `dynamic_preprocess` rule) and normalisation.

An image becomes a `cols x rows` grid of square tiles plus, when the grid has more than one
tile, a thumbnail of the whole image. The grid is chosen from the image size alone, so the
token count of an image is known before any pixel is touched (`num_tiles`), which the budget
and packing code rely on.

Tiles leave the data pipeline as uint8 (4x smaller to move and pin than float32);
`normalize_tiles` turns them into model inputs on the device.

Resizing is most of the CPU cost of an image (Pillow's bicubic runs about 1 multiply-add per
ns on one core: ~40 ms for a 3 MP canvas, twice the JPEG decode). torch's antialiased uint8
resize (AVX2) computes the same separable filter with the same support, ~4x faster; its pixels
differ from Pillow's by at most a level or two in fixed-point rounding (bicubic overshoot
clipped between passes can differ more where one axis grows while the other shrinks).
`resize_backend="pil"` keeps Pillow for bit-exact InternVL output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

GRID_MODES = ("internvl", "area")
RESIZE_BACKENDS = ("torch", "pil")

RESAMPLE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,  # InternVL and the Nemotron VL processors use bicubic
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
# Filters torch resizes with antialiasing as Pillow does; the others always go through Pillow.
_TORCH_FILTERS = ("bicubic", "bilinear")

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
    `resize_backend` picks who resizes for bicubic and bilinear (see the module docstring).
    """

    tile_size: int = 512
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    grid_mode: str = "internvl"  # or "area"
    resample: str = "bicubic"
    resize_backend: str = "torch"

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
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(
                f"resize_backend must be one of {RESIZE_BACKENDS}, got {self.resize_backend!r}"
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


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> `(3, H, W)` uint8 view of its `(H, W, 3)` pixels (channels-last strides).

    One copy (Pillow's packed RGB bytes); the tensor is read-only in spirit: never write to it.
    """
    pixels = np.asarray(image)  # (H, W, 3), read-only: Pillow hands out immutable bytes
    with warnings.catch_warnings():  # torch warns on read-only arrays; nothing here writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view


def resize_pixels(
    pixels: torch.Tensor, size: tuple[int, int], resample: str = "bicubic", backend: str = "torch"
) -> torch.Tensor:
    """uint8 `(B, 3, H, W)` -> `(B, 3, *size)` uint8, `size = (height, width)`, any strides.

    torch backend: antialiased like Pillow, fastest on channels-last input (what a `(H, W, 3)`
    array permuted gives). Filters torch lacks (lanczos, box, nearest) and `backend="pil"` go
    through Pillow one image at a time. Same size in and out returns the input itself.
    """
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    if backend == "torch" and resample in _TORCH_FILTERS:
        return F.interpolate(pixels, size=size, mode=resample, antialias=True)
    filt = RESAMPLE_FILTERS[resample]
    height, width = size
    out = torch.empty((pixels.shape[0], 3, height, width), dtype=torch.uint8)
    for i, one in enumerate(pixels):
        image = Image.fromarray(one.permute(1, 2, 0).contiguous().numpy())  # (H, W, 3)
        out[i] = image_to_tensor(image.resize((width, height), resample=filt))
    return out


def _resize(image: Image.Image, pixels: torch.Tensor | None, size: tuple[int, int],
            cfg: TilingConfig) -> torch.Tensor:
    """`(3, *size)` uint8 from the PIL image (Pillow path) or its pixels (torch path)."""
    if pixels is None:
        width_height = (size[1], size[0])
        if image.size == width_height:
            return image_to_tensor(image)
        return image_to_tensor(image.resize(width_height, resample=RESAMPLE_FILTERS[cfg.resample]))
    return resize_pixels(pixels[None], size, cfg.resample, cfg.resize_backend)[0]


def tile_image(image: Image.Image, cfg: TilingConfig, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Image -> uint8 tiles `(N, 3, tile, tile)`: grid tiles row-major, then the thumbnail.

    `grid`: the `(cols, rows)` chosen earlier from the image's full size (a loader plans tokens
    from the header, and a JPEG decoded at reduced scale can round to a slightly different
    aspect); None chooses it from this image.

    One resize to the whole grid canvas, then each tile is copied straight out of it into one
    preallocated tensor (no per-tile crops, no concatenation). The thumbnail is resized from
    the original image, as InternVL does, and is added only when the grid has more than one
    tile.
    """
    image = _to_rgb(image)
    tile = cfg.tile_size
    cols, rows = grid or choose_tile_grid(image.width, image.height, cfg)
    grid_tiles = cols * rows
    with_thumbnail = cfg.use_thumbnail and grid_tiles > 1
    on_torch = cfg.resize_backend == "torch" and cfg.resample in _TORCH_FILTERS
    pixels = image_to_tensor(image) if on_torch else None  # (3, H, W)

    tiles = torch.empty((grid_tiles + with_thumbnail, 3, tile, tile), dtype=torch.uint8)
    canvas = _resize(image, pixels, (rows * tile, cols * tile), cfg)  # (3, R*t, C*t)
    blocks = canvas.unflatten(1, (rows, tile)).unflatten(3, (cols, tile))  # (3, R, t, C, t) view
    tiles[:grid_tiles].view(rows, cols, 3, tile, tile).copy_(blocks.permute(1, 3, 0, 2, 4))
    if with_thumbnail:
        tiles[grid_tiles].copy_(_resize(image, pixels, (tile, tile), cfg))  # (3, t, t)
    return tiles


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
