"""Decode image and video bytes from shards into RGB pixels.

Bad media must be counted, not fatal: every decoder failure becomes a `MediaDecodeError`
whose `.reason` is the skip-counter key. Truncated files must fail loudly, so Pillow's
`LOAD_TRUNCATED_IMAGES` is never turned on here and every image is fully `.load()`ed.

Videos are decoded with decord (random access by frame index, only the sampled frames are
decoded to RGB); PyAV is the fallback when decord is missing or cannot open a file.

`probe_image` / `probe_video` read what a sample's token count depends on (displayed image
size; sampled frame indices and times) from headers and container indexes without decoding a
pixel, so the loader can pack on exact lengths and decode only the samples it chose.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from data_pipelines.training.tiling import resize_pixels

logger = logging.getLogger(__name__)

WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


class MediaDecodeError(Exception):
    """A media item that cannot be decoded; `.reason` is the skip-counter key.

    Reasons: "corrupt_image", "image_too_large", "corrupt_video", "empty_video".
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def _draft_size(width: int, height: int, target_pixels: int) -> tuple[int, int] | None:
    """Smallest size a JPEG may be decoded at and still serve a `target_pixels` resize.

    Keeps the shorter side at >= sqrt(target_pixels), which both keeps >= target_pixels
    pixels and covers the longer axis of any tile grid whose aspect is near the image's
    (the tiler picks such a grid). Returns None when no 2x reduction would fit.
    """
    shorter = min(width, height)
    needed = math.ceil(math.sqrt(target_pixels))
    if needed * 2 > shorter:  # JPEG can only reduce by 2, 4 or 8
        return None
    scale = needed / shorter
    return math.ceil(width * scale), math.ceil(height * scale)


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Pillow's ways of saying "bad image" -> MediaDecodeError with the skip reason."""
    try:
        yield
    except Image.DecompressionBombError as err:
        raise MediaDecodeError("image_too_large", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Pillow reports bad data as OSError (incl. UnidentifiedImageError), SyntaxError
        # (some plugin parsers), ValueError or EOFError depending on the format.
        raise MediaDecodeError("corrupt_image", str(err)) from err


def _open_image(data: bytes, target_pixels: int | None) -> Image.Image:
    """Open and fully decode, at reduced JPEG scale when the target is much smaller."""
    with _pillow_errors():
        image = Image.open(io.BytesIO(data))
        if target_pixels is not None and image.format == "JPEG":
            size = _draft_size(image.width, image.height, target_pixels)
            if size is not None:
                image.draft(image.mode, size)  # decoder-side 1/2, 1/4 or 1/8 scaling
        image.load()  # forces the whole decode: truncated data raises here, not later
    return image


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; a broken EXIF block is ignored."""
    try:
        # In place: the copying form duplicates every unrotated image (~1 ms per 2 MP).
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as err:
        logger.debug("ignoring unreadable EXIF orientation: %s", err)
    return image


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit by scaling 0..65535 onto 0..255 (clipping would saturate)."""
    values = np.asarray(image).astype(np.uint32)  # (H, W)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")


def _int32_to_l(image: Image.Image) -> Image.Image:
    """Mode "I" (32-bit int) -> 8-bit.

    Pillow uses "I" for 16-bit sources in several formats (TIFF, older PNG readers), so
    values inside 0..65535 are scaled as 16-bit; anything outside that range is stretched
    min..max, since there is no declared range to honour.
    """
    values = np.asarray(image).astype(np.int64)  # (H, W)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")
    return _stretch_to_l(values.astype(np.float64))


def _float_to_l(image: Image.Image) -> Image.Image:
    """Mode "F" -> 8-bit: values in [0, 1] are intensities; other ranges are stretched."""
    values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.min() >= 0.0 and values.max() <= 1.0:
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), mode="L")
    return _stretch_to_l(values)


def _stretch_to_l(values: np.ndarray) -> Image.Image:
    low, high = float(values.min()), float(values.max())
    span = high - low if high > low else 1.0
    return Image.fromarray(np.rint((values - low) * (255.0 / span)).astype(np.uint8), mode="L")


