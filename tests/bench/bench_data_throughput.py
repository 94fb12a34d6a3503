"""Data-path throughput per CPU core: image, multi-image, video and text mixes at real settings.

Real settings: 512 px tiles, up to 12 tiles + thumbnail, videos at 2 fps up to 128 frames,
256 visual tokens per tile or frame. "Per core" = one process, one thread (torch threads 1;
Pillow, decord and PyAV decode single-threaded); the primary clock is this process's CPU
time, so other jobs on the machine slow the wall clock but not the per-core figure. Wall
figures and the load average are recorded too.

1. Image path, side by side on one set of photo-like 2-3 MP JPEGs (quality 90):
   - reference: the plain InternVL path re-implemented (`load_image` + `dynamic_preprocess` +
     the torchvision-free transform): Pillow decode at full size, one resize to the grid,
     a crop per tile, a thumbnail from the original, then per tile the same-size Resize copy,
     ToTensor and float32 Normalize;
   - ours: `decode.decode_image` + `tiling.tile_image`, uint8 out (normalisation happens on
     the device); also ours + `normalize_tiles` on the CPU, to show what uint8 out saves;
   - JPEG decode alone (Pillow, full size): the bound for any path that decodes every pixel.
   Variants run interleaved (rotated order, several rounds) and the median is reported, so a
   load change hits all of them alike; ratios are taken within each round.
2. Mixes end to end through `samples.build_sample` from real tar shards (read, parse, decode,
   fit the budget, tile, tokenize): one image per sample, three images per sample, 640x360
   30 fps MP4s of 20-60 s, and code-reasoning text from the embedded synthetic data with its
   tokenizer. The time of the decode and the resize/tiling calls inside build_sample is
   attributed by timing wrappers around the real functions.

Run: `python -m tests.bench.run_all throughput` (or `make bench` for all benchmarks).
"""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import tarfile
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, features

from data_pipelines.synth import ensure_embedded_data
from data_pipelines.training import samples as samples_module
from data_pipelines.training import tiling as tiling_module
from data_pipelines.training.decode import decode_image
from data_pipelines.training.samples import SampleSpec, Tokenizer, build_sample
from data_pipelines.training.shards import iter_shard
from data_pipelines.training.tiling import IMAGE_NORMALIZATION, TilingConfig, normalize_tiles, num_tiles, tile_image

NAME = "bench_data_throughput"
SEED = 0
TILE = 512
MAX_TILES = 12
TOKENS_PER_TILE = 256
VIDEO_FPS = 2.0
MAX_FRAMES = 128
SEQ_LENGTH = 49_152  # the stage-2 length: a 128-frame video (32,768 visual tokens) fits whole
JPEG_QUALITY = 90
# (width, height): 24 common photo shapes of 2.0-3.0 MP, landscape and portrait.
IMAGE_SIZES = (
    (2000, 1500), (1800, 1350), (1640, 1230), (1440, 1800), (1230, 1640), (1500, 2000),  # 4:3, 4:5
    (2000, 1333), (1800, 1200), (1920, 1280), (1333, 2000), (1200, 1800), (1280, 1920),  # 3:2
    (1920, 1080), (2048, 1152), (2240, 1260), (1080, 1920), (1152, 2048), (2400, 1080),  # 16:9, 20:9
    (1500, 1500), (1700, 1700), (1920, 1200), (1200, 1920), (2200, 1100), (1800, 1440),  # 1:1, 16:10, 2:1, 5:4
)
IMAGES_PER_MULTI_SAMPLE = 3
VIDEO_SECONDS = (20, 60)  # the ends of the 20-60 s range; a minute of H.264 takes ~5 s to make
VIDEO_SIZE = (640, 360)
VIDEO_NATIVE_FPS = 30
TEXT_SAMPLES = 240
IMAGE_ROUNDS = 5
MIX_ROUNDS = 3
TARGET_TOKENS_PER_S = 60_000  # ours, image mix, per core (issue 3 item 11)
REFERENCE_REPORTED = 22_000  # the plain path on this machine, as the issue reports it
# InternVL normalises with the ImageNet constants; the cost is the same for any constants.
MEAN, STD = IMAGE_NORMALIZATION["imagenet"]

