"""Shard linter on real tar shards: one sample of each bad kind among good synthetic samples."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import lint, synth
from data_pipelines.training.config import SourceConfig
from data_pipelines.training.loader import PackedBatchStream
from data_pipelines.training.samples import SampleSpec
from data_pipelines.training.tiling import TilingConfig
from tests.shard_writer import write_shard

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_ARGS = ["--seq-length", "384", "--tile-size", "64", "--max-tiles", "4", "--tokens-per-tile", "4",
             "--max-frames", "8"]
SPEC = SampleSpec(seq_length=384, tokens_per_tile=4, tiling=TilingConfig(tile_size=64, max_tiles=4), max_frames=8)


def noisy_jpeg(w: int = 96, h: int = 64) -> bytes:
    rng = random.Random(0)
    image = Image.frombytes("RGB", (w, h), bytes(rng.randrange(256) for _ in range(w * h * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def doc(messages, source="handmade") -> bytes:
    return json.dumps({"messages": messages, "source": source}).encode()


def qa(question="<image>\nWhat is this?", answer="A picture."):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# key -> the reason training skips it for (None: a good sample).
EXPECTED = {
    "good_image": None,
    "truncated_jpeg": "corrupt_image",
    "garbage_jpg": "corrupt_image",
    "zero_mp4": "empty_video",
    "garbage_mp4": "corrupt_video",
    "missing_member": "missing_member",
    "malformed_json": "malformed_json",
    "wrong_role": "bad_role",
    "empty_conversation": "empty_conversation",
    "placeholder_mismatch": "placeholder_mismatch",
    "no_json": "missing_json",
    "too_long": "too_long",
    "good_with_stray": None,  # a good sample with an unknown member: warned, not bad
    "good_text": None,  # last, so the loader's first epoch ends on a good sample
}


def write_mixed_shard(path: Path) -> None:
    jpeg = noisy_jpeg()
    members = {
        "good_image": {"json": doc(qa()), "img0.jpg": jpeg},
        "truncated_jpeg": {"json": doc(qa()), "img0.jpg": jpeg[: len(jpeg) // 2]},
        "garbage_jpg": {"json": doc(qa()), "img0.jpg": bytes(random.Random(1).randrange(256) for _ in range(2000))},
        "zero_mp4": {"json": doc(qa("<video>\nWhat moves?")), "vid0.mp4": b""},
        "garbage_mp4": {"json": doc(qa("<video>\nWhat moves?")),
                        "vid0.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(random.Random(2).randrange(256) for _ in range(4000))},
        "missing_member": {"json": doc(qa("<image> and <image>")), "img1.jpg": jpeg},
        "malformed_json": {"json": b'{"messages": [{"role": "user", '},
        "wrong_role": {"json": doc([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}])},
        "empty_conversation": {"json": doc([])},
        "placeholder_mismatch": {"json": doc(qa("<image> vs <image>")), "img0.jpg": jpeg},
        "no_json": {"img0.jpg": jpeg},
        "too_long": {"json": doc(qa("Repeat: " + " ".join(synth.WORDS) * 12, "No."))},
        "good_with_stray": {"json": doc(qa()), "img0.jpg": jpeg, "notes.txt": b"scratch"},
        "good_text": {"json": doc(qa("Say hi.", "Hi."))},
    }
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "../escape.json", doc(qa("hi", "yo")))  # the reader never extracts it
        for key, parts in members.items():
            for suffix, data in parts.items():
                add(tar, f"{key}.{suffix}", data)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """root/{image,video,text}/shard-*.tar (good synthetic samples) + root/mixed/shard-000000.tar."""
    root = tmp_path_factory.mktemp("lint")
    for kind, num in (("image", 3), ("video", 2), ("text", 3)):
        synth.write_synthetic_shards(root / kind, kind, num, seed=3, samples_per_shard=2)
    (root / "mixed").mkdir()
    write_mixed_shard(root / "mixed" / "shard-000000.tar")
    return root


def test_each_bad_sample_reported_once_under_its_reason(shard_set, synth_data, tmp_path, capsys):
    out = tmp_path / "report.json"
    pattern = str(shard_set / "*" / "*.tar")
    code = lint.main([pattern, "--tokenizer", str(synth_data.tokenizer_dir), "--json", str(out), *SPEC_ARGS])
    assert code == 1
    report = json.loads(out.read_text())

    bad_samples = [(f["key"], f["reason"]) for f in report["bad"] if f["index"] >= 0]
    expected = {(k, r) for k, r in EXPECTED.items() if r is not None} | {("../escape", "unsafe_member_name")}
    assert sorted(bad_samples) == sorted(expected)  # each exactly once, no good sample flagged
    assert [f for f in report["bad"] if f["index"] < 0] == []  # every finding is a sample training counts too
    assert [(f["key"], f["reason"]) for f in report["warnings"]] == [("good_with_stray", "unknown_member")]

    assert report["num_shards"] == 2 + 1 + 2 + 1  # image 3/2, video 2/2, text 3/2, mixed
    assert report["num_samples"] == 3 + 2 + 3 + len(EXPECTED) + 1  # + the sample of the unsafe member
    assert report["by_reason"]["corrupt_image"] == 2
    # Per source: the JSON's `source` field; undecodable JSON has none.
    assert report["by_source"]["(unknown)"] == {"malformed_json": 1, "missing_json": 1, "unsafe_member_name": 1}
    assert "synth_image" not in report["by_source"]
    printed = capsys.readouterr().out
    assert "garbage_mp4" in printed and "corrupt_video" in printed and "unknown_member" in printed

    # The CLI with a worker pool finds the same, in the same order.
    parallel_out = tmp_path / "parallel.json"
    result = subprocess.run([sys.executable, "-m", "data_pipelines.lint", pattern, "--tokenizer",
                             str(synth_data.tokenizer_dir), "--json", str(parallel_out), "--workers", "2", *SPEC_ARGS],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    parallel = json.loads(parallel_out.read_text())

    def without_details(r: dict) -> dict:  # details may name object addresses (`<_io.BytesIO at 0x..>`)
        return {**r, **{k: [{**f, "detail": ""} for f in r[k]] for k in ("bad", "warnings")}}

    assert without_details(parallel) == without_details(report)


def test_lint_agrees_with_training_loader(shard_set, synth_data, tokenizer):
    """One epoch of the training loader over the mixed shard skips exactly what lint reports."""
    shard = str(shard_set / "mixed" / "shard-000000.tar")
    report = lint.lint_shards([shard], SPEC, str(synth_data.tokenizer_dir), progress=False)
    stream = PackedBatchStream([SourceConfig("mixed", shard, 1.0)], SPEC, tokenizer, micro_batch_size=1, pack_buffer=1)
    while stream.epochs < 1.0:
        stream.next_batch()
    assert stream.epochs == 1.0
    assert dict(stream.skipped) == report.by_reason()  # the unsafe member's sample included
    assert sum(stream.samples_by_source.values()) == report.num_samples - report.num_bad_samples == 3


def test_without_tokenizer_checks_structure_and_media_only(shard_set):
    report = lint.lint_shards([str(shard_set / "mixed" / "shard-000000.tar")], SPEC, None, progress=False)
    reasons = {f.key: f.reason for f in report.bad if f.index >= 0}
    assert "too_long" not in reasons  # needs a tokenizer
    assert reasons == {**{k: r for k, r in EXPECTED.items() if r not in (None, "too_long")},
                       "../escape": "unsafe_member_name"}


def test_clean_dir_exits_0(shard_set, capsys):
    assert lint.main([str(shard_set / "image"), "--no-progress", *SPEC_ARGS]) == 0
    assert "3 samples: 3 good, 0 bad" in capsys.readouterr().out


def test_usage_errors_exit_2(tmp_path, capsys):
    assert lint.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        lint.main([str(tmp_path), "--workers", "0"])
    assert exit_info.value.code == 2


def test_corrupt_tar_is_reported_not_fatal(tmp_path):
    shard = tmp_path / "broken.tar"
    shard.write_bytes(b"this is not a tar file at all" * 40)
    report = lint.lint_shards([str(shard)], SPEC, None, progress=False)
    assert [f.reason for f in report.bad] == ["corrupt_shard"] and report.num_samples == 0


def test_a_key_in_both_training_and_held_out_shards_is_reported(tmp_path, capsys):
    """Held-out samples that also train make validation loss lie: `--val` reports each one."""
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    text = {"json": doc(qa("Say hi.", "Hi."))}
    write_shard(tmp_path / "train" / "shard-000000.tar", [("a", text), ("b", text), ("c", text)])
    write_shard(tmp_path / "val" / "shard-000000.tar", [("b", text), ("z", text)])
    assert lint.main([str(tmp_path / "train"), "--no-progress"]) == 0
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert lint.main([str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--no-progress",
                      "--json", str(report)]) == 1
    assert "train_val_overlap" in capsys.readouterr().out
    bad = json.loads(report.read_text())["bad"]
    assert [(f["reason"], f["key"], f["index"]) for f in bad] == [("train_val_overlap", "b", 1)]
    assert bad[0]["detail"] == f"also in {tmp_path / 'val' / 'shard-000000.tar'}"
