"""Bad data never hangs, crashes without a cause or vanishes uncounted (real tar files throughout)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil

import pytest

from data_pipelines import lint
from data_pipelines.training.config import ConfigError, DataConfig, SourceConfig
from data_pipelines.training.loader import PackedBatchStream
from data_pipelines.training.samples import SampleSpec, build_sample
from data_pipelines.training.shards import DataError, RawSample, ShardError, expand_shard_paths
from data_pipelines.training.tiling import TilingConfig
from tests.batches import assert_same_batches
from tests.shard_writer import write_shard


def spec(seq_length=512) -> SampleSpec:
    return SampleSpec(seq_length=seq_length, tokens_per_tile=4, tiling=TilingConfig(tile_size=64, max_tiles=4),
                      video_fps=2.0, max_frames=8)


def doc(question="Say hi.", answer="Hi.") -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]}).encode()


def stream(sources, tokenizer, seq_length=512, pack_buffer=4, **kwargs) -> PackedBatchStream:
    return PackedBatchStream(sources, spec(seq_length), tokenizer, micro_batch_size=1, pack_buffer=pack_buffer, **kwargs)


@pytest.mark.timeout(60)
def test_a_source_with_nothing_usable_stops_with_its_reasons(tmp_path, tokenizer):
    """All malformed, or all too long: an error naming the source and the counts, not a silent loop."""
    (tmp_path / "bad").mkdir()
    write_shard(tmp_path / "bad" / "shard-000000.tar", [(f"b{i}", {"json": b'{"messages": ['}) for i in range(5)])
    with pytest.raises(DataError, match=r"source 'bad'.*last 5 samples.*malformed_json 5"):
        stream([SourceConfig("bad", str(tmp_path / "bad"))], tokenizer).next_batch()
    (tmp_path / "long").mkdir()
    write_shard(tmp_path / "long" / "shard-000000.tar",
                [(f"l{i}", {"json": doc("word " * 400)}) for i in range(6)])
    with pytest.raises(DataError, match=r"source 'long'.*too_long 6.*data.seq_length=64"):
        stream([SourceConfig("long", str(tmp_path / "long"))], tokenizer, seq_length=64).next_batch()


@pytest.mark.timeout(60)
def test_an_unusable_source_in_a_mix_is_named_not_silently_dropped(tmp_path, synth_data, tokenizer):
    (tmp_path / "bad").mkdir()
    write_shard(tmp_path / "bad" / "shard-000000.tar",
                [(f"b{i}", {"json": json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()})
                 for i in range(3)])
    mix = stream([SourceConfig("text", str(synth_data.shard_dirs["text"])), SourceConfig("bad", str(tmp_path / "bad"))],
                 tokenizer)
    with pytest.raises(DataError, match=r"source 'bad'.*bad_role 3"):
        for _ in range(50):
            mix.next_batch()


def corrupt_shards(directory) -> list[str]:
    """Three files named .tar that are not readable tars: random bytes, gzip data, a truncated header."""
    (directory / "garbage.tar").write_bytes(bytes(range(256)) * 8)
    (directory / "gzipped.tar").write_bytes(gzip.compress(b"not a tar inside" * 100))
    good = (directory / "shard-000000.tar").read_bytes()
    (directory / "truncated.tar").write_bytes(good[:300])
    return [str(directory / name) for name in ("garbage.tar", "gzipped.tar", "truncated.tar")]


def test_corrupt_shards_are_named_skipped_and_counted(tmp_path, synth_data, tokenizer, capsys):
    data = tmp_path / "text"
    shutil.copytree(synth_data.shard_dirs["text"], data)
    bad = corrupt_shards(data)
    source = [SourceConfig("text", str(data))]
    good = stream([SourceConfig("text", str(synth_data.shard_dirs["text"]))], tokenizer)
    mixed = stream(source, tokenizer)
    warnings = capsys.readouterr().err
    assert all(path in warnings for path in bad) and "corrupt_shard" in warnings
    # Every good sample is still there: the same batches as the clean directory.
    assert_same_batches([mixed.next_batch() for _ in range(4)], [good.next_batch() for _ in range(4)])
    assert mixed.skipped["corrupt_shard"] == 3 and mixed.skipped_by_source["text/corrupt_shard"] == 3
    with pytest.raises(DataError, match=r"garbage\.tar \(source 'text'\) is not a readable tar shard"):
        stream(source, tokenizer, on_corrupt_shard="error")
    # Lint reports the same files.
    report = lint.lint_shards(expand_shard_paths(str(data)), spec(), progress=False)
    assert sorted(f.shard for f in report.bad if f.reason == "corrupt_shard") == sorted(bad)


def test_compressed_and_remote_shards_are_refused_by_name(tmp_path, synth_data, capsys):
    data = tmp_path / "mixed"
    shutil.copytree(synth_data.shard_dirs["text"], data)
    (data / "extra.tar.gz").write_bytes(gzip.compress((data / "shard-000000.tar").read_bytes()))
    with pytest.raises(ShardError, match=r"compressed shard.*extra\.tar\.gz.*decompress"):
        expand_shard_paths(str(data))
    with pytest.raises(ShardError, match="remote shards are not supported"):
        expand_shard_paths("s3://bucket/shards/shard-{000000..000009}.tar")
    config = DataConfig(sources=[SourceConfig("m", str(data))], tokenizer=str(synth_data.tokenizer_dir))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: .*extra\.tar\.gz"):
        config.validate("data")
    url = DataConfig(sources=[SourceConfig("u", "https://host/shard-000000.tar")], tokenizer=str(synth_data.tokenizer_dir))
    with pytest.raises(ConfigError, match="remote shards are not supported"):
        url.validate("data")
    assert lint.main([str(data), "--no-progress"]) == 2  # lint agrees with training
    assert "extra.tar.gz" in capsys.readouterr().err


def test_a_moved_source_resumes(tmp_path, synth_data, tokenizer):
    """Saved positions name shards relative to their source: the same shards elsewhere resume exactly."""
    before, after = tmp_path / "a" / "text", tmp_path / "b" / "elsewhere"
    shutil.copytree(synth_data.shard_dirs["text"], before)
    first = stream([SourceConfig("text", str(before))], tokenizer, pack_buffer=16)
    [first.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["buffer"] and all(not position[1].startswith("/") for position in state["buffer"])
    rest = [first.next_batch() for _ in range(3)]
    shutil.move(str(before), after)
    moved = stream([SourceConfig("text", str(after))], tokenizer, pack_buffer=16)
    moved.load_state_dict(state)
    assert_same_batches([moved.next_batch() for _ in range(3)], rest)
    # A shard that is really gone (one the saved packer buffer still draws from) is named, with what to do.
    buffered = state["buffer"][0][1]
    (after / buffered).rename(after / "renamed.tar")
    gone = stream([SourceConfig("text", str(after))], tokenizer, pack_buffer=16)
    with pytest.raises(DataError, match=rf"names shard '{buffered}' of source 'text'.*put the shards back"):
        gone.load_state_dict(state)


def test_bom_and_content_parts_load_as_the_converter_accepts_them(tokenizer):
    plain = RawSample("k", "s.tar", 0, {"json": doc("What is 2 + 3?", "5.")})
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "5."}]}]}
    fancy = RawSample("k", "s.tar", 0, {"json": b"\xef\xbb\xbf" + json.dumps(parts).encode()})
    a, b = build_sample(plain, "t", spec(), tokenizer), build_sample(fancy, "t", spec(), tokenizer)
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


@pytest.mark.parametrize(("overrides", "message"), [
    (["smoke=cpuu"], r"smoke='cpuu' is not an option of the smoke group; choose one of: cpu, gpu"),
    (["smoke=cpu", "model.language_model.hidden_size=-64"], r"model.language_model.hidden_size=-64 must be > 0"),
    (["smoke=cpu", "data.seq_length=16"], r"data.seq_length=16 is outside 64..4,194,304"),
    (["smoke=cpu", "data.seq_length=1000000000"], r"data.seq_length=1,000,000,000 is outside"),
])
def test_bad_settings_are_one_line_config_errors(overrides, message):
    from train.config.compose import load_config

    with pytest.raises(ConfigError, match=message):
        load_config("stage1_image_sft", overrides)


def test_init_from_another_model_size_or_a_run_dir(tmp_path, synth_data, tokenizer):
    """A checkpoint of another model size names the tensor, both shapes and the model.* fields to change
    (not its model name, which is no model group here); a run directory stands for its latest checkpoint."""
    import dataclasses

    from train.config.compose import load_config
    from train.hf.conversion import write_native
    import torch

    from train.engines.assembly import assemble
    from train.parallel.distributed import DistInfo
    from train.model.vlm import VisionLanguageModel

    cfg = load_config("stage1_image_sft", ["smoke=cpu", f"data.synth_dir={synth_data.root}"])
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    bigger = dataclasses.replace(cfg.model, name="wider", language_model=dataclasses.replace(
        cfg.model.language_model, hidden_size=96))
    write_native(tmp_path / "wider", bigger, VisionLanguageModel(bigger, image_token_id=10).state_dict())
    cfg.init.from_checkpoint = str(tmp_path / "wider")  # the run dir: its latest step
    with pytest.raises(ConfigError, match=r"another model size \(\S+ is \(96, 128\) in .*step_0000000 but "
                                          r"\(64, 128\) in this model\); its config.yaml describes another model "
                                          r"\(model.language_model.hidden_size=64 here, 96 there\): set those model.\* "
                                          r"fields to its values \(now model=tiny\)$"):
        assemble(cfg, cpu, tokenizer.special_ids, train=False)
    same = VisionLanguageModel(cfg.model, image_token_id=10)
    write_native(tmp_path / "same", cfg.model, same.state_dict())
    cfg.init.from_checkpoint = str(tmp_path / "same")
    stage = assemble(cfg, cpu, tokenizer.special_ids, train=False)
    model, random_parts = stage.model, stage.random_parts
    assert random_parts == [] and all(
        (a == b).all() for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_linked_and_unsafe_members_are_counted_under_their_own_reasons(tmp_path, tokenizer):
    import io
    import tarfile

    from data_pipelines.training.conversation import SampleError
    from data_pipelines.training.shards import iter_shard

    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        good = doc()
        info = tarfile.TarInfo("real.json")
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
        link = tarfile.TarInfo("alias.json")
        link.type, link.linkname = tarfile.SYMTYPE, "real.json"
        tar.addfile(link)
        image_link = tarfile.TarInfo("pic.img0.jpg")
        image_link.type, image_link.linkname = tarfile.LNKTYPE, "real.json"
        tar.addfile(image_link)
    reasons = {}
    for raw in iter_shard(str(path)):
        try:
            build_sample(raw, "t", spec(), tokenizer)
            reasons[raw.key] = None
        except SampleError as err:
            reasons[raw.key] = err.reason
    assert reasons == {"real": None, "alias": "linked_member", "pic": "linked_member"}


def animated(fmt: str = "GIF") -> bytes:
    import io

    from PIL import Image

    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


@pytest.mark.parametrize(("messages", "members", "reason"), [
    ([{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi?"},
      {"role": "assistant", "content": "Yes."}], {}, "assistant_first"),
    ([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "I start."},
      {"role": "user", "content": "Ok."}, {"role": "assistant", "content": "Done."}], {}, "assistant_first"),
    ([{"role": "user", "content": "One?"}, {"role": "assistant", "content": " "},
      {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2."}], {}, "empty_turn"),
    ([{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."}],
     {"img0.webp": "animated"}, "animated_image"),
])
def test_conversations_and_media_that_would_train_wrong_are_skipped_with_a_reason(messages, members, reason,
                                                                                   tokenizer):
    from data_pipelines.training.conversation import SampleError
    from data_pipelines.training.decode import MediaDecodeError

    raw = RawSample("k", "s.tar", 0, {"json": json.dumps({"messages": messages}).encode(),
                                      **{name: animated("WEBP") for name in members}})
    with pytest.raises((SampleError, MediaDecodeError)) as caught:
        build_sample(raw, "t", spec(), tokenizer)
    assert caught.value.reason == reason


def test_the_converter_refuses_animated_images_too(tmp_path):
    from data_pipelines import convert

    (tmp_path / "anim.gif").write_bytes(animated("GIF"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>\nColour?"},
                                             {"role": "assistant", "content": "Red."}], "images": ["anim.gif"]}) + "\n")
    report = convert.convert(convert.ConvertConfig(str(rows), "jsonl", str(tmp_path), "t", 10), tmp_path / "out",
                             progress=False)
    assert report.samples == 0 and report.bad == {"animated_image": 1}


def mp4_with_display_matrix(matrix: tuple[int, ...]) -> bytes:
    """A real H.264 MP4 (left half white, right half black, 64x32) whose track header carries
    `matrix` (the 3x3 display matrix, 16.16 fixed point), as phones write upright videos."""
    import io
    import struct

    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        picture = np.zeros((32, 64, 3), np.uint8)
        picture[:, :32] = 255
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(buffer.getvalue())
    box = data.find(b"tkhd") - 4
    offset = box + (48 if data[box + 8] == 0 else 60)  # the matrix, after the version-0/1 header fields
    data[offset:offset + 36] = struct.pack(">9i", *matrix)
    return bytes(data)


@pytest.mark.parametrize(("matrix", "clockwise"), [
    ((65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30), 0),
    ((0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30), 90),
    ((-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30), 180),
])
def test_videos_are_turned_as_their_display_matrix_says(matrix, clockwise):
    import dataclasses

    from data_pipelines.training.decode import (
        decode_video,
        decode_video_frames,
        decode_video_pyav,
        probe_video,
        video_rotation,
    )

    data = mp4_with_display_matrix(matrix)
    assert video_rotation(data) == clockwise
    frames = decode_video(data, target_fps=4.0).frames  # decord, which turns frames itself
    probe = probe_video(data, target_fps=4.0)
    assert probe.rotation == clockwise
    # Both backends and both paths (decode, plan then decode) give the same upright frames.
    assert (frames == decode_video_frames(data, probe, probe.indices)).all()
    assert (frames == decode_video_pyav(data, target_fps=4.0).frames).all()
    assert (frames == decode_video_frames(data, dataclasses.replace(probe, backend="pyav"), probe.indices)).all()
    first = frames[0].astype(int)
    if clockwise == 90:  # the white left half ends on top
        assert frames.shape[1:3] == (64, 32)
        assert first[:32].mean() > 200 and first[32:].mean() < 50
    elif clockwise == 180:  # white ends on the right
        assert first[:, 32:].mean() > 200 and first[:, :32].mean() < 50
    else:
        assert first[:, :32].mean() > 200 and first[:, 32:].mean() < 50


# A reasoning template that drops earlier answers' thoughts (not prefix-stable on multi-turn chats).
REWRITING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] if loop.last else m['content'].split('</think>')[-1])"
    " + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def multi_turn_shard(path) -> None:
    turns = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "<think>hm</think>A1."},
             {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]
    write_shard(path, [(f"m{i}", {"json": json.dumps({"messages": turns}).encode()}) for i in range(4)]
                + [(f"s{i}", {"json": doc()}) for i in range(4)])


def test_a_chat_template_fallback_is_counted_per_source_and_warned_once(tmp_path, tokenizer, capsys):
    from data_pipelines.training.samples import Tokenizer

    (tmp_path / "chats").mkdir()
    multi_turn_shard(tmp_path / "chats" / "shard-000000.tar")
    hf = type(tokenizer.hf).from_pretrained(tokenizer.path)
    hf.chat_template = REWRITING_TEMPLATE
    rewriting = Tokenizer(hf, tokenizer.path)
    data = stream([SourceConfig("chats", str(tmp_path / "chats"))], rewriting, pack_buffer=8)
    while data.epochs < 1.0:
        data.next_batch()
    assert dict(data.fallbacks_by_source) == {"chats/chat_template_fallback": 4}  # the multi-turn ones only
    assert capsys.readouterr().err.count("chat template is not prefix-stable") == 1
    assert data.state_dict()["fallbacks_by_source"] == {"chats/chat_template_fallback": 4}
    strict = dataclasses.replace(spec(), chat_template="tokenizer")
    from data_pipelines.training.shards import iter_shard

    with pytest.raises(DataError, match="not prefix-stable on this conversation.*data.chat_template=tokenizer"):
        for shard in expand_shard_paths(str(tmp_path / "chats")):
            for raw in iter_shard(shard):
                build_sample(raw, "chats", strict, rewriting)


def test_resize_backend_is_reachable_from_config():
    from train.config.compose import load_config

    cfg = load_config("stage1_image_sft", ["smoke=cpu", "data.resize_backend=pil"])
    assert cfg.data.tiling.resize_backend == "pil"
    with pytest.raises(ConfigError, match="resize_backend"):
        load_config("stage1_image_sft", ["smoke=cpu", "data.resize_backend=opencv"])


def test_reading_videos_without_decord_is_counted_and_warned(synth_data, tokenizer, monkeypatch, capsys):
    """decord is absent (as on aarch64, where it has no wheel): PyAV reads the videos, and says so."""
    import sys

    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    videos = stream([SourceConfig("vid", str(synth_data.shard_dirs["video"]))], tokenizer, pack_buffer=2)
    [videos.next_batch() for _ in range(3)]
    used = videos.samples_by_source["vid"]
    assert used >= 1 and dict(videos.fallbacks_by_source) == {"vid/video_pyav_fallback": used}
    assert capsys.readouterr().err.count("PyAV read them") == 1


@pytest.mark.timeout(60)
def test_one_odd_sample_is_a_counted_skip_never_the_end_of_the_run(tmp_path, tokenizer, capsys, monkeypatch):
    """Valid JSON that is not text (a lone surrogate), JSON nested past the parser's recursion limit,
    and an error nothing foresaw (here the tokenizer raising) each skip their own sample, counted."""
    surrogate = b'{"messages": [{"role": "user", "content": "\\ud800 hi"}, {"role": "assistant", "content": "ok"}]}'
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (tmp_path / "odd").mkdir()
    write_shard(tmp_path / "odd" / "shard-000000.tar",
                [("surrogate", {"json": surrogate}), ("deep", {"json": deep})]
                + [(f"good{i}", {"json": doc(f"Say {i}.", f"{i}.")}) for i in range(6)])
    data = stream([SourceConfig("odd", str(tmp_path / "odd"))], tokenizer)
    batch = data.next_batch()
    assert batch.input_ids.numel() > 0
    assert data.skipped["bad_text"] == 1 and data.skipped["malformed_json"] == 1

    from data_pipelines.training import samples

    encode = samples.Tokenizer.encode
    monkeypatch.setattr(samples.Tokenizer, "encode",
                        lambda self, text: (_ for _ in ()).throw(TypeError("boom")) if "Say 3" in text
                        else encode(self, text))
    with pytest.raises(samples.SampleError) as caught:
        build_sample(RawSample("odd3", "s.tar", 0, {"json": doc("Say 3.", "3.")}), "odd", spec(), tokenizer)
    assert caught.value.reason == "bad_sample"
    assert "warning: sample 'odd3' (source 'odd') skipped as bad_sample: TypeError: boom" in capsys.readouterr().err


def test_unsupported_formats_duplicates_and_disguised_gzip_are_named(tmp_path, tokenizer):
    """A `.gif` image, a sample with two `KEY.json`, and a gzip file named `.tar`: each is skipped or
    refused under a reason that says what it is, never miscounted."""
    import gzip as gzip_module
    import io
    import tarfile

    from data_pipelines.training.conversation import SampleError
    from data_pipelines.training.shards import index_shard, read_indexed_sample, try_index_shard

    image_doc = json.dumps({"messages": [{"role": "user", "content": "<image> What?"},
                                         {"role": "assistant", "content": "A shape."}]}).encode()
    with pytest.raises(SampleError) as caught:
        build_sample(RawSample("g", "s.tar", 0, {"json": image_doc, "img0.gif": animated("GIF")}), "t", spec(), tokenizer)
    assert caught.value.reason == "unsupported_media" and ".gif is not read" in str(caught.value)

    shard = tmp_path / "dup.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.json", doc("One?")), ("a.json", doc("Two?")), ("b.json", doc("Three?"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entries = index_shard(str(shard))
    assert [e.key for e in entries] == ["a", "b"] and entries[0].dropped == (("a.json", "duplicate_member"),)
    with pytest.raises(SampleError) as caught:
        build_sample(read_indexed_sample(str(shard), 0, entries[0]), "t", spec(), tokenizer)
    assert caught.value.reason == "duplicate_member"
    build_sample(read_indexed_sample(str(shard), 1, entries[1]), "t", spec(), tokenizer)  # its neighbour is fine

    disguised = tmp_path / "zipped.tar"
    disguised.write_bytes(gzip_module.compress(shard.read_bytes()))
    assert try_index_shard(str(disguised)).startswith("gzip-compressed data named .tar: decompress it")


def test_a_layout_bigger_than_the_torchrun_job_names_the_world_size(monkeypatch):
    from train.config.compose import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"= 4 ranks per model replica, but this job has WORLD_SIZE=2"):
        load_config("stage3_text_recovery", ["smoke=cpu", "model.impl=mcore", "parallel.tensor_parallel=4"])


def test_a_json_member_over_the_size_limit_is_a_counted_skip_before_parsing(tokenizer):
    from data_pipelines.training.conversation import SampleError

    small = dataclasses.replace(spec(), max_json_bytes=1000)
    build_sample(RawSample("ok", "s.tar", 0, {"json": doc("Hi?", "Yes.")}), "t", small, tokenizer)
    with pytest.raises(SampleError) as caught:
        build_sample(RawSample("big", "s.tar", 0, {"json": doc("word " * 400, "Yes.")}), "t", small, tokenizer)
    assert caught.value.reason == "too_large" and "data.max_json_bytes=1,000" in str(caught.value)


def test_a_shard_rewritten_between_save_and_resume_stops_the_resume(tmp_path, synth_data, tokenizer, capsys):
    source = tmp_path / "text"
    shutil.copytree(synth_data.shard_dirs["text"], source)
    first = stream([SourceConfig("text", str(source))], tokenizer, pack_buffer=8)
    [first.next_batch() for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))
    shards = sorted(source.glob("*.tar"))
    write_shard(shards[0], [(f"new{i}", {"json": doc(f"Other {i}?", "Yes.")}) for i in range(3)])  # same name
    with pytest.raises(DataError, match=rf"source 'text': 1 shard\(s\) changed since the checkpoint: "
                                        rf"{shards[0].name} \(.* bytes, \d+ -> 3 samples\).*accept_changed_shards"):
        stream([SourceConfig("text", str(source))], tokenizer, pack_buffer=8).load_state_dict(state)
    accepting = stream([SourceConfig("text", str(source))], tokenizer, pack_buffer=8, accept_changed_shards=True)
    accepting.load_state_dict(state)
    assert "resuming anyway (data.accept_changed_shards=true)" in capsys.readouterr().err
    assert accepting.next_batch().input_ids.numel() > 0
