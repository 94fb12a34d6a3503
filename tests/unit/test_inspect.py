"""Inspect renders real shards: counts, masked/supervised spans, media badges and tile PNGs."""

from __future__ import annotations

import html
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import inspect as inspect_tool
from data_pipelines import synth
from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import IGNORE_INDEX
from data_pipelines.training.samples import SampleSpec, build_sample
from data_pipelines.training.shards import iter_shard
from data_pipelines.training.tiling import TilingConfig
from tests.shard_writer import write_shard

SPEC_ARGS = ["--seq-length", "256", "--tile-size", "64", "--max-tiles", "4", "--tokens-per-tile", "4",
             "--max-frames", "8"]
SPEC = SampleSpec(seq_length=256, tokens_per_tile=4, tiling=TilingConfig(tile_size=64, max_tiles=4), max_frames=8)
QUESTION, ANSWER = "What colour is the block?", "It is red."


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """known (a 256x128 red JPEG: 2x1 grid + thumbnail), a bad sample, then a synthetic video and texts."""
    root = tmp_path_factory.mktemp("inspect")
    red = io.BytesIO()
    Image.new("RGB", (256, 128), (220, 20, 20)).save(red, format="JPEG")
    known = {"messages": [{"role": "user", "content": f"<image>\n{QUESTION}"},
                          {"role": "assistant", "content": ANSWER}], "source": "handmade"}
    video = synth.build_sample("video", seed=0, index=2)
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        add(tar, "known.json", json.dumps(known).encode())
        add(tar, "known.img0.jpg", red.getvalue())
        add(tar, "broken.json", b"{oops")
        add(tar, "clip.json", json.dumps({"messages": video.messages, "source": "synth_video"}).encode())
        add(tar, "clip.vid0.mp4", video.videos[0])
        for i in range(6):
            text = synth.build_sample("text", seed=0, index=i)
            add(tar, f"text{i}.json", json.dumps({"messages": text.messages, "source": "synth_text"}).encode())
    return root


def sections(page: str) -> list[str]:
    return re.findall(r"<section>.*?</section>", page, flags=re.DOTALL)


def test_samples_page_counts_spans_and_pngs(shard_dir, synth_data, tokenizer, tmp_path):
    out = tmp_path / "view"
    code = inspect_tool.main([str(shard_dir), "--tokenizer", str(synth_data.tokenizer_dir), "--out", str(out),
                              "--num", "2", *SPEC_ARGS])
    assert code == 0
    page = (out / "index.html").read_text()
    known_html, clip_html = sections(page)
    assert "known" in known_html and "clip" in clip_html
    assert "broken" in page and "malformed_json" in page  # skipped samples are listed

    # Counts of the known sample, from the sample training builds.
    raw = next(iter_shard(str(shard_dir / "shard-000000.tar")))
    sample = build_sample(raw, "x", SPEC, tokenizer)
    media = 3 * 4 + 2  # 2x1 grid + thumbnail at 4 tokens each, plus <img> </img>
    supervised = int((sample.labels != IGNORE_INDEX).sum())
    assert (f'data-total="{sample.length}" data-text="{sample.length - media}" data-media="{media}" '
            f'data-supervised="{supervised}" data-tiles="3"') in known_html
    assert "&lt;image x 12 tokens&gt;" in known_html

    # Supervised: the answer and its closing token; greyed: the question. Together they cover every token.
    sup = "".join(html.unescape(t) for t in re.findall(r'<span class="sup[^"]*">(.*?)</span>', known_html, re.DOTALL))
    masked = "".join(html.unescape(t)
                     for t in re.findall(r'<span class="masked[^"]*">(.*?)</span>', known_html, re.DOTALL))
    expected_sup = tokenizer.hf.decode(sample.input_ids[sample.labels != IGNORE_INDEX].tolist(),
                                       skip_special_tokens=False)
    assert sup == expected_sup and ANSWER in sup and st.IM_END in sup
    assert QUESTION in masked and ANSWER not in masked

    # The image: 2x1 tiles + thumbnail; the video: one contact sheet with the frame timestamps.
    grid = Image.open(out / "media" / "s000_img0.png")
    assert grid.size == (2 * 64 + inspect_tool.GAP + 3 * inspect_tool.GAP + 64, 64)
    assert np.asarray(grid)[32, 32, 0] > 180  # red tile
    assert "2x1 grid + thumbnail, 3 tiles, 12 tokens" in known_html
    sheet = Image.open(out / "media" / "s001_vid0.png")
    sheet.load()
    frames = re.search(r"video 1: (\d+) frames at ([0-9., ]+) s", clip_html)
    assert frames and int(frames.group(1)) == clip_html.count("&lt;frame x 4 tokens&gt;") >= 2
    assert frames.group(2).startswith("0.00, ")


