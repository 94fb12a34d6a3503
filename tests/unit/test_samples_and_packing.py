from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.training import special_tokens as st
from data_pipelines.training.config import SourceConfig
from data_pipelines.training.conversation import IGNORE_INDEX, SampleError
from data_pipelines.training.loader import PackedBatchStream
from data_pipelines.training.packing import Packer, collate_rows
from data_pipelines.training.samples import Sample, SampleSpec, build_sample
from data_pipelines.training.shards import RawSample, expand_shard_paths, iter_shard
from data_pipelines.training.tiling import TilingConfig
from tests.batches import assert_same_batches


def spec(seq_length=2048, max_tiles=4, tile=64, tpt=4) -> SampleSpec:
    return SampleSpec(seq_length=seq_length, tokens_per_tile=tpt,
                      tiling=TilingConfig(tile_size=tile, max_tiles=max_tiles), video_fps=2.0, max_frames=8)


def jpeg(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def raw(messages, **members) -> RawSample:
    sample = RawSample(key="k", shard="s.tar", index=0)
    sample.members["json"] = json.dumps({"messages": messages, "source": "t"}).encode()
    sample.members.update({k.replace("_", "."): v for k, v in members.items()})
    return sample


QA = [{"role": "user", "content": "<image> What colour?"}, {"role": "assistant", "content": "Red."}]


def test_image_sample_tokens_match_tiles(tokenizer):
    sample = build_sample(raw(QA, img0_jpg=jpeg(256, 128)), "t", spec(), tokenizer)
    # 256x128 at tile 64, max 4 -> 2x1 grid + thumbnail = 3 tiles of 4 tokens.
    assert sample.tiles.shape == (3, 3, 64, 64) and sample.tiles.dtype == torch.uint8
    assert int((sample.input_ids == tokenizer.special_ids[st.IMG_CONTEXT]).sum()) == 12
    assert sample.labels.shape == sample.input_ids.shape


def test_budget_degrades_tiles_then_skips(tokenizer):
    big = raw(QA, img0_jpg=jpeg(1024, 1024))
    full = build_sample(big, "t", spec(seq_length=4096, max_tiles=12, tpt=64), tokenizer)
    assert full.tiles.shape[0] == 10  # square image: the 3x3 grid (largest square <= 12) + thumbnail
    tight = build_sample(big, "t", spec(seq_length=full.length - 64 * 4, max_tiles=12, tpt=64), tokenizer)
    assert tight.tiles.shape[0] < full.tiles.shape[0] and tight.length <= full.length - 64 * 4
    with pytest.raises(SampleError) as err:
        build_sample(big, "t", spec(seq_length=40, max_tiles=12, tpt=64), tokenizer)
    assert err.value.reason == "too_long"


def test_placeholder_mismatch_and_missing_member(tokenizer):
    with pytest.raises(SampleError) as err:
        build_sample(raw(QA), "t", spec(), tokenizer)
    assert err.value.reason == "placeholder_mismatch"
    with pytest.raises(SampleError) as err:
        build_sample(raw(QA, img1_jpg=jpeg(64, 64)), "t", spec(), tokenizer)
    assert err.value.reason == "missing_member"


def test_corrupt_image_raises_counted_reason(tokenizer):
    from data_pipelines.training.decode import MediaDecodeError

    with pytest.raises(MediaDecodeError) as err:
        build_sample(raw(QA, img0_jpg=jpeg(64, 64)[:200]), "t", spec(), tokenizer)
    assert err.value.reason == "corrupt_image"


def test_video_sample_from_synth_shards(synth_data, tokenizer):
    shard = expand_shard_paths(str(synth_data.shard_dirs["video"]))[0]
    sample = build_sample(next(iter_shard(shard)), "v", spec(), tokenizer)
    frames = sample.tiles.shape[0]
    assert 1 <= frames <= 8
    assert int((sample.input_ids == tokenizer.special_ids[st.IMG_START]).sum()) == frames
    assert (sample.labels != IGNORE_INDEX).any()


def _sample(n: int, key: str = "s") -> Sample:
    ids = np.arange(n, dtype=np.int64) % 50 + 20
    return Sample(ids, ids.copy(), torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "t", key)


def test_packer_oldest_first_then_best_fit():
    packer = Packer(seq_length=100)
    for n, key in [(60, "a"), (50, "b"), (30, "c"), (10, "d"), (45, "e")]:
        packer.add(_sample(n, key))
    assert [s.key for s in packer.pop_row()] == ["a", "c", "d"]
    assert [s.key for s in packer.pop_row()] == ["b", "e"]
    with pytest.raises(ValueError):
        packer.add(_sample(101))


def test_collate_boundaries_positions_and_padding():
    batch = collate_rows([[_sample(5), _sample(3)], [_sample(8)]], seq_length=10, pad_id=3)
    assert batch.cu_seqlens.tolist() == [0, 5, 8, 10, 18, 20]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert batch.seq_idx.tolist() == [[0] * 5 + [1] * 3 + [2] * 2, [3] * 8 + [4] * 2]
    assert batch.labels[0, 8:].tolist() == [IGNORE_INDEX] * 2 and batch.input_ids[1, 8:].tolist() == [3, 3]
    assert batch.num_real_tokens == 16 and batch.num_samples == 3


def _stream(synth_data, tokenizer, rank=0, world=1, workers=0, weights=(1.0, 0.5, 1.0), buffer=8):
    sources = [SourceConfig(name, str(synth_data.shard_dirs[kind]), w)
               for (name, kind), w in zip([("img", "image"), ("vid", "video"), ("txt", "text")], weights)]
    return PackedBatchStream(sources, spec(seq_length=512), tokenizer, micro_batch_size=2, pack_buffer=buffer,
                             rank=rank, world_size=world, num_workers=workers)


def test_stream_is_deterministic_and_resumes_exactly(synth_data, tokenizer):
    a = _stream(synth_data, tokenizer)
    first = [a.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    rest = [a.next_batch() for _ in range(3)]
    b = _stream(synth_data, tokenizer)
    assert_same_batches([b.next_batch() for _ in range(3)], first)
    c = _stream(synth_data, tokenizer)
    c.load_state_dict(state)
    assert_same_batches([c.next_batch() for _ in range(3)], rest)


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_processes_give_the_same_sequence_and_resume_exactly(synth_data, tokenizer, workers):
    inline = _stream(synth_data, tokenizer)  # 0 workers: samples built in this process
    expected = [inline.next_batch() for _ in range(6)]
    pooled = _stream(synth_data, tokenizer, workers=workers)
    try:
        got = [pooled.next_batch() for _ in range(3)]
        state = json.loads(json.dumps(pooled.state_dict()))
    finally:
        pooled.close()
    resumed = _stream(synth_data, tokenizer, workers=workers)
    try:
        resumed.load_state_dict(state)
        got += [resumed.next_batch() for _ in range(3)]
    finally:
        resumed.close()
    assert_same_batches(got, expected)
    assert any(b.tiles.shape[0] for b in got)  # the compared batches carry media, decoded in the workers
    assert state["draws"] <= inline.state_dict()["draws"]  # prefetched work is not committed


def test_each_sample_once_per_epoch_across_ranks(synth_data, tokenizer):
    seen = []
    for rank in range(2):
        stream = _stream(synth_data, tokenizer, rank=rank, world=2)
        stream.weights = [1.0, 0.0001, 0.0001]  # effectively one source: its first epoch
        size = stream.cursors[0].num_samples
        jobs = []
        while stream.draws < size * 0.9:
            jobs.append(stream._plan())
        seen += [(j.shard, j.index) for j in jobs if j.source_id == 0]
    assert len(seen) == len(set(seen))


def test_ranks_draw_disjoint_samples(synth_data, tokenizer):
    positions = []
    for rank in range(2):
        stream = _stream(synth_data, tokenizer, rank=rank, world=2)
        # 6 draws per rank stay inside every source's first epoch (the video source has 8 samples).
        positions.append({(job.shard, job.index) for job in (stream._plan() for _ in range(6))})
    assert len(positions[0]) == len(positions[1]) == 6
    assert not positions[0] & positions[1]


def test_unsafe_member_names_are_never_read(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("../etc.json", b"{}"), ("ok.json", b'{"messages": []}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    first, second = iter_shard(str(path))
    # The unsafe member is never read, and its sample is counted under its own reason, not lost.
    assert (first.key, first.members, first.dropped) == ("../etc", {}, (("../etc.json", "unsafe_member_name"),))
    assert second.key == "ok" and second.dropped == ()


def _consume(stream, batches):
    """Positions of the samples packed into `batches` batches."""
    used = []
    pop_row = stream.packer.pop_row

    def recording_pop_row():
        row = pop_row()
        used.extend(s.position for s in row)
        return row

    stream.packer.pop_row = recording_pop_row
    for _ in range(batches):
        stream.next_batch()
    return used


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (3, 2), (2, 3)])
def test_resharded_resume_neither_repeats_nor_drops(synth_data, tokenizer, old_world, new_world):
    # Weights by source size and small buffers, so no source wraps into a second epoch even with
    # 3 ranks (positions stay unique).
    weights, buffer = (24.0, 4.0, 32.0), 4
    old = [_stream(synth_data, tokenizer, rank=r, world=old_world, weights=weights, buffer=buffer)
           for r in range(old_world)]
    consumed = [p for r, s in enumerate(old) for p in _consume(s, 1 + r % 2)]  # ranks at different points
    states = [json.loads(json.dumps(s.state_dict())) for s in old]
    new = [_stream(synth_data, tokenizer, rank=r, world=new_world, weights=weights, buffer=buffer)
           for r in range(new_world)]
    for s in new:
        s.load_resharded(states)
    consumed += [p for s in new for p in _consume(s, 1)]
    left = [s.position for stream in new for s in stream.packer.buffer]
    # Every draw below the point all new ranks have passed is consumed or still buffered, once.
    horizon = min(s.state_dict()["draws"] for s in new)
    planner = _stream(synth_data, tokenizer, weights=weights, buffer=buffer)
    assert horizon <= 64, "the draws stay within the first epoch of the 64 samples"
    planned = [(job.source_id, job.shard, job.index) for job in (planner._plan() for _ in range(horizon))]
    accounted = consumed + left
    assert len(accounted) == len(set(accounted))  # nothing twice
    assert set(planned) <= set(accounted)  # nothing dropped