REFERENCE = "reference: plain InternVL path (float32)"
OURS = "ours: decode_image + tile_image (uint8)"
OURS_NORMALISED = "ours + normalize_tiles on CPU (float32)"
DECODE_ONLY = "JPEG decode alone (Pillow, full size)"


# ---- timing -------------------------------------------------------------------------------

@dataclass
class Phases:
    """Exclusive CPU and wall seconds per named phase (a nested phase is not counted twice)."""

    cpu: Counter = field(default_factory=Counter)
    wall: Counter = field(default_factory=Counter)
    _inner: list = field(default_factory=list)  # per open phase: [cpu, wall] of its nested phases

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._inner.append([0.0, 0.0])
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            inner_cpu, inner_wall = self._inner.pop()
            self.cpu[name] += cpu - inner_cpu
            self.wall[name] += wall - inner_wall
            if self._inner:
                self._inner[-1][0] += cpu
                self._inner[-1][1] += wall

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return timed


@contextmanager
def phases_of(phases: Phases, targets: dict[tuple[object, str], str]) -> Iterator[None]:
    """Time calls to module-level functions by name: `{(module, attribute): phase}`.

    build_sample and tile_image look their helpers up as module globals at call time, so
    swapping in a timing wrapper attributes their time without copying their code.
    """
    originals = {key: getattr(*key) for key in targets}
    try:
        for (module, attribute), phase in targets.items():
            setattr(module, attribute, phases.wrap(originals[(module, attribute)], phase))
        yield
    finally:
        for (module, attribute), fn in originals.items():
            setattr(module, attribute, fn)


@dataclass
class Pass:
    """One timed pass of one variant over its whole input set."""

    cpu: float
    wall: float
    samples: int
    visual_tokens: int
    text_tokens: int
    phases_cpu: dict[str, float]


def timed_pass(work: Callable[[Phases], tuple[int, int, int]], timing: dict) -> Pass:
    phases = Phases()
    with phases_of(phases, timing):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        samples, visual, text = work(phases)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return Pass(cpu, wall, samples, visual, text, dict(phases.cpu))


# ---- the inputs ---------------------------------------------------------------------------