def test_packed_batch_page(shard_dir, synth_data, tmp_path):
    out = tmp_path / "packed"
    code = inspect_tool.main([str(shard_dir), "--tokenizer", str(synth_data.tokenizer_dir), "--out", str(out),
                              "--packed", "--num", "2", "--pack-buffer", "8", *SPEC_ARGS])
    assert code == 0
    page = (out / "index.html").read_text()
    cu = json.loads(re.search(r"cu_seqlens: (\[[0-9, ]+\])", page).group(1))
    assert cu[0] == 0 and cu[-1] == 2 * 256 and cu == sorted(cu)
    summary = re.search(r"2 rows x 256 tokens, (\d+) samples, (\d+) real tokens", page)
    assert summary is not None
    rendered = re.findall(r"<h2>row \d segment \d+: ", page)
    assert len(rendered) == int(summary.group(1))
    # Per-segment counts add up to the batch's real tokens; padding shows as a badge.
    totals = [int(t) for t in re.findall(r'data-total="(\d+)"', page)]
    assert sum(totals) == int(summary.group(2))
    pads = [int(n) for n in re.findall(r"&lt;pad x (\d+) tokens&gt;", page)]
    assert sum(totals) + sum(pads) == 2 * 256
    for png in (out / "media").glob("*.png"):
        Image.open(png).load()
    assert any((out / "media").glob("r*_img0.png")) or any((out / "media").glob("r*_vid0.png"))


def test_bad_arguments_exit_2(shard_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        inspect_tool.main([str(shard_dir), "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert inspect_tool.main([str(tmp_path / "missing"), "--tokenizer", str(tmp_path), "--out", str(tmp_path)]) == 2


def test_packed_batch_decodes_after_packing_and_lists_late_failures(synth_data, tokenizer, tmp_path):
    """--packed plans, packs, then decodes the chosen samples: a JPEG whose header opens but whose
    body is cut is packed, fails at decode, leaves padding and is listed as skipped."""
    noisy = io.BytesIO()
    Image.effect_noise((128, 96), 64).convert("RGB").save(noisy, format="JPEG")
    qa = {"messages": [{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": ANSWER}]}
    samples = [("cut", {"json": json.dumps(qa).encode(), "img0.jpg": noisy.getvalue()[:-1500]})]
    samples += [(f"text{i}", {"json": json.dumps({"messages": synth.build_sample("text", seed=0, index=i).messages})
                              .encode()}) for i in range(3)]
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(root / "shard-000000.tar", samples)
    planned, skipped = inspect_tool.build_samples([str(root / "shard-000000.tar")], SPEC, tokenizer, 4, decode=False)
    assert not skipped and planned[0].raw.key == "cut"  # its header opens: planned like the others
    out = tmp_path / "out"
    assert inspect_tool.main([str(root), "--tokenizer", str(synth_data.tokenizer_dir), "--out", str(out),
                              "--packed", "--num", "1", "--pack-buffer", "4", *SPEC_ARGS]) == 0
    page = (out / "index.html").read_text()
    assert "1 skipped samples" in page and "cut: corrupt_image" in page
    rendered = re.findall(r"<h2>row \d segment \d+: ", page)
    assert rendered and not any("cut" in h for h in re.findall(r"<h2>row \d segment \d+: [^<]*", page))
