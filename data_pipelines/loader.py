"""Deterministic, resumable stream of packed batches for one data-parallel rank.

Order is a pure function of (seed, draw counter): draw `d` picks a source by weight with an RNG
seeded by (seed, d), and takes that source's next sample (shards shuffled per epoch, samples in
shard order). Rank `r` of `w` builds draws d with d % w == r, so ranks see disjoint samples. The
state (draw counter, per-source cursors, the packer's buffered samples as positions, skip
counters) is a small JSON-able dict: resume seeks straight to the saved positions.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from data_pipelines.conversation import SampleError
from data_pipelines.decode import MediaDecodeError
from data_pipelines.packing import Packer, PackedBatch, collate_rows
from data_pipelines.samples import Sample, SampleSpec, Tokenizer, build_sample
from data_pipelines.shards import RawSample, count_samples, expand_shard_paths, iter_shard
from data_pipelines import special_tokens as st


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: float


@dataclass
class SourceCursor:
    """Position of one source: epoch, index into its (shuffled) shard order, sample within shard."""

    name: str
    shards: list[str]
    shard_sizes: list[int]
    seed: int
    epoch: int = 0
    shard_pos: int = 0
    sample_pos: int = 0
    _reader: Iterator[RawSample] | None = field(default=None, repr=False)
    _reader_at: tuple[str, int] | None = field(default=None, repr=False)

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}|{self.name}|{epoch}").shuffle(order)
        return order

    def advance(self) -> tuple[str, int]:
        """Claim the next sample position (shard path, index) without reading it."""
        while True:
            shard_id = self.shard_order(self.epoch)[self.shard_pos]
            if self.sample_pos < self.shard_sizes[shard_id]:
                position = (self.shards[shard_id], self.sample_pos)
                self.sample_pos += 1
                return position
            self.sample_pos = 0
            self.shard_pos += 1
            if self.shard_pos == len(self.shards):
                self.shard_pos = 0
                self.epoch += 1

    def read(self, shard: str, index: int) -> RawSample:
        """Read one sample, reusing the open shard reader when reading sequentially."""
        if self._reader is None or self._reader_at != (shard, index):
            self._reader = iter_shard(shard, start=index)
        raw = next(self._reader)
        self._reader_at = (shard, index + 1)
        return raw

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample_pos": self.sample_pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]
        self._reader = None


class PackedBatchStream:
    """Blended sources -> built samples -> packer -> PackedBatch, for one rank."""

    def __init__(self, sources: list[Source], spec: SampleSpec, tokenizer: Tokenizer, *, micro_batch_size: int,
                 pack_buffer: int, max_samples_per_pack: int = 0, rank: int = 0, world_size: int = 1):
        self.sources = sources
        self.spec = spec
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.pack_buffer = pack_buffer
        self.rank, self.world_size = rank, world_size
        self.cursors = []
        for s in sources:
            shards = expand_shard_paths(s.path)
            self.cursors.append(SourceCursor(s.name, shards, [count_samples(p) for p in shards], spec.seed))
        empty = [c.name for c in self.cursors if sum(c.shard_sizes) == 0]
        if empty:
            raise ValueError(f"data source(s) {empty} hold no samples")
        self.total_samples = sum(sum(c.shard_sizes) for c in self.cursors)
        self.weights = [s.weight for s in sources]
        self.draws = 0
        self.packer = Packer(spec.seq_length, max_samples_per_pack)
        self.skipped: Counter[str] = Counter()
        self.skipped_by_source: Counter[str] = Counter()
        self.samples_by_source: Counter[str] = Counter()
        self.tokens_by_source: Counter[str] = Counter()

    # ---- drawing -------------------------------------------------------------------------
    def _pick_source(self, draw: int) -> int:
        return random.Random(f"{self.spec.seed}|draw|{draw}").choices(range(len(self.sources)), self.weights)[0]

    def _next_own_position(self) -> tuple[int, str, int]:
        """Advance the global draw sequence to this rank's next draw; other ranks' draws only move
        cursors (no reads)."""
        while True:
            draw = self.draws
            self.draws += 1
            source_id = self._pick_source(draw)
            shard, index = self.cursors[source_id].advance()
            if draw % self.world_size == self.rank:
                return source_id, shard, index

    def _build(self, source_id: int, shard: str, index: int) -> Sample:
        raw = self.cursors[source_id].read(shard, index)
        sample = build_sample(raw, self.sources[source_id].name, self.spec, self.tokenizer)
        sample.position = (source_id, shard, index)
        return sample

    def _next_sample(self) -> Sample:
        while True:
            source_id, shard, index = self._next_own_position()
            name = self.sources[source_id].name
            try:
                sample = self._build(source_id, shard, index)
            except (SampleError, MediaDecodeError) as err:
                self.skipped[err.reason] += 1
                self.skipped_by_source[f"{name}/{err.reason}"] += 1
                continue
            self.samples_by_source[name] += 1
            self.tokens_by_source[name] += sample.length
            return sample

    # ---- batches -------------------------------------------------------------------------
    def next_batch(self) -> PackedBatch:
        rows = []
        for _ in range(self.micro_batch_size):
            while len(self.packer.buffer) < self.pack_buffer:
                self.packer.add(self._next_sample())
            rows.append(self.packer.pop_row())
        return collate_rows(rows, self.spec.seq_length, self.tokenizer.special_ids[st.PAD])

    @property
    def epochs(self) -> float:
        """Passes over the data so far (all ranks' draws over all samples)."""
        return self.draws / self.total_samples

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "draws": self.draws,
            "cursors": {c.name: c.state() for c in self.cursors},
            "buffer": [list(s.position) for s in self.packer.buffer],
            "skipped": dict(self.skipped),
            "skipped_by_source": dict(self.skipped_by_source),
            "samples_by_source": dict(self.samples_by_source),
            "tokens_by_source": dict(self.tokens_by_source),
        }

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]
        for cursor in self.cursors:
            cursor.load_state(state["cursors"][cursor.name])
        # Buffered samples were good when first built and building is deterministic: rebuild them.
        self.packer.buffer = [self._build(int(sid), shard, int(index)) for sid, shard, index in state["buffer"]]
        self.skipped = Counter(state["skipped"])
        self.skipped_by_source = Counter(state["skipped_by_source"])
        self.samples_by_source = Counter(state["samples_by_source"])
        self.tokens_by_source = Counter(state["tokens_by_source"])
