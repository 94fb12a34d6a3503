"""Deterministic, resumable stream of packed batches for one data-parallel rank.

Order is a pure function of (seed, draw counter): draw `d` picks a source by weight with an RNG
seeded by (seed, d), and takes that source's next sample (shards shuffled per (seed, source,
epoch), samples in shard order). Rank `r` of `w` builds the draws with d % w == r, so ranks see
disjoint samples and, together, each sample once per epoch of its source.

The main process plans positions; building (decode, tile, tokenize) runs inline or in a pool of
`num_workers` processes, consumed in plan order, so the sample sequence is the same for any
worker count. The state (draw counter and cursors as of the last consumed sample, the packer's
buffered samples as positions, counters) is a small JSON-able dict: resume seeks straight to
the saved positions via the shard index.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
import signal
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

from data_pipelines import special_tokens as st
from data_pipelines.conversation import SampleError
from data_pipelines.decode import MediaDecodeError
from data_pipelines.packing import Packer, PackedBatch, collate_rows
from data_pipelines.samples import Sample, SampleSpec, Tokenizer, build_sample
from data_pipelines.shards import IndexedSample, expand_shard_paths, index_shard, read_indexed_sample


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: float
    reasoning_on_ratio: float | None = None  # None: the spec's


@dataclass(frozen=True)
class Job:
    """One planned sample: where it is and which source spec builds it."""

    source_id: int
    shard: str
    index: int
    entry: IndexedSample


@dataclass
class SourceCursor:
    """Position of one source: epoch, index into its (shuffled) shard order, sample within shard."""

    name: str
    shards: list[str]
    indexes: list[list[IndexedSample]] = field(repr=False)
    seed: int
    epoch: int = 0
    shard_pos: int = 0
    sample_pos: int = 0

    @property
    def num_samples(self) -> int:
        return sum(len(i) for i in self.indexes)

    _order_cache: dict = field(default_factory=dict, repr=False)

    def shard_order(self, epoch: int) -> list[int]:
        if epoch not in self._order_cache:
            order = list(range(len(self.shards)))
            random.Random(f"{self.seed}|{self.name}|{epoch}").shuffle(order)
            self._order_cache = {epoch: order}  # only the current epoch is ever asked for again
        return self._order_cache[epoch]

    def advance(self) -> tuple[int, int]:
        """Claim the next sample position (shard id, index in shard) without reading it."""
        while True:
            shard_id = self.shard_order(self.epoch)[self.shard_pos]
            if self.sample_pos < len(self.indexes[shard_id]):
                position = (shard_id, self.sample_pos)
                self.sample_pos += 1
                return position
            self.sample_pos = 0
            self.shard_pos += 1
            if self.shard_pos == len(self.shards):
                self.shard_pos = 0
                self.epoch += 1

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample_pos": self.sample_pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]


# ---- building, inline or in worker processes ----------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, specs: list[SampleSpec], names: list[str]) -> None:
    # Slurm signals every process of the job step: a decode worker must survive the preemption
    # notice so the trainer can finish its step and save (the trainer owns the response).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _WORKER.update(tokenizer=Tokenizer.load(tokenizer_path), specs=specs, names=names)


def _build_job(job: Job, tokenizer: Tokenizer, specs: list[SampleSpec], names: list[str]) -> Sample | str:
    """The built sample, or the skip reason."""
    raw = read_indexed_sample(job.shard, job.index, job.entry)
    try:
        sample = build_sample(raw, names[job.source_id], specs[job.source_id], tokenizer)
    except (SampleError, MediaDecodeError) as err:
        return err.reason
    sample.position = (job.source_id, job.shard, job.index)
    return sample


def _build_in_worker(job: Job) -> Sample | str:
    return _build_job(job, _WORKER["tokenizer"], _WORKER["specs"], _WORKER["names"])


class PackedBatchStream:
    """Blended sources -> built samples -> packer -> PackedBatch, for one rank."""

    def __init__(self, sources: list[Source], spec: SampleSpec, tokenizer: Tokenizer, *, micro_batch_size: int,
                 pack_buffer: int, max_samples_per_pack: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, prefetch_per_worker: int = 4):
        self.sources = sources
        self.spec = spec
        self.specs = [spec if s.reasoning_on_ratio is None else
                      dataclasses.replace(spec, reasoning_on_ratio=s.reasoning_on_ratio) for s in sources]
        self.names = [s.name for s in sources]
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.pack_buffer = pack_buffer
        self.rank, self.world_size = rank, world_size
        self.cursors = []
        for s in sources:
            shards = expand_shard_paths(s.path)
            self.cursors.append(SourceCursor(s.name, shards, [index_shard(p) for p in shards], spec.seed))
        empty = [c.name for c in self.cursors if c.num_samples == 0]
        if empty:
            raise ValueError(f"data source(s) {empty} hold no samples")
        self.total_samples = sum(c.num_samples for c in self.cursors)
        self.weights = [s.weight for s in sources]
        self.draws = 0
        self.packer = Packer(spec.seq_length, max_samples_per_pack)
        self.skipped: Counter[str] = Counter()
        self.skipped_by_source: Counter[str] = Counter()
        self.samples_by_source: Counter[str] = Counter()
        self.tokens_by_source: Counter[str] = Counter()
        # Planned but not yet consumed samples, with the planning state right after each.
        self._pending: deque[tuple[Job, Future | None, dict]] = deque()
        self._committed = self._planning_state()
        self.num_workers = num_workers
        self._prefetch = max(1, num_workers * prefetch_per_worker)
        self._pool = None
        if num_workers > 0:
            # spawn, not fork: the parent holds torch/OpenMP thread pools that a fork would break.
            self._pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker,
                                             initargs=(tokenizer.path, self.specs, self.names))

    # ---- planning ----------------------------------------------------------------------------
    def _pick_source(self, draw: int) -> int:
        return random.Random(f"{self.spec.seed}|draw|{draw}").choices(range(len(self.sources)), self.weights)[0]

    def _planning_state(self) -> dict:
        return {"draws": self.draws, "cursors": {c.name: c.state() for c in self.cursors}}

    def _plan(self) -> Job:
        """Advance the global draw sequence to this rank's next draw; other ranks' draws only move
        cursors (no reads)."""
        while True:
            draw = self.draws
            self.draws += 1
            source_id = self._pick_source(draw)
            cursor = self.cursors[source_id]
            shard_id, index = cursor.advance()
            if draw % self.world_size == self.rank:
                return Job(source_id, cursor.shards[shard_id], index, cursor.indexes[shard_id][index])

    def _submit(self) -> None:
        job = self._plan()
        future = self._pool.submit(_build_in_worker, job) if self._pool else None
        self._pending.append((job, future, self._planning_state()))

    def _job_at(self, source_id: int, shard: str, index: int) -> Job:
        cursor = self.cursors[source_id]
        return Job(source_id, shard, index, cursor.indexes[cursor.shards.index(shard)][index])

    # ---- consuming -----------------------------------------------------------------------------
    def _next_sample(self) -> Sample:
        while True:
            while len(self._pending) < self._prefetch:
                self._submit()
            job, future, state_after = self._pending.popleft()
            result = future.result() if future else _build_job(job, self.tokenizer, self.specs, self.names)
            self._committed = state_after
            name = self.names[job.source_id]
            if isinstance(result, str):
                self.skipped[result] += 1
                self.skipped_by_source[f"{name}/{result}"] += 1
                continue
            self.samples_by_source[name] += 1
            self.tokens_by_source[name] += result.length
            return result

    def next_batch(self) -> PackedBatch:
        rows = []
        for _ in range(self.micro_batch_size):
            while len(self.packer.buffer) < self.pack_buffer:
                self.packer.add(self._next_sample())
            rows.append(self.packer.pop_row())
        return collate_rows(rows, self.spec.seq_length, self.tokenizer.special_ids[st.PAD])

    @property
    def epochs(self) -> float:
        """Passes over the data so far (all ranks' consumed draws over all samples)."""
        return self._committed["draws"] / self.total_samples

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **self._committed,
            "world_size": self.world_size,
            "buffer": [list(s.position) for s in self.packer.buffer],
            "skipped": dict(self.skipped),
            "skipped_by_source": dict(self.skipped_by_source),
            "samples_by_source": dict(self.samples_by_source),
            "tokens_by_source": dict(self.tokens_by_source),
        }

    def _reset_pending(self) -> None:
        for _, future, _ in self._pending:
            if future is not None:
                future.cancel()
        self._pending.clear()

    def _refill_buffer(self, positions: list) -> None:
        """Rebuild buffered samples from their positions: they were good when first built, and
        building is deterministic."""
        self.packer.buffer = []
        for source_id, shard, index in positions:
            job = self._job_at(int(source_id), shard, int(index))
            self.packer.add(_build_job(job, self.tokenizer, self.specs, self.names))

    def load_state_dict(self, state: dict) -> None:
        """Resume with the same world size as the run that saved `state`."""
        if state.get("world_size", 1) != self.world_size:
            raise ValueError("saved with a different world size: use load_resharded with every rank's state")
        self._reset_pending()
        self.draws = state["draws"]
        for cursor in self.cursors:
            cursor.load_state(state["cursors"][cursor.name])
        self._committed = self._planning_state()
        self._refill_buffer(state["buffer"])
        self._load_counters([state])

    def load_resharded(self, states: list[dict]) -> None:
        """Resume from the states of all ranks of a run with a different world size, without
        repeating or dropping a sample.

        Old rank r consumed its draws below its committed counter D_r; the furthest rank reached
        D* = max D_r. What no old rank consumed is (a) every old buffer and (b) each old rank's own
        draws in [D_r, D*). Those are dealt round-robin to the new ranks (buffers first, in rank
        order), and every new rank continues the global draw sequence from D* with the new modulus.
        """
        old_world = len(states)
        if sorted(s.get("world_size", 1) for s in states) != [old_world] * old_world:
            raise ValueError(f"expected the states of all {states[0].get('world_size')} saved ranks")
        self._reset_pending()
        d_star = max(s["draws"] for s in states)
        gaps = {d for r, s in enumerate(states) for d in range(s["draws"], d_star) if d % old_world == r}
        for cursor in self.cursors:
            cursor.load_state({"epoch": 0, "shard_pos": 0, "sample_pos": 0})
        gap_positions = []
        for draw in range(d_star):  # replay the (cheap, pure) planning to find the gap draws
            source_id = self._pick_source(draw)
            cursor = self.cursors[source_id]
            shard_id, index = cursor.advance()
            if draw in gaps:
                gap_positions.append([source_id, cursor.shards[shard_id], index])
        self.draws = d_star
        self._committed = self._planning_state()
        leftovers = [p for s in states for p in s["buffer"]] + gap_positions
        self._refill_buffer(leftovers[self.rank::self.world_size])
        # Counters are per rank and summed when reported: keep the old totals on new rank 0 only.
        self._load_counters(states if self.rank == 0 else [])

    def _load_counters(self, states: list[dict]) -> None:
        def total(key: str) -> Counter:
            return sum((Counter(s[key]) for s in states), Counter())

        self.skipped, self.skipped_by_source = total("skipped"), total("skipped_by_source")
        self.samples_by_source, self.tokens_by_source = total("samples_by_source"), total("tokens_by_source")