def _has_transparency(image: Image.Image) -> bool:
    # P, L and RGB images carry transparency as a palette index / colour key in `info`.
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white: transparent regions become white, not black."""
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, without the silent mistakes of a bare `.convert("RGB")`.

    `.convert` would paint transparent pixels black and clip 16-bit values at 255 (a mostly
    white image); those cases get explicit handling here.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    elif image.mode == "I":
        image = _int32_to_l(image)
    elif image.mode == "F":
        image = _float_to_l(image)
    elif _has_transparency(image):
        return _composite_on_white(image)
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except ValueError as err:  # e.g. LAB, which Pillow cannot convert without a profile
        raise MediaDecodeError("corrupt_image", f"cannot convert mode {image.mode} to RGB") from err


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or unreadable: what `exif_transpose` uses."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return 1


def probe_image(data: bytes) -> tuple[int, int]:
    """(width, height) as `decode_image` would show the image (EXIF rotation applied), read from
    the header alone: no pixel is decoded. Raises MediaDecodeError as `decode_image` does for
    data it cannot even open; a body that is corrupt past the header fails only at decode.
    """
    with _pillow_errors():
        image = Image.open(io.BytesIO(data))  # lazy: parses the header, checks decompression bombs
        width, height = image.size
        orientation = _exif_orientation(image)
        frames = getattr(image, "n_frames", 1)
    if frames > 1:  # one image stands for one moment: an animation would train on its first frame unannounced
        raise MediaDecodeError("animated_image", f"{image.format} with {frames} frames: store it as a video "
                                                 "(<video>, .mp4) or as its first frame")
    if width < 1 or height < 1:
        raise MediaDecodeError("corrupt_image", f"empty image {width}x{height}")
    # Orientations 5..8 transpose the axes (90 or 270 degree turns, with or without a flip).
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_image(data: bytes, target_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, EXIF orientation applied.

    `target_pixels`: pixel count of the largest resize the caller will make (for tiling,
    `tile_size**2 * max_tiles`). Large JPEGs are then decoded at 1/2, 1/4 or 1/8 scale in
    the decoder, never below that need (see `_draft_size`); other formats decode fully.
    Raises MediaDecodeError("corrupt_image") on truncated or unreadable data.
    """
    if target_pixels is not None and target_pixels < 1:
        raise ValueError(f"target_pixels must be positive or None, got {target_pixels}")
    image = _open_image(data, target_pixels)
    image = _apply_exif_orientation(image)
    return to_rgb(image)


# --------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------


@dataclass
class VideoFrames:
    frames: np.ndarray  # (T, H, W, 3) uint8
    timestamps: list[float]  # seconds of each returned frame from the stream start
    native_fps: float
    num_source_frames: int


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _uniform_indices(num_frames: int, count: int) -> list[int]:
    """`count` indices spread evenly from the first to the last frame, both included."""
    if count == 1:
        return [0]
    step = (num_frames - 1) / (count - 1)
    return [_round_half_up(i * step) for i in range(count)]


def sample_frame_indices(
    num_frames: int, native_fps: float, target_fps: float = 2.0, max_frames: int = 128
) -> list[int]:
    """Frame indices to decode: `target_fps` over the clip, or `max_frames` uniform if longer.

    Rule (deterministic, ascending, no duplicates):
    1. The clip lasts `num_frames / native_fps` seconds. Sample times are t_k = k / target_fps
       for k = 0, 1, ... while t_k < duration; frame of t_k = round_half_up(t_k * native_fps),
       clipped to the last frame; repeats (target_fps above native_fps) are dropped.
    2. If step 1 gives more than `max_frames` times, return instead `max_frames` indices
       round_half_up(i * (num_frames - 1) / (max_frames - 1)), i = 0..max_frames-1: uniform
       over the whole clip, first and last frame included.
    3. `native_fps` unknown (<= 0 or not finite): step 2 with min(num_frames, max_frames).
    A clip of 0 frames gives [], of 1 frame gives [0].
    """
    if target_fps <= 0 or max_frames < 1:
        raise ValueError(f"need target_fps > 0 and max_frames >= 1, got {target_fps}, {max_frames}")
    if num_frames <= 0:
        return []
    if not (math.isfinite(native_fps) and native_fps > 0):
        return _uniform_indices(num_frames, min(num_frames, max_frames))

    # Number of k with k / target_fps < num_frames / native_fps, i.e. k < num_frames * ratio.
    limit = num_frames * target_fps / native_fps
    num_times = max(1, math.ceil(limit - 1e-9))
    if num_times > max_frames:
        return _uniform_indices(num_frames, max_frames)

    indices: list[int] = []
    for k in range(num_times):
        index = min(_round_half_up(k * native_fps / target_fps), num_frames - 1)
        if not indices or index != indices[-1]:
            indices.append(index)
    return indices


