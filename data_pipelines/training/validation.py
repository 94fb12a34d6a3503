"""Held-out rows: the first `max_samples` samples of a validation source, in shard order, built as
training builds them and packed in that order.

Deterministic by construction: no shuffle, no blending, no randomness beyond the per-sample seeds
training uses (reasoning mode, EVS rates: `sample_rng` depends on the sample's identity only), so
every run, world size and resume sees the same rows. Each row is its own batch of one, so a
row's loss does not depend on which rows share its forward. Bad samples are counted skips, as in
training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from data_pipelines.training import special_tokens as st
from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.config import SourceConfig
from data_pipelines.training.decode import MediaDecodeError
from data_pipelines.training.packing import collate_rows
from data_pipelines.training.samples import Sample, SampleError, SampleSpec, Tokenizer, build_sample
from data_pipelines.training.shards import (
    DataError,
    ShardError,
    expand_shard_paths,
    read_indexed_sample,
    try_index_shard,
)


@dataclass
class ValidationSet:
    name: str
    batches: list[PackedBatch]  # one packed row each, in order
    keys: list[str]  # the samples it holds, in order
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def pack_in_order(samples: list[Sample], seq_length: int) -> list[list[Sample]]:
    """Consecutive samples share a row while they fit (no reordering: the rows depend only on the list)."""
    rows: list[list[Sample]] = []
    used = seq_length
    for sample in samples:
        if used + len(sample.input_ids) > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += len(sample.input_ids)
    return rows


def build_validation_set(source: SourceConfig, spec: SampleSpec, tokenizer: Tokenizer, max_samples: int
                         ) -> ValidationSet:
    """The first `max_samples` usable samples of `source`, packed into rows of `spec.seq_length`.
    Losses are plain per-token means (whatever the training weighting), so stages compare."""
    samples: list[Sample] = []
    skipped: Counter = Counter()
    try:
        shards = expand_shard_paths(source.path)
    except (FileNotFoundError, ShardError) as err:
        raise DataError(f"held-out source {source.name!r}: {err}") from None
    for shard in shards:
        index = try_index_shard(shard)
        if isinstance(index, str):
            skipped["corrupt_shard"] += 1
            continue
        for position, entry in enumerate(index):
            if len(samples) == max_samples:
                break
            try:
                samples.append(build_sample(read_indexed_sample(shard, position, entry), source.name, spec, tokenizer))
            except (SampleError, MediaDecodeError) as err:
                skipped[err.reason] += 1
        if len(samples) == max_samples:
            break
    if not samples:
        reasons = ", ".join(f"{r} {n}" for r, n in skipped.most_common()) or "no samples"
        raise DataError(f"held-out source {source.name!r} ({source.path}) has no usable sample ({reasons}): check it "
                        f"with `python -m data_pipelines.lint {source.path}`")
    pad_id = tokenizer.special_ids[st.PAD]
    batches = [collate_rows([row], spec.seq_length, pad_id, spec.tiling.tile_size, loss_weighting="token")
               for row in pack_in_order(samples, spec.seq_length)]
    return ValidationSet(source.name, batches, [s.key for s in samples], skipped)
