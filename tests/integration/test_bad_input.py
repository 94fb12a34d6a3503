"""Every kind of bad sample in a real shard: a stage trains to the end, each bad sample is counted
once under its reason, and no good sample is skipped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.synth import ensure_embedded_data
from data_pipelines.training.shards import expand_shard_paths, iter_shard
from tests.integration.helpers import run_module
from tests.shard_writer import write_shard
from train.checkpoint.store import read_rank_states

QA = [{"role": "user", "content": "<image> What is it?"}, {"role": "assistant", "content": "A shape."}]
VQA = [{"role": "user", "content": "<video> Where does it go?"}, {"role": "assistant", "content": "Left."}]


def _jpeg(noisy: bool = False) -> bytes:
    buf = io.BytesIO()
    image = Image.effect_noise((96, 64), 64).convert("RGB") if noisy else Image.new("RGB", (96, 64), (10, 200, 30))
    image.save(buf, format="JPEG")
    return buf.getvalue()


def bad_samples() -> list[tuple[str, dict[str, bytes], str]]:
    """(key, members, expected reason)."""
    doc = lambda messages: json.dumps({"messages": messages, "source": "bad"}).encode()  # noqa: E731
    return [
        ("truncated", {"json": doc(QA), "img0.jpg": _jpeg()[:300]}, "corrupt_image"),
        # Header intact, body cut: planned and packed, fails at decode (a hole in its row).
        ("cutbody", {"json": doc(QA), "img0.jpg": _jpeg(noisy=True)[:-1500]}, "corrupt_image"),
        ("garbageimg", {"json": doc(QA), "img0.jpg": b"\x00not an image" * 20}, "corrupt_image"),
        ("emptyvid", {"json": doc(VQA), "vid0.mp4": b""}, "empty_video"),
        ("garbagevid", {"json": doc(VQA), "vid0.mp4": b"\x01\x02garbage" * 50}, "corrupt_video"),
        ("gapmember", {"json": doc(QA), "img1.jpg": _jpeg()}, "missing_member"),
        ("nojson", {"img0.jpg": _jpeg()}, "missing_json"),
        ("badjson", {"json": b"{not json"}, "malformed_json"),
        ("badrole", {"json": doc([{"role": "robot", "content": "x"}, QA[1]])}, "bad_role"),
        ("emptyconv", {"json": doc([])}, "empty_conversation"),
        ("mismatch", {"json": doc([{"role": "user", "content": "<image><image> Same?"}, QA[1]]),
                      "img0.jpg": _jpeg()}, "placeholder_mismatch"),
    ]


def test_stage_trains_through_every_kind_of_bad_sample(tmp_path):
    synth = ensure_embedded_data(tmp_path / "runs" / "synth_data")  # the smoke tokenizer and good samples
    good = [(raw.key, raw.members) for shard in expand_shard_paths(str(synth.shard_dirs["image"]))
            for raw in iter_shard(shard)][:40]
    bad = bad_samples()
    shard_dir = tmp_path / "mixed"
    shard_dir.mkdir()
    # One shard, bad samples first: the run's first draws meet each exactly once, and it stops
    # long before a second pass over the shard.
    write_shard(shard_dir / "shard-000000.tar", [(k, m) for k, m, _ in bad] + good)
    run_dir = tmp_path / "run"
    result = run_module(["train", "--config-name", "stage1_image_sft", "smoke=cpu", "trainer.max_steps=3",
                         "data.pack_buffer=4", f"data.sources=[{{name:mixed,path:{shard_dir},weight:1.0}}]",
                         f"run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["steps"] == 3
    assert summary["skipped"] == expected
    assert summary["skipped_by_source"] == {f"mixed/{r}": n for r, n in expected.items()}
    assert summary["epochs"] < 1.0
    drawn = round(summary["epochs"] * (len(bad) + len(good)))
    # Every draw past the bad ones was a good sample, and was used or is still in the packer's buffer.
    buffered = len(read_rank_states(Path(summary["checkpoint"]))[0]["data"]["buffer"])
    assert summary["samples_by_source"]["mixed"] + buffered == drawn - len(bad)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped"] == expected
    assert last["samples_by_source"] == summary["samples_by_source"] and last["tokens_by_source"]["mixed"] > 0


def test_unusable_held_out_sources_stop_the_run_before_its_first_step(tmp_path, synth_data, tokenizer):
    """A held-out source is read when the stage starts, not at the first evaluation: a directory of
    corrupt tars is a one-line data error before any step is trained (a missing one, below, the same
    error from the same builder)."""
    from data_pipelines.training.config import SourceConfig
    from data_pipelines.training.loader import sample_spec
    from data_pipelines.training.shards import DataError
    from data_pipelines.training.validation import build_validation_set
    from train.config.compose import load_config

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "shard-000000.tar").write_bytes(b"\x00not a tar" * 100)
    run_dir = tmp_path / "runs" / "corrupt"
    # The session's embedded data is read, never regenerated (synth_dir=null): other tests share it.
    result = run_module(["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=2",
                         "data.synth_dir=null", f"data.tokenizer={synth_data.tokenizer_dir}",
                         f"data.sources=[{{name:text,path:{synth_data.shard_dirs['text']},weight:1.0}}]",
                         f"data.val_sources=[{{name:held,path:{corrupt}}}]", "data.monitor_sources=[]",
                         f"run.dir={run_dir}"], tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("data error: held-out source 'held'") and "no usable sample (corrupt_shard 1)" in last
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()

    cfg = load_config("stage3_text_recovery", ["smoke=cpu"])  # composes only: nothing is generated
    spec = sample_spec(cfg.data, cfg.model.tokens_per_tile, cfg.seed)
    with pytest.raises(DataError, match=r"held-out source 'gone': shard path .*missing.* does not exist"):
        build_validation_set(SourceConfig("gone", str(tmp_path / "missing")), spec, tokenizer, 8)