def _round_ts(seconds: float) -> float:
    # decord reports float32 seconds (about 0.25 ms resolution at one hour); rounding both
    # backends to whole milliseconds makes them agree and is finer than any frame interval.
    return round(float(seconds), 3)


@dataclass(frozen=True)
class VideoProbe:
    """What a video will give before any frame is decoded: the sampled frames and their times."""

    indices: tuple[int, ...]  # source frame indices (`sample_frame_indices`), ascending
    timestamps: tuple[float, ...]  # seconds of each from the stream start
    native_fps: float
    num_source_frames: int
    backend: str  # "decord" or "pyav": the decoder whose frame numbering `indices` use
    rotation: int = 0  # clockwise degrees the container's display matrix asks for (0, 90, 180, 270)


def video_rotation(data: bytes) -> int:
    """Clockwise degrees (0, 90, 180, 270) a player turns this video by: its display matrix (phone
    videos shot upright are stored sideways with one). decord applies it to the frames it returns;
    PyAV does not, so its paths turn their frames by this, and both backends agree (as
    `decode_image` applies EXIF)."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                return 0
            frame = next(container.decode(container.streams.video[0]), None)
            # PyAV reports FFmpeg's av_display_rotation_get: counterclockwise degrees.
            counterclockwise = getattr(frame, "rotation", 0) if frame is not None else 0
    except (av.error.FFmpegError, OSError, ValueError, StopIteration):
        return 0  # unreadable files fail in the decoders, with their own reasons
    return int(round(-counterclockwise / 90.0)) % 4 * 90


def _rotated(frames: np.ndarray, clockwise: int) -> np.ndarray:
    """(T, H, W, 3) frames turned clockwise by 0/90/180/270 degrees."""
    return np.ascontiguousarray(np.rot90(frames, k=-(clockwise // 90), axes=(1, 2))) if clockwise else frames


def _decord_reader(data: bytes, threads: int):
    import decord  # imported here: optional, absent on some platforms

    return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=threads)


def _probe_decord(reader, target_fps: float, max_frames: int) -> VideoProbe:
    """Sampled frames from decord's index (container metadata; nothing decoded)."""
    num_frames = len(reader)
    if num_frames == 0:
        raise MediaDecodeError("empty_video", "decord found no frames")
    native_fps = float(reader.get_avg_fps())
    indices = sample_frame_indices(num_frames, native_fps, target_fps, max_frames)
    try:
        starts = reader.get_frame_timestamp(indices)[:, 0]  # real pts: handles variable rate
        timestamps = tuple(_round_ts(t) for t in starts)
    except Exception:  # noqa: BLE001 - very old decord builds lack timestamps
        timestamps = tuple(_round_ts(i / native_fps) for i in indices)
    return VideoProbe(tuple(indices), timestamps, native_fps, num_frames, "decord")


def _frames_decord(reader, indices: Sequence[int]) -> np.ndarray:
    """Random-access decode of only these frames (decord seeks to key frames itself)."""
    return reader.get_batch(list(indices)).asnumpy()  # (T, H, W, 3) uint8


@dataclass
class _PacketIndex:
    """Where a stream's frames are, read from packets without decoding them."""

    frame_pts: list[int]  # sorted: index i is the i-th frame in presentation order
    keyframe_pts: list[int]  # sorted
    keyframe_dts: list[int]  # decode timestamp of the key frame at the same position


def _index_packets(container, stream) -> _PacketIndex:
    frame_pts, keyframes = [], []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:  # the flush packet at EOF has neither
            continue
        frame_pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append((packet.pts, packet.dts if packet.dts is not None else packet.pts))
    keyframes.sort()
    return _PacketIndex(
        sorted(frame_pts), [pts for pts, _ in keyframes], [dts for _, dts in keyframes]
    )


