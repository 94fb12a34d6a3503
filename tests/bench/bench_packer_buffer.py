"""Packer buffer memory: plans (tokens, no pixels) versus built samples (tiles), at buffers 100 and 1000.

The loader packs `SamplePlan`s (token arrays and a media plan read from image headers and video
indexes) and decodes only the samples of chosen rows. This measures, on real shards at the
stage-1 settings (16,384-token rows, 512 px tiles, <= 12 tiles + thumbnail, 2 fps <= 128 frames,
256 tokens per tile) and the packing bench's source weights (40% image, 10% multi-image, 15% video,
35% text), the bytes the buffer holds when it is full, over the first rows:

- plans: what the buffer holds (`SamplePlan.nbytes`: input ids, labels, EVS rows);
- built: what the same samples would hold as built samples (the plans' bytes plus their uint8
  tiles, N x 3 x 512 x 512 bytes each: exact, since tile counts are fixed by the plan); at buffer
  100 the first full buffer is also built for real (`build_sample`) and its bytes summed, which
  checks the figure;
- the seconds to plan the first full buffer and per row after it (plan the refill + decode the row).

Run: `python -m tests.bench.run_all buffer` (or `make bench` for all benchmarks).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from data_pipelines.training.config import SourceConfig
from data_pipelines.training.loader import PackedBatchStream
from data_pipelines.training.samples import SampleSpec, build_sample
from data_pipelines.training.shards import read_indexed_sample
from data_pipelines.training.tiling import TilingConfig
from tests.bench.bench_data_throughput import IMAGES_PER_MULTI_SAMPLE, make_inputs

NAME = "bench_packer_buffer"
SEQ_LENGTH = 16_384
TILE = 512
BUFFERS = (100, 1000)
ROWS = 6
WEIGHTS = {"image": 0.40, "multi_image": 0.10, "video": 0.15, "text": 0.35}
TILE_BYTES = 3 * TILE * TILE


def spec() -> SampleSpec:
    return SampleSpec(seq_length=SEQ_LENGTH, tokens_per_tile=256, tiling=TilingConfig(tile_size=TILE, max_tiles=12),
                      video_fps=2.0, max_frames=128)


def measure(sources: list[SourceConfig], tokenizer, buffer: int, check_built: bool) -> dict:
    stream = PackedBatchStream(sources, spec(), tokenizer, micro_batch_size=1, pack_buffer=buffer)
    peaks = {"plan_bytes": 0, "built_bytes": 0, "tiles": 0, "tokens": 0}
    first_full: list = []
    choose = stream.packer.pop_row

    def measured_pop_row():
        plans = stream.packer.buffer  # full: the loader refills before every row
        if not first_full:
            first_full.extend(plans)
        plan_bytes = sum(p.nbytes for p in plans)
        tiles = sum(p.num_tiles for p in plans)
        peaks["plan_bytes"] = max(peaks["plan_bytes"], plan_bytes)
        peaks["built_bytes"] = max(peaks["built_bytes"], plan_bytes + tiles * TILE_BYTES)
        peaks["tiles"] = max(peaks["tiles"], tiles)
        peaks["tokens"] = max(peaks["tokens"], sum(p.length for p in plans))
        return choose()

    stream.packer.pop_row = measured_pop_row
    start = time.perf_counter()
    stream._choose_row()  # plans the first full buffer and chooses one row (its decode comes later)
    fill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fills = [stream.next_batch().num_real_tokens / SEQ_LENGTH for _ in range(ROWS)]
    row_seconds = (time.perf_counter() - start) / ROWS
    result = {"buffer": buffer, "rows": ROWS, **peaks, "fill_mean": sum(fills) / len(fills),
              "seconds_to_plan_full_buffer": fill_seconds, "seconds_per_row": row_seconds,
              "built_over_plans": peaks["built_bytes"] / peaks["plan_bytes"]}
    if check_built:
        built = 0
        for plan in first_full:
            source_id, shard, index = plan.position
            raw = read_indexed_sample(shard, index, stream._job_at(plan.position).entry)
            sample = build_sample(raw, plan.source, spec(), tokenizer)
            built += sample.tiles.nbytes + sample.input_ids.nbytes + sample.labels.nbytes + sample.video_evs.nbytes
        result["first_full_buffer_built_for_real_bytes"] = built
        result["first_full_buffer_computed_bytes"] = sum(p.nbytes + p.num_tiles * TILE_BYTES for p in first_full)
    stream.close()
    return result


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp))
        sources = [SourceConfig(kind, str(paths[0] if len(paths) == 1 else paths[0].parent), WEIGHTS[kind])
                   for kind, paths in inputs.shards.items()]
        results = [measure(sources, inputs.tokenizer, b, check_built=(b == BUFFERS[0])) for b in BUFFERS]
    return {"name": NAME, "seq_length": SEQ_LENGTH, "tile": TILE, "weights": WEIGHTS,
            "images_per_multi_sample": IMAGES_PER_MULTI_SAMPLE, "results": results}


def render(data: dict) -> str:
    mb = 1 / 2**20
    lines = [f"Packer buffer, full, at {data['seq_length']:,}-token rows, {data['tile']} px tiles "
             f"(peak over the first {data['results'][0]['rows']} rows; plans = what the loader holds)",
             f"{'buffer':>6}  {'tokens':>10}  {'tiles':>6}  {'plans MB':>9}  {'built MB':>9}  {'built/plans':>11}  "
             f"{'plan buffer s':>13}  {'s/row':>6}  {'fill':>7}"]
    for r in data["results"]:
        lines.append(f"{r['buffer']:>6}  {r['tokens']:>10,}  {r['tiles']:>6,}  {r['plan_bytes'] * mb:>9.1f}  "
                     f"{r['built_bytes'] * mb:>9.1f}  {r['built_over_plans']:>10.0f}x  "
                     f"{r['seconds_to_plan_full_buffer']:>13.2f}  {r['seconds_per_row']:>6.2f}  {r['fill_mean']:>7.2%}")
    check = data["results"][0]
    if "first_full_buffer_built_for_real_bytes" in check:
        lines.append(f"check at buffer {check['buffer']}: its first full buffer built for real holds "
                     f"{check['first_full_buffer_built_for_real_bytes'] * mb:,.1f} MB, computed "
                     f"{check['first_full_buffer_computed_bytes'] * mb:,.1f} MB")
    return "\n".join(lines)
