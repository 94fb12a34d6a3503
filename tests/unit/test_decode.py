"""Image and video decoding on real files written in the test (PIL, PyAV)."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from data_pipelines.training.decode import (
    MediaDecodeError,
    VideoFrames,
    decode_image,
    decode_video,
    decode_video_frames,
    decode_video_pyav,
    frames_to_tiles,
    probe_image,
    probe_video,
    sample_frame_indices,
)

RED, BLUE, WHITE = (220, 30, 40), (20, 40, 230), (255, 255, 255)


def write_image(path: Path, image: Image.Image, fmt: str, **kwargs) -> bytes:
    image.save(path, fmt, **kwargs)
    return path.read_bytes()


def close(pixel, expected, tol=6) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("fmt,suffix,kwargs", [
    ("JPEG", "jpg", {"quality": 95}),
    ("PNG", "png", {}),
    ("WEBP", "webp", {"quality": 95}),
])
def test_rgb_formats(tmp_path, fmt, suffix, kwargs):
    data = write_image(tmp_path / f"a.{suffix}", Image.new("RGB", (40, 30), RED), fmt, **kwargs)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert close(image.getpixel((20, 15)), RED)


def _half_transparent(mode_size=(40, 20)) -> Image.Image:
    image = Image.new("RGBA", mode_size, (*RED, 255))
    image.paste((0, 0, 0, 0), (20, 0, 40, 20))  # right half: transparent *black*
    return image


@pytest.mark.parametrize("fmt,suffix,kwargs", [
    ("PNG", "png", {}), ("WEBP", "webp", {"lossless": True}),
])
def test_rgba_composited_on_white(tmp_path, fmt, suffix, kwargs):
    data = write_image(tmp_path / f"a.{suffix}", _half_transparent(), fmt, **kwargs)
    image = decode_image(data)
    assert image.mode == "RGB"
    assert close(image.getpixel((5, 10)), RED)
    assert image.getpixel((35, 10)) == WHITE


def test_semi_transparent_blends_with_white(tmp_path):
    data = write_image(tmp_path / "a.png", Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG")
    assert close(decode_image(data).getpixel((0, 0)), (255, 127, 127), tol=2)


def test_la_and_l(tmp_path):
    la = Image.new("LA", (10, 10), (60, 255))
    la.paste((0, 0), (5, 0, 10, 10))
    image = decode_image(write_image(tmp_path / "la.png", la, "PNG"))
    assert image.getpixel((1, 1)) == (60, 60, 60) and image.getpixel((8, 1)) == WHITE
    gray = decode_image(write_image(tmp_path / "l.png", Image.new("L", (10, 10), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((3, 3)) == (77, 77, 77)


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    pal.paste(0, (0, 0, 5, 10))  # index 0 (black) marked transparent
    data = write_image(tmp_path / "p.png", pal, "PNG", transparency=0)
    image = decode_image(data)
    assert image.getpixel((1, 1)) == WHITE
    assert image.getpixel((8, 1)) == BLUE


def test_cmyk_jpeg(tmp_path):
    data = write_image(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    image = decode_image(data)
    assert image.mode == "RGB" and close(image.getpixel((8, 8)), (255, 0, 0), tol=10)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 1000, 128 * 257, 65535]], dtype=np.uint16)
    source = Image.fromarray(levels)
    assert source.mode == "I;16"
    data = write_image(tmp_path / "g16.png", source, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # really 16-bit on disk
    image = decode_image(data)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 4, 128, 255]


def test_int32_and_float_tiff(tmp_path):
    ints = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.int32))
    image = decode_image(write_image(tmp_path / "i.tif", ints, "TIFF"))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    image = decode_image(write_image(tmp_path / "f.tif", floats, "TIFF"))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_bilevel(tmp_path):
    bits = Image.new("1", (8, 8), 0)
    bits.paste(1, (4, 0, 8, 8))
    image = decode_image(write_image(tmp_path / "b.png", bits, "PNG"))
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((7, 0)) == WHITE


def test_exif_orientation_6_rotates(tmp_path):
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(BLUE, (32, 0, 64, 32))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = write_image(tmp_path / "o.jpg", stored, "JPEG", exif=exif, quality=95)
    image = decode_image(data)
    assert image.size == (32, 64)
    assert close(image.getpixel((16, 8)), RED, tol=12)  # stored left is now on top
    assert close(image.getpixel((16, 56)), BLUE, tol=12)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_probe_image_gives_the_decoded_size_from_the_header(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = write_image(tmp_path / "o.jpg", Image.new("RGB", (64, 32), RED), "JPEG", exif=exif)
    assert probe_image(data) == decode_image(data).size == ((32, 64) if orientation >= 5 else (64, 32))


def test_probe_image_reads_only_the_header(tmp_path):
    data = _noisy_jpeg(tmp_path)
    truncated = data[: len(data) // 2]
    assert probe_image(truncated) == (128, 128)  # the body is not read...
    with pytest.raises(MediaDecodeError):
        decode_image(truncated)  # ...so a corrupt body fails only when decoded
    for bad in (b"", b"not an image at all" * 10):
        with pytest.raises(MediaDecodeError) as err:
            probe_image(bad)
        assert err.value.reason == "corrupt_image"


def _noisy_jpeg(tmp_path) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    return write_image(tmp_path / "n.jpg", Image.fromarray(pixels), "JPEG", quality=90)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg_raises(tmp_path, cut):
    data = _noisy_jpeg(tmp_path)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(MediaDecodeError) as err:
        decode_image(data[: int(len(data) * cut)])
    assert err.value.reason == "corrupt_image"


def test_truncated_png_and_garbage_raise(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = write_image(tmp_path / "n.png", Image.fromarray(pixels), "PNG")
    for bad in (png[: len(png) // 2], b"not an image at all" * 10, b""):
        with pytest.raises(MediaDecodeError) as err:
            decode_image(bad)
        assert err.value.reason == "corrupt_image"


def test_jpeg_draft_decodes_at_reduced_scale_but_not_below_need(tmp_path):
    data = write_image(tmp_path / "big.jpg", Image.new("RGB", (4000, 3000), RED), "JPEG")
    assert decode_image(data).size == (4000, 3000)
    reduced = decode_image(data, target_pixels=512 * 512)
    assert reduced.size == (1000, 750)  # 1/4 scale; 1/8 (500x375) would be below 512
    assert min(reduced.size) >= math.sqrt(512 * 512)
    assert decode_image(data, target_pixels=12 * 512 * 512).size == (4000, 3000)  # 1/2 too small
    assert close(reduced.getpixel((500, 300)), RED)
    png = write_image(tmp_path / "big.png", Image.new("RGB", (2000, 1500), RED), "PNG")
    assert decode_image(png, target_pixels=512 * 512).size == (2000, 1500)  # only JPEG drafts


# ------------------------------------------------------------------------------ videos

CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"


def frame_color(i: int) -> tuple[int, int, int]:
    """A colour that identifies frame i (up to 255 frames) after lossy coding."""
    return (i * 8) % 256, (i // 32) * 32, 128


def frame_id(pixel) -> int:
    return int(round(pixel[1] / 32)) * 32 + int(round(pixel[0] / 8)) % 32


def write_mp4(path: Path, num_frames: int, fps: int, size=(32, 32), options=None) -> bytes:
    width, height = size
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[:] = frame_color(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def ids(video: VideoFrames) -> list[int]:
    return [frame_id(frame[4, 4]) for frame in video.frames]


def test_ten_seconds_at_ten_fps_gives_twenty_frames(tmp_path):
    data = write_mp4(tmp_path / "v.mp4", 100, 10, size=(48, 32))
    video = decode_video(data)
    assert video.frames.shape == (20, 32, 48, 3) and video.frames.dtype == np.uint8
    assert video.num_source_frames == 100 and video.native_fps == pytest.approx(10.0)
    assert video.timestamps == pytest.approx([0.5 * k for k in range(20)], abs=1e-3)
    assert ids(video) == list(range(0, 100, 5))


def test_long_clip_falls_back_to_uniform_frames(tmp_path):
    data = write_mp4(tmp_path / "long.mp4", 140, 2)  # 70 s at 2 fps
    video = decode_video(data, target_fps=2.0, max_frames=16)
    expected = [round(i * 139 / 15) for i in range(16)]
    assert len(video.frames) == 16
    assert ids(video) == expected
    assert video.timestamps == pytest.approx([i / 2 for i in expected], abs=1e-3)
    assert video.timestamps[0] == 0.0 and video.timestamps[-1] == pytest.approx(69.5)


def test_one_frame_clip(tmp_path):
    video = decode_video(write_mp4(tmp_path / "one.mp4", 1, 25))
    assert video.frames.shape[0] == 1 and video.timestamps == [0.0]


def test_sample_frame_indices_rule():
    assert sample_frame_indices(300, 30.0) == list(range(0, 300, 15))  # 10 s @ 30 fps
    assert sample_frame_indices(1920, 30.0) == list(range(0, 1920, 15))  # 64 s: exactly 128
    ten_min = sample_frame_indices(18000, 30.0)
    assert len(ten_min) == 128 and ten_min[0] == 0 and ten_min[-1] == 17999
    steps = np.diff(ten_min)
    assert steps.min() >= 141 and steps.max() <= 142  # uniform: 17999 / 127 = 141.7
    assert sample_frame_indices(20, 2.0) == list(range(20))  # 10 s @ 2 fps: every frame
    assert sample_frame_indices(128, 2.0) == list(range(128))  # 64 s @ 2 fps
    ten_min_2fps = sample_frame_indices(1200, 2.0)
    assert len(ten_min_2fps) == 128 and ten_min_2fps[-1] == 1199
    assert sample_frame_indices(1, 30.0) == [0]
    assert sample_frame_indices(0, 30.0) == []
    assert sample_frame_indices(10, 1.0) == list(range(10))  # target above native: no repeats
    assert sample_frame_indices(299, 29.97) == sample_frame_indices(299, 29.97)
    assert sample_frame_indices(50, 0.0, max_frames=8) == [round(i * 49 / 7) for i in range(8)]
    for n, fps in [(7, 3.0), (1000, 23.976), (5, 60.0)]:
        out = sample_frame_indices(n, fps, max_frames=16)
        assert out == sorted(set(out)) and 0 <= out[0] and out[-1] < n and len(out) <= 16


def test_empty_and_garbage_videos(tmp_path):
    with pytest.raises(MediaDecodeError) as err:
        decode_video(b"")
    assert err.value.reason == "empty_video"

    path = tmp_path / "empty.mp4"
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    container.start_encoding()
    container.close()  # a valid mp4 with no frames
    with pytest.raises(MediaDecodeError) as err:
        decode_video(path.read_bytes())
    assert err.value.reason == "empty_video"

    good = write_mp4(tmp_path / "v.mp4", 20, 10)
    for bad in (b"\x00" * 4096, b"garbage" * 100, good[: len(good) // 2]):
        with pytest.raises(MediaDecodeError) as err:
            decode_video(bad)
        assert err.value.reason == "corrupt_video"


@pytest.mark.parametrize("options", [{}, {"g": "12", "bf": "3"}])
def test_pyav_path_matches_decord(tmp_path, options):
    pytest.importorskip("decord")
    # 200 frames at 20 fps, sparse sampling: exercises key-frame seeks and B-frame reorder.
    data = write_mp4(tmp_path / "v.mp4", 200, 20, size=(32, 24), options=options)
    by_decord = decode_video(data, 2.0, 8)  # decord, when importable
    by_pyav = decode_video_pyav(data, 2.0, 8)
    assert by_pyav.num_source_frames == by_decord.num_source_frames == 200
    assert by_pyav.native_fps == pytest.approx(by_decord.native_fps)
    assert by_pyav.timestamps == pytest.approx(by_decord.timestamps, abs=1e-3)
    assert by_pyav.frames.shape == by_decord.frames.shape
    assert np.abs(by_pyav.frames.astype(int) - by_decord.frames).max() <= 2
    assert ids(by_pyav) == [round(i * 199 / 7) for i in range(8)]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_probe_then_decode_some_frames_equals_decode_video(tmp_path, monkeypatch, backend):
    if backend == "pyav":
        monkeypatch.setitem(sys.modules, "decord", None)
    else:
        pytest.importorskip("decord")
    data = write_mp4(tmp_path / "v.mp4", 60, 10, options={"g": "12", "bf": "3"})
    video = decode_video(data, 2.0, 16)
    probe = probe_video(data, 2.0, 16)
    assert probe.backend == backend
    assert list(probe.timestamps) == video.timestamps and probe.num_source_frames == video.num_source_frames
    assert [frame_id(f[4, 4]) for f in decode_video_frames(data, probe, probe.indices)] == ids(video)
    some = probe.indices[1::3]  # a thinned subset: only those frames are decoded
    assert [frame_id(f[4, 4]) for f in decode_video_frames(data, probe, some)] == list(some)


def test_decoding_frames_planned_from_another_file_fails(tmp_path):
    probe = probe_video(write_mp4(tmp_path / "a.mp4", 60, 10), 2.0, 16)
    other = write_mp4(tmp_path / "b.mp4", 30, 10)
    with pytest.raises(MediaDecodeError) as err:
        decode_video_frames(other, probe, probe.indices)
    assert err.value.reason == "corrupt_video"


def test_pyav_fallback_when_decord_missing(tmp_path, monkeypatch):
    data = write_mp4(tmp_path / "v.mp4", 30, 10)
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    video = decode_video(data)
    assert len(video.frames) == 6 and ids(video) == [0, 5, 10, 15, 20, 25]
    assert video.timestamps == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5], abs=1e-3)
    with pytest.raises(MediaDecodeError) as err:
        decode_video(b"garbage" * 100)
    assert err.value.reason == "corrupt_video"


def test_frames_to_tiles():
    frames = np.zeros((5, 24, 40, 3), dtype=np.uint8)
    frames[:] = RED
    tiles = frames_to_tiles(frames, 16)
    assert tiles.shape == (5, 3, 16, 16) and tiles.dtype == torch.uint8
    assert tiles[:, :, 8, 8].tolist() == [list(RED)] * 5
    with pytest.raises(ValueError):
        frames_to_tiles(frames[0], 16)


def test_decompression_bomb_is_a_counted_reason_at_probe_and_decode(tmp_path, monkeypatch):
    data = write_image(tmp_path / "big.png", Image.new("RGB", (64, 64), RED), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: a "bomb"
    for read in (probe_image, decode_image):
        with pytest.raises(MediaDecodeError) as err:
            read(data)
        assert err.value.reason == "image_too_large"