def _stream_fps(stream, index: _PacketIndex) -> float:
    """Average frame rate as decord reports it (avg_frame_rate), else measured from pts."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    pts = index.frame_pts
    if len(pts) > 1 and stream.time_base:
        span = float((pts[-1] - pts[0]) * stream.time_base)
        if span > 0:
            return (len(pts) - 1) / span
    return 0.0


def _seek(container, stream, dts: int | None):
    """Restart demuxing at the key frame at or before `dts` (None: the stream start)."""
    if dts is None:
        container.seek(0, backward=True)
    else:
        # Seek by the key frame's dts, not its pts: demuxers index by dts (mp4), and dts <= pts,
        # so we land on that key frame or an earlier one, never past it.
        container.seek(dts, stream=stream, backward=True)
    return container.decode(stream)


def _advance(frames, target: int):
    """Decode until a frame with pts >= target; returns (frame or None, first pts seen)."""
    first = None
    for frame in frames:
        if frame.pts is None:
            continue
        if first is None:
            first = frame.pts
        if frame.pts >= target:
            return frame, first
    return None, first


def _decode_at_pts(
    container, stream, wanted_pts: list[int], index: _PacketIndex
) -> list[np.ndarray]:
    """Decode forward through the stream, converting only frames at `wanted_pts` to RGB.

    Before each wanted frame, jump to the last key frame at or before it when that key frame
    lies ahead of the decoder's position; otherwise keep decoding forward. So a sparse sample
    of a long clip decodes about one GOP per frame instead of the whole clip. If a seek ever
    lands after the wanted frame (a demuxer with coarse seeking), decode from the start and
    stop seeking rather than return a wrong frame.
    """
    images: list[np.ndarray] = []
    frames, position, may_seek = None, -math.inf, True
    for target in wanted_pts:
        k = bisect.bisect_right(index.keyframe_pts, target) - 1
        sought = False
        if frames is None or (may_seek and k >= 0 and index.keyframe_pts[k] > position):
            dts = index.keyframe_dts[k] if (may_seek and k >= 0) else None
            frames = _seek(container, stream, dts)
            sought = True
        frame, first = _advance(frames, target)
        if sought and first is not None and first > target:
            frames, may_seek = _seek(container, stream, None), False
            frame, _ = _advance(frames, target)
        if frame is None:
            raise MediaDecodeError("corrupt_video", f"stream ended before pts {target}")
        position = frame.pts
        images.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3)
    return images


@contextmanager
def _pyav_stream(data: bytes, threads: int) -> Iterator[tuple]:
    """(container, first video stream, its packet index); any PyAV failure inside the block,
    the caller's decoding included, becomes MediaDecodeError("corrupt_video")."""
    import av

    if len(data) == 0:
        raise MediaDecodeError("empty_video", "zero bytes")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:  # a readable container, but nothing to show
                raise MediaDecodeError("empty_video", "no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            if threads != 1:
                stream.codec_context.thread_type = "AUTO"
            index = _index_packets(container, stream)
            if not index.frame_pts:
                raise MediaDecodeError("empty_video", "no video packets")
            yield container, stream, index
    except MediaDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError, RuntimeError) as err:
        raise MediaDecodeError("corrupt_video", f"{type(err).__name__}: {err}") from err


def _probe_pyav(stream, index: _PacketIndex, target_fps: float, max_frames: int) -> VideoProbe:
    """Sampled frames from the packet index. Frame indices count frames in presentation order
    (as decord does); timestamps are (pts - stream start) * time_base."""
    num_frames = len(index.frame_pts)
    native_fps = _stream_fps(stream, index)
    indices = sample_frame_indices(num_frames, native_fps, target_fps, max_frames)
    start = stream.start_time if stream.start_time is not None else index.frame_pts[0]
    timestamps = tuple(_round_ts((index.frame_pts[i] - start) * stream.time_base) for i in indices)
    return VideoProbe(tuple(indices), timestamps, native_fps, num_frames, "pyav")


def _frames_pyav(container, stream, index: _PacketIndex, indices: Sequence[int]) -> np.ndarray:
    images = _decode_at_pts(container, stream, [index.frame_pts[i] for i in indices], index)
    return np.stack(images)  # (T, H, W, 3) uint8


def decode_video_pyav(
    data: bytes, target_fps: float = 2.0, max_frames: int = 128, threads: int = 1
) -> VideoFrames:
    """PyAV fallback with the same sampling and timestamps as the decord path; same errors as
    `decode_video`."""
    with _pyav_stream(data, threads) as (container, stream, index):
        probe = _probe_pyav(stream, index, target_fps, max_frames)
        frames = _frames_pyav(container, stream, index, probe.indices)
    return VideoFrames(_rotated(frames, video_rotation(data)), list(probe.timestamps), probe.native_fps,
                       probe.num_source_frames)