def photo_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 with a photo's spread of detail, so JPEG decode costs what a photo's does.

    Smooth colour fields (sky, walls), mid-scale texture, hard-edged shapes and sensor-like
    grain; flat colours would decode several times faster than real photos.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 96 + 2, width // 96 + 2, 3), dtype=np.uint8)
    texture = rng.integers(0, 256, (height // 6, width // 6, 3), dtype=np.uint8)
    base = Image.blend(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                       Image.fromarray(texture).resize((width, height), Image.Resampling.BILINEAR), 0.3)
    draw = ImageDraw.Draw(base)
    for _ in range(60):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(width // 40, width // 6, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            draw.rectangle((x, y, x + w, y + h), outline=colour, width=int(rng.integers(1, 8)))
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_pixels(width, height, seed)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def image_set() -> list[bytes]:
    return [photo_jpeg(w, h, SEED + i) for i, (w, h) in enumerate(IMAGE_SIZES)]


def video_mp4(seconds: int, seed: int, size: tuple[int, int] = VIDEO_SIZE, fps: int = VIDEO_NATIVE_FPS) -> bytes:
    """H.264 MP4 (CABAC, B-frames: x264 superfast): a camera pan over a photo, a box moving across.

    Frames are cut straight from a YCbCr 4:2:0 texture, so making a minute of video costs
    the encoder's time only.
    """
    width, height = size
    # The camera pans over a scene twice the frame size, shot at 4x and scaled down (as video
    # usually is): that averages the grain away, which would otherwise set the bitrate.
    scene = Image.fromarray(photo_pixels(width * 4, height * 4, seed)).reduce(2)
    texture = scene.convert("YCbCr")
    luma, cb, cr = (np.asarray(band) for band in texture.split())
    cb, cr = cb[::2, ::2], cr[::2, ::2]  # 4:2:0
    box = height // 4
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "superfast", "crf": "23"}
        stream.thread_count = 0  # making the input is not what is measured: use every core
        frames = seconds * fps
        for i in range(frames):
            t = i / frames
            x = 2 * int(width / 2 * (0.5 + 0.5 * np.sin(2 * np.pi * t)))  # even: chroma stays aligned
            y = 2 * int(height / 2 * (0.5 + 0.5 * np.cos(3 * np.pi * t)))
            y_plane = luma[y:y + height, x:x + width].copy()
            bx = int((width - box) * t)
            y_plane[height // 3:height // 3 + box, bx:bx + box] = 235
            planes = (y_plane, cb[y // 2:(y + height) // 2, x // 2:(x + width) // 2],
                      cr[y // 2:(y + height) // 2, x // 2:(x + width) // 2])
            yuv = np.concatenate([p.reshape(-1) for p in planes]).reshape(height * 3 // 2, width)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")))
        container.mux(stream.encode())
    return buffer.getvalue()


WORDS = ("the", "a", "photo", "shows", "bright", "red", "blue", "green", "circle", "square", "left",
         "right", "above", "below", "near", "large", "small", "texture", "edge", "shadow", "light",
         "scene", "object", "background", "foreground", "pattern", "colour", "detail", "sky", "wall")


def _messages(placeholders: str, rng: random.Random) -> list[dict]:
    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 160))) + "."
    return [{"role": "system", "content": "You are a helpful assistant.\n/no_think"},
            {"role": "user", "content": f"{placeholders}\nDescribe what you see in detail."},
            {"role": "assistant", "content": f"<think></think>\n{answer.capitalize()}"}]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_media_shard(path: Path, samples: list[tuple[list[bytes], list[bytes]]], seed: int = SEED) -> Path:
    """One webdataset shard: per sample `(images, videos)` -> KEY.json, KEY.imgN.jpg, KEY.vidN.mp4."""
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (images, videos) in enumerate(samples):
            key = f"{path.stem}-{index:06d}"
            placeholders = "\n".join(["<image>"] * len(images) + ["<video>"] * len(videos))
            record = {"messages": _messages(placeholders, rng), "source": path.stem}
            _add_member(tar, f"{key}.json", json.dumps(record).encode())
            for i, data in enumerate(images):
                _add_member(tar, f"{key}.img{i}.jpg", data)
            for i, data in enumerate(videos):
                _add_member(tar, f"{key}.vid{i}.mp4", data)
    return path


@dataclass
class Inputs:
    images: list[bytes]
    shards: dict[str, list[Path]]  # mix -> shard paths
    tokenizer: Tokenizer
    seconds_to_make: float


def make_inputs(root: Path) -> Inputs:
    start = time.perf_counter()
    images = image_set()
    videos = [video_mp4(s, SEED + 100 + i) for i, s in enumerate(VIDEO_SECONDS)]
    multi = [images[i:i + IMAGES_PER_MULTI_SAMPLE] for i in range(0, len(images), IMAGES_PER_MULTI_SAMPLE)]
    embedded = ensure_embedded_data(root / "embedded", {"image": 1, "video": 1, "multi_image": 1,
                                                        "text": TEXT_SAMPLES}, seed=SEED)
    shards = {
        "image": [write_media_shard(root / "image.tar", [([b], []) for b in images])],
        "multi_image": [write_media_shard(root / "multi_image.tar", [(group, []) for group in multi])],
        "video": [write_media_shard(root / "video.tar", [([], [v]) for v in videos])],
        "text": sorted(embedded.shard_dirs["text"].glob("*.tar")),
    }
    return Inputs(images, shards, Tokenizer.load(str(embedded.tokenizer_dir)), time.perf_counter() - start)


def spec() -> SampleSpec:
    return SampleSpec(seq_length=SEQ_LENGTH, tokens_per_tile=TOKENS_PER_TILE,
                      tiling=TilingConfig(tile_size=TILE, max_tiles=MAX_TILES),
                      video_fps=VIDEO_FPS, max_frames=MAX_FRAMES)


# ---- the image paths ----------------------------------------------------------------------

def internvl_grid(width: int, height: int, min_num: int = 1, max_num: int = MAX_TILES,
                  image_size: int = TILE) -> tuple[int, int]:
    """InternVL `dynamic_preprocess`'s target ratio, restated literally (independent of ours)."""
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best, best_diff = ratio, diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def reference_tiles(data: bytes, phases: Phases) -> torch.Tensor:
    """The plain path: `(N, 3, 512, 512)` float32, normalised, tiles row-major then thumbnail."""
    with phases("decode"):
        image = Image.open(io.BytesIO(data)).convert("RGB")
    cols, rows = internvl_grid(*image.size)
    with phases("resize"):
        resized = image.resize((cols * TILE, rows * TILE))  # Pillow's default for RGB: bicubic
    with phases("crop"):
        crops = [resized.crop(((i % cols) * TILE, (i // cols) * TILE, (i % cols + 1) * TILE, (i // cols + 1) * TILE))
                 for i in range(cols * rows)]
    if len(crops) != 1:
        with phases("resize"):
            crops.append(image.resize((TILE, TILE)))
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = []
    with phases("to float + normalise"):
        for crop in crops:
            crop = crop.resize((TILE, TILE), Image.Resampling.BICUBIC)  # T.Resize: a same-size copy
            pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # ToTensor
            scaled = pixels.to(torch.float32).div(255)  # ToTensor's float
            out.append(scaled.clone().sub_(mean).div_(std))  # Normalize(inplace=False) clones first
    with phases("stack"):
        return torch.stack(out)  # load_image's pixel_values


def ours_timing() -> dict:
    return {(tiling_module, "image_to_tensor"): "to tensor", (tiling_module, "resize_pixels"): "resize"}


def ours_tiles(data: bytes, phases: Phases) -> torch.Tensor:
    """What build_sample does per image: decode (same target_pixels), then tile to uint8."""
    with phases("decode"):
        image = decode_image(data, target_pixels=TILE ** 2 * (MAX_TILES + 1))
    with phases("tile layout"):  # minus the to-tensor and resize calls timed inside
        return tile_image(image, TilingConfig(tile_size=TILE, max_tiles=MAX_TILES))


def ours_normalised(data: bytes, phases: Phases) -> torch.Tensor:
    tiles = ours_tiles(data, phases)
    with phases("to float + normalise"):
        return normalize_tiles(tiles, MEAN, STD)


def decode_alone(data: bytes, phases: Phases) -> int:
    with phases("decode"):
        image = Image.open(io.BytesIO(data))
        image.load()
    cols, rows = internvl_grid(*image.size)
    return cols * rows + (cols * rows > 1)


def image_variants() -> dict[str, tuple[Callable, Callable[[], dict]]]:
    """name -> (per-image function returning tiles or a tile count, timing targets)."""
    return {REFERENCE: (reference_tiles, dict), OURS: (ours_tiles, ours_timing),
            OURS_NORMALISED: (ours_normalised, ours_timing), DECODE_ONLY: (decode_alone, dict)}


def run_image_pass(fn: Callable, timing: dict, images: list[bytes]) -> Pass:
    def work(phases: Phases) -> tuple[int, int, int]:
        tiles = 0
        for data in images:
            out = fn(data, phases)
            tiles += out if isinstance(out, int) else out.shape[0]
        return len(images), tiles * TOKENS_PER_TILE, 0
    return timed_pass(work, timing)


def image_fidelity(images: list[bytes]) -> dict:
    """Ours vs the reference on every image: same grids, and how far apart the pixels are."""
    same_grids, diffs = True, []
    for data in images:
        ours = ours_tiles(data, Phases())
        reference = reference_tiles(data, Phases())
        if ours.shape != reference.shape:
            same_grids = False
            continue
        mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        reference_uint8 = ((reference * std + mean) * 255).round().clamp(0, 255)
        diffs.append((ours.to(torch.float32) - reference_uint8).abs().flatten())
    diff = torch.cat(diffs) if diffs else torch.zeros(1)
    return {"same_grids": same_grids, "max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean()),
            "within_1_level": float((diff <= 1).to(torch.float32).mean())}


def image_set_stats(images: list[bytes]) -> dict:
    cfg = TilingConfig(tile_size=TILE, max_tiles=MAX_TILES)
    megapixels = [w * h / 1e6 for w, h in IMAGE_SIZES]
    tiles = [num_tiles(w, h, cfg) for w, h in IMAGE_SIZES]
    bits = [8 * len(data) / (w * h) for data, (w, h) in zip(images, IMAGE_SIZES)]
    return {"count": len(images), "jpeg_quality": JPEG_QUALITY,
            "megapixels": {"min": min(megapixels), "mean": statistics.mean(megapixels), "max": max(megapixels)},
            "tiles_per_image": {"min": min(tiles), "mean": statistics.mean(tiles), "max": max(tiles)},
            "tile_histogram": dict(sorted(Counter(tiles).items())),
            "bits_per_pixel_mean": statistics.mean(bits), "mb_total": sum(map(len, images)) / 1e6}


# ---- the mixes ----------------------------------------------------------------------------

MIX_TIMING = {
    (samples_module, "probe_image"): "probe headers", (samples_module, "probe_video"): "probe headers",
    (samples_module, "decode_image"): "decode", (samples_module, "decode_video_frames"): "decode",
    (samples_module, "tile_image"): "resize + tiling", (samples_module, "frames_to_tiles"): "resize + tiling",
}


def run_mix_pass(shards: list[Path], sample_spec: SampleSpec, tokenizer: Tokenizer) -> Pass:
    def work(phases: Phases) -> tuple[int, int, int]:
        count = visual = text = 0
        for shard in shards:
            raws = iter_shard(str(shard))
            while True:
                with phases("read shard"):
                    raw = next(raws, None)
                if raw is None:
                    break
                with phases("parse + budget + tokenize + rest"):
                    sample = build_sample(raw, shard.stem, sample_spec, tokenizer)
                count += 1
                visual += sample.tiles.shape[0] * TOKENS_PER_TILE
                text += sample.length - sample.tiles.shape[0] * TOKENS_PER_TILE
        return count, visual, text
    return timed_pass(work, MIX_TIMING)


# ---- summaries ----------------------------------------------------------------------------

def summarize(name: str, passes: list[Pass]) -> dict:
    """Medians over rounds; time shares from the summed phases (the rest is 'other')."""
    first = passes[0]
    tokens = first.visual_tokens + first.text_tokens
    cpu_total = sum(p.cpu for p in passes)
    phase_names = sorted({k for p in passes for k in p.phases_cpu})
    shares = {k: sum(p.phases_cpu.get(k, 0.0) for p in passes) / cpu_total for k in phase_names}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {
        "variant": name, "rounds": len(passes), "samples": first.samples,
        "visual_tokens": first.visual_tokens, "text_tokens": first.text_tokens,
        "samples_per_s": statistics.median(p.samples / p.cpu for p in passes),
        "tokens_per_s": statistics.median(tokens / p.cpu for p in passes),
        "visual_tokens_per_s": statistics.median(p.visual_tokens / p.cpu for p in passes),
        "visual_tokens_per_s_wall": statistics.median(p.visual_tokens / p.wall for p in passes),
        "ms_per_sample": statistics.median(1e3 * p.cpu / p.samples for p in passes),
        "cpu_seconds": [p.cpu for p in passes], "wall_seconds": [p.wall for p in passes],
        "shares": shares,
    }


def bench_images(images: list[bytes]) -> list[dict]:
    variants = image_variants()
    names = list(variants)
    passes: dict[str, list[Pass]] = {n: [] for n in names}
    for name in names:  # warm-up: imports, first-call allocations, page cache
        fn, timing = variants[name]
        fn(images[0], Phases())
    for round_index in range(IMAGE_ROUNDS):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            fn, timing = variants[name]
            passes[name].append(run_image_pass(fn, timing(), images))
    results = [summarize(n, passes[n]) for n in names]
    reference = passes[REFERENCE]
    for r in results:  # per-round ratios: each round ran every variant under the same load
        mine = passes[r["variant"]]
        r["vs_reference"] = statistics.median((m.visual_tokens / m.cpu) / (ref.visual_tokens / ref.cpu)
                                              for m, ref in zip(mine, reference))
        # The per-core speed of this shared machine drifts (a busy sibling thread, the host);
        # the ratio does not, so this is each variant where the reference runs as reported.
        r["at_reported_reference"] = r["vs_reference"] * REFERENCE_REPORTED
    return results


def bench_mixes(inputs: Inputs) -> list[dict]:
    sample_spec = spec()
    passes: dict[str, list[Pass]] = {mix: [] for mix in inputs.shards}
    for shards in inputs.shards.values():  # warm-up
        build_sample(next(iter_shard(str(shards[0]))), "warmup", sample_spec, inputs.tokenizer)
    for _ in range(MIX_ROUNDS):
        for mix, shards in inputs.shards.items():
            passes[mix].append(run_mix_pass(shards, sample_spec, inputs.tokenizer))
    return [summarize(mix, p) for mix, p in passes.items()]


def check_targets(image_results: list[dict], fidelity: dict) -> list[dict]:
    """Reported, never asserted: benchmarks compare, the test suite checks correctness."""
    by_name = {r["variant"]: r for r in image_results}
    ours, reference = by_name[OURS], by_name[REFERENCE]
    return [
        {"what": f"ours image path >= {TARGET_TOKENS_PER_S:,} visual tokens/s per core",
         "value": round(ours["visual_tokens_per_s"]), "ok": ours["visual_tokens_per_s"] >= TARGET_TOKENS_PER_S},
        {"what": f"reference ~ {REFERENCE_REPORTED:,} visual tokens/s per core (reported; within 35%)",
         "value": round(reference["visual_tokens_per_s"]),
         "ok": abs(reference["visual_tokens_per_s"] / REFERENCE_REPORTED - 1) <= 0.35},
        {"what": "ours and the reference cut every image into the same tiles",
         "value": fidelity["same_grids"], "ok": fidelity["same_grids"]},
        {"what": "ours within 1 level of the reference on >= 99% of tile pixels",
         "value": round(fidelity["within_1_level"], 5), "ok": fidelity["within_1_level"] >= 0.99},
    ]


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"), "pyav": av.__version__}


def run() -> dict:
    """The whole benchmark as a JSON-able dict (`render` turns it into the table)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: one process, one thread
    try:
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            load_before = machine()
            inputs = make_inputs(Path(tmp))
            image_results = bench_images(inputs.images)
            fidelity = image_fidelity(inputs.images)
            mixes = bench_mixes(inputs)
            load_after = machine()["load_average"]
    finally:
        torch.set_num_threads(threads)
    return {
        "name": NAME,
        "config": {"tile_size": TILE, "max_tiles": MAX_TILES, "tokens_per_tile": TOKENS_PER_TILE,
                   "video_fps": VIDEO_FPS, "max_frames": MAX_FRAMES, "seq_length": SEQ_LENGTH,
                   "image_rounds": IMAGE_ROUNDS, "mix_rounds": MIX_ROUNDS, "seed": SEED,
                   "video_seconds": list(VIDEO_SECONDS), "video_size": list(VIDEO_SIZE),
                   "video_native_fps": VIDEO_NATIVE_FPS, "images_per_multi_sample": IMAGES_PER_MULTI_SAMPLE,
                   "text_samples": TEXT_SAMPLES, "clock": "process CPU time (one thread)"},
        "machine": {**load_before, "load_average_after": load_after},
        "image_set": image_set_stats(inputs.images),
        "seconds_to_make_inputs": inputs.seconds_to_make,
        "image_path": image_results,
        "fidelity": fidelity,
        "mixes": mixes,
        "checks": check_targets(image_results, fidelity),
    }


# ---- rendering ----------------------------------------------------------------------------

def _shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.005)


def render(data: dict) -> str:
    s, m = data["image_set"], data["machine"]
    lines = [
        f"image path: {s['count']} JPEGs q{s['jpeg_quality']}, {s['megapixels']['min']:.1f}-"
        f"{s['megapixels']['max']:.1f} MP, {s['tiles_per_image']['mean']:.1f} tiles/image "
        f"({s['tiles_per_image']['min']}-{s['tiles_per_image']['max']}), "
        f"{s['bits_per_pixel_mean']:.1f} bits/pixel; "
        f"{TILE} px tiles, <= {MAX_TILES} + thumbnail; median of {data['config']['image_rounds']} interleaved rounds",
        f"{'variant':44}  {'vis tok/s/core':>14}  {'(wall)':>8}  {'img/s':>6}  {'ms/img':>6}  "
        f"{'vs ref':>6}  time shares",
    ]
    for r in data["image_path"]:
        lines.append(f"{r['variant']:44}  {r['visual_tokens_per_s']:>14,.0f}  {r['visual_tokens_per_s_wall']:>8,.0f}  "
                     f"{r['samples_per_s']:>6.1f}  {r['ms_per_sample']:>6.1f}  {r['vs_reference']:>5.2f}x  "
                     f"{_shares(r['shares'])}")
    ours = next(r for r in data["image_path"] if r["variant"] == OURS)
    lines.append(f"ours where the reference runs at the reported {REFERENCE_REPORTED:,}/s: "
                 f"{ours['at_reported_reference']:,.0f} visual tokens/s per core")
    f = data["fidelity"]
    lines += [f"ours vs reference: same grids {f['same_grids']}, |diff| max {f['max_abs_diff']} levels, "
              f"mean {f['mean_abs_diff']:.3f}, {f['within_1_level']:.2%} of pixels within 1 level", ""]
    lines.append("mixes end to end through build_sample from tar shards (per core, median of "
                 f"{data['config']['mix_rounds']} rounds):")
    lines.append(f"{'mix':12}  {'samples':>7}  {'samples/s':>9}  {'tokens/s':>9}  {'visual tok/s':>12}  "
                 f"{'(wall)':>8}  {'ms/sample':>9}  time shares")
    for r in data["mixes"]:
        lines.append(f"{r['variant']:12}  {r['samples']:>7}  {r['samples_per_s']:>9.1f}  {r['tokens_per_s']:>9,.0f}  "
                     f"{r['visual_tokens_per_s']:>12,.0f}  {r['visual_tokens_per_s_wall']:>8,.0f}  "
                     f"{r['ms_per_sample']:>9.1f}  {_shares(r['shares'])}")
    lines += [
        f"video: {len(data['config']['video_seconds'])} H.264 clips {data['config']['video_size'][0]}x"
        f"{data['config']['video_size'][1]} @ {data['config']['video_native_fps']} fps, "
        f"{'/'.join(map(str, data['config']['video_seconds']))} s, "
        f"sampled at {VIDEO_FPS:g} fps <= {MAX_FRAMES} frames; "
        f"multi-image: {IMAGES_PER_MULTI_SAMPLE} of the images per sample; text: embedded synthetic code reasoning.",
        "per core = tokens / CPU seconds of this one-thread process; (wall) = per wall second. "
        f"load average {m['load_average'][0]:.2f} before, {m['load_average_after'][0]:.2f} after "
        f"({m['cpu_count']} cores); inputs made in {data['seconds_to_make_inputs']:.1f} s.",
    ]
    lines.extend(f"[{'ok' if c['ok'] else 'MISS'}] {c['what']}: {c['value']}" for c in data["checks"])
    return "\n".join(lines)