def _with_fallback(data: bytes, with_decord, with_pyav):
    """`with_decord(data)`, or `with_pyav(data)` when decord is missing or fails on this file
    (a MediaDecodeError from decord is final: the file itself is empty)."""
    if len(data) == 0:
        raise MediaDecodeError("empty_video", "zero bytes")
    try:
        return with_decord(data)
    except MediaDecodeError:
        raise
    except ImportError:
        logger.debug("decord not importable; using PyAV")
    except Exception as err:  # noqa: BLE001 - decord raises assorted RuntimeError subclasses
        logger.debug("decord failed (%s); retrying with PyAV", err)
    return with_pyav(data)


def decode_video(
    data: bytes, target_fps: float = 2.0, max_frames: int = 128, threads: int = 1
) -> VideoFrames:
    """Encoded video bytes -> sampled RGB frames (`sample_frame_indices` rule) + timestamps.

    decord first; PyAV when decord is not installed or fails on this file. `threads` is per
    reader and defaults to 1 because data-loader workers already run in parallel.
    Raises MediaDecodeError("empty_video") for no bytes, no video stream or no frames, and
    "corrupt_video" when neither backend can decode the data.
    """
    def with_decord(data: bytes) -> VideoFrames:
        reader = _decord_reader(data, threads)  # one open serves the probe and the decode
        probe = _probe_decord(reader, target_fps, max_frames)
        frames = _frames_decord(reader, probe.indices)  # decord applies the display matrix itself
        return VideoFrames(frames, list(probe.timestamps), probe.native_fps, probe.num_source_frames)

    return _with_fallback(data, with_decord, lambda d: decode_video_pyav(d, target_fps, max_frames, threads))


def probe_video(data: bytes, target_fps: float = 2.0, max_frames: int = 128) -> VideoProbe:
    """The frames `decode_video` would return (indices, timestamps), from the container index
    alone: no frame is decoded. Same errors as `decode_video` for files it cannot open."""
    def with_pyav(data: bytes) -> VideoProbe:
        with _pyav_stream(data, 1) as (_, stream, index):
            return _probe_pyav(stream, index, target_fps, max_frames)

    probe = _with_fallback(data, lambda d: _probe_decord(_decord_reader(d, 1), target_fps, max_frames), with_pyav)
    return dataclasses.replace(probe, rotation=video_rotation(data))


def decode_video_frames(data: bytes, probe: VideoProbe, indices: Sequence[int], threads: int = 1) -> np.ndarray:
    """`(len(indices), H, W, 3)` uint8: the frames at `indices` (source frame numbers, as in
    `probe.indices`) of the video `probe` was taken from.

    Uses the probe's backend; a decord failure retries with PyAV, whose frame numbering is the
    same. A file that no longer has the probed frame count raises MediaDecodeError("corrupt_video")
    rather than return other frames than the ones the tokens were planned for.
    """
    def check(num_frames: int) -> None:
        if num_frames != probe.num_source_frames:
            raise MediaDecodeError("corrupt_video", f"{num_frames} frames, planned from {probe.num_source_frames}")

    def with_decord(data: bytes) -> np.ndarray:
        reader = _decord_reader(data, threads)
        check(len(reader))
        return _frames_decord(reader, indices)

    def with_pyav(data: bytes) -> np.ndarray:
        with _pyav_stream(data, threads) as (container, stream, index):
            check(len(index.frame_pts))
            return _rotated(_frames_pyav(container, stream, index, indices), probe.rotation)

    frames = with_pyav(data) if probe.backend == "pyav" else _with_fallback(data, with_decord, with_pyav)
    if frames.shape[0] != len(indices):
        raise MediaDecodeError("corrupt_video", f"decoded {frames.shape[0]} of {len(indices)} frames")
    return frames


def frames_to_tiles(
    frames: np.ndarray, tile_size: int, resample: str = "bicubic", backend: str = "torch"
) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 frames -> `(T, 3, tile, tile)` uint8: each frame is one tile.

    The frame is squashed to the square tile (no crop, no padding), as the Nemotron VL
    video path does, so nothing at the frame edges is lost. All frames go through one
    resize call (`tiling.resize_pixels`; `backend` as `TilingConfig.resize_backend`).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) view
    tiles = resize_pixels(pixels, (tile_size, tile_size), resample, backend)
    return tiles.contiguous()  # (T, 3, t, t); torch keeps channels-last strides for T > 1
