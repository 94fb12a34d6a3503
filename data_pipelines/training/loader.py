"""Deterministic, resumable stream of packed batches for one data-parallel rank.

Order is a pure function of (seed, draw counter): draw `d` picks a source by weight with an RNG
seeded by (seed, d), and takes that source's next sample (shards shuffled per (seed, source,
epoch), samples in shard order). Rank `r` of `w` builds the draws with d % w == r, so ranks see
disjoint samples and, together, each sample once per epoch of its source.

Each sample goes through two steps, inline or in a pool of `num_workers` processes: planning
(tokens, exact length, media plan from image headers and video indexes) before the packer, and
decoding (tiles, frames) only once the packer put it in a row. Results are used in submission
order, so the sequence is the same for any worker count. The state (draw counter and cursors as
of the last sample planned into the packer before the last used row, the packer's buffer as
sample positions, counters) is a small JSON-able dict: resume seeks straight to the saved
positions via the shard index and re-plans the buffer.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.config import DataConfig, SourceConfig
from data_pipelines.training.conversation import SampleError
from data_pipelines.training.decode import MediaDecodeError
from data_pipelines.training.packing import Packer, collate_rows
from data_pipelines.training.samples import (
    MediaPlan,
    Sample,
    SamplePlan,
    SampleSpec,
    Tokenizer,
    decode_media,
    plan_sample,
)
from data_pipelines.training.shards import (
    DataError,
    IndexedSample,
    expand_shard_paths,
    read_indexed_sample,
    try_index_shard,
)


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
    _shard_ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Saved positions name a shard relative to the source's directory, so a source moved to
        # another path (same shards) resumes; absolute names (older checkpoints) still resolve.
        root = os.path.commonpath([os.path.dirname(p) for p in self.shards])
        self._names = [os.path.relpath(p, root) for p in self.shards]
        self._shard_ids = {**{shard: i for i, shard in enumerate(self.shards)},
                           **{name: i for i, name in enumerate(self._names)}}
        # What a saved position relies on, cheaply: each shard's byte size and sample count as indexed.
        self._fingerprints = {name: [os.path.getsize(path), len(index)]
                              for name, path, index in zip(self._names, self.shards, self.indexes)}

    def fingerprints(self) -> dict[str, list[int]]:
        return self._fingerprints

    def changed_shards(self, saved: dict[str, list[int]]) -> list[str]:
        """One line per shard the saved fingerprints name that differs now (size, sample count)."""
        changed = []
        for name, (size, count) in saved.items():
            now = self._fingerprints.get(name)
            if now is not None and now != [size, count]:
                changed.append(f"{name} ({size:,} -> {now[0]:,} bytes, {count} -> {now[1]} samples)")
        return changed

    def relative(self, shard: str) -> str:
        return self._names[self._shard_ids[shard]]

    def resolve(self, name: str) -> str:
        """The shard path a saved position names (relative or absolute)."""
        if name not in self._shard_ids:
            raise DataError(f"the saved data position names shard {name!r} of source {self.name!r}, which is not "
                            f"among its shards now ({len(self.shards)} under {os.path.dirname(self.shards[0])}): put "
                            "the shards back (any directory, same file names), or start in a new run directory")
        return self.shards[self._shard_ids[name]]

    def samples_in(self, shard: str) -> int:
        return len(self.indexes[self._shard_ids[shard]])

    def entry(self, shard: str, index: int) -> IndexedSample:
        """Where sample `index` of `shard` lies (a path or a saved relative name)."""
        return self.indexes[self._shard_ids[shard]][index]

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


NOTE_MEANING = {
    "chat_template_fallback": "the tokenizer's chat template is not prefix-stable on some conversations (it "
                              "rewrites earlier turns), so those are rendered with the built-in ChatML "
                              "(data.chat_template=tokenizer makes this an error)",
    "video_pyav_fallback": "decord is missing or failed on some videos, so PyAV read them (same frames and "
                           "timestamps, slower)",
}


# ---- planning and decoding, inline or in worker processes ---------------------------------
_WORKER: dict = {}


def _exit_with_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    """Ends this worker within `interval_s` of its trainer's death. Workers ignore SIGTERM (below),
    so a trainer killed with SIGKILL (the OOM killer) would otherwise leave them running forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)  # the parent is gone: nobody will read our results

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(tokenizer_path: str, specs: list[SampleSpec], names: list[str], parent_pid: int) -> None:
    # Slurm signals every process of the job step: a decode worker must survive the preemption
    # notice so the trainer can finish its step and save (the trainer owns the response).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    _WORKER.update(tokenizer=Tokenizer.load(tokenizer_path), specs=specs, names=names)


def _plan_job(job: Job, tokenizer: Tokenizer, specs: list[SampleSpec], names: list[str]) -> SamplePlan | str:
    """The sample's plan (tokens, media plan; no pixels), or the skip reason."""
    raw = read_indexed_sample(job.shard, job.index, job.entry)
    try:
        plan = plan_sample(raw, names[job.source_id], specs[job.source_id], tokenizer)
    except (SampleError, MediaDecodeError) as err:
        return err.reason
    plan.position = (job.source_id, job.shard, job.index)
    return plan


def _decode_job(job: Job, media: tuple[MediaPlan, ...], spec: SampleSpec) -> torch.Tensor | str:
    """The planned media's tiles, or the skip reason."""
    raw = read_indexed_sample(job.shard, job.index, job.entry)
    try:
        return decode_media(media, raw, spec)
    except MediaDecodeError as err:
        return err.reason


def _plan_in_worker(job: Job) -> SamplePlan | str:
    return _plan_job(job, _WORKER["tokenizer"], _WORKER["specs"], _WORKER["names"])


def _decode_in_worker(job: Job, media: tuple[MediaPlan, ...]) -> torch.Tensor | str:
    return _decode_job(job, media, _WORKER["specs"][job.source_id])


@dataclass
class _ChosenRow:
    """A row the packer chose ahead of use, its media decoding (in the pool, or later inline),
    and the stream state to commit once it is used."""

    plans: list[SamplePlan]
    jobs: list[Job]
    decoded: list[Future | None]
    state: dict


class PackedBatchStream:
    """Blended sources -> sample plans -> packer -> decode the chosen -> PackedBatch, for one rank.

    The packer buffers plans (tokens and media plans, no pixels), so a buffer of 1000 samples
    costs megabytes, not the gigabytes its tiles would; only the samples of chosen rows are
    decoded, `rows_ahead` rows in advance when there are workers. A sample whose media opened
    at planning but fails to decode leaves a hole (padding) in its row and is counted as skipped.
    """

    def __init__(self, sources: list[SourceConfig], spec: SampleSpec, tokenizer: Tokenizer, *, micro_batch_size: int,
                 pack_buffer: int, max_samples_per_pack: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, prefetch_per_worker: int = 4, loss_weighting: str = "token",
                 max_skips_in_a_row: int = 1000, on_corrupt_shard: str = "skip", accept_changed_shards: bool = False):
        self.sources = sources
        self.accept_changed_shards = accept_changed_shards
        self.loss_weighting = loss_weighting
        self.spec = spec
        self.specs = [spec if s.reasoning_on_ratio is None else
                      dataclasses.replace(spec, reasoning_on_ratio=s.reasoning_on_ratio) for s in sources]
        self.names = [s.name for s in sources]
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.pack_buffer = pack_buffer
        self.rank, self.world_size = rank, world_size
        # Skips found while planning count when the plan reaches the packer (and are part of the
        # state of every row chosen after); decode skips and used samples count when a row is used.
        self._plan_skipped: Counter[str] = Counter()
        self._plan_skipped_by_source: Counter[str] = Counter()
        self.cursors = [self._open_source(s, spec.seed, on_corrupt_shard) for s in sources]
        empty = [c.name for c in self.cursors if c.num_samples == 0]
        if empty:
            raise DataError(f"data source(s) {empty} hold no samples")
        self.max_skips_in_a_row = max_skips_in_a_row
        self._streaks = [Counter() for _ in sources]  # per source: skip reasons since its last usable sample
        self.total_samples = sum(c.num_samples for c in self.cursors)
        self.weights = [s.weight for s in sources]
        self.draws = 0
        self.packer = Packer(spec.seq_length, max_samples_per_pack)
        self._decode_skipped: Counter[str] = Counter()
        self._decode_skipped_by_source: Counter[str] = Counter()
        self.samples_by_source: Counter[str] = Counter()
        self.tokens_by_source: Counter[str] = Counter()
        self.fallbacks_by_source: Counter[str] = Counter()  # "<source>/<note>" of used samples
        self._warned: set[str] = set()
        # Planned but not yet buffered samples, with the planning state right after each.
        self._pending: deque[tuple[Job, Future | None, dict]] = deque()
        self._planned = self._planning_state()  # as of the last plan that reached the packer
        self._rows: deque[_ChosenRow] = deque()
        self._committed = self._row_state()  # as of the last row used
        self.num_workers = num_workers
        self._prefetch = max(1, num_workers * prefetch_per_worker)
        # With workers, choose the next batch's rows while this one trains so they decode meanwhile.
        self._rows_ahead = 2 * micro_batch_size if num_workers > 0 else 1
        self._pool = None
        if num_workers > 0:
            # spawn, not fork: the parent holds torch/OpenMP thread pools that a fork would break.
            self._pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker,
                                             initargs=(tokenizer.path, self.specs, self.names, os.getpid()))

    def _open_source(self, source: SourceConfig, seed: int, on_corrupt_shard: str) -> SourceCursor:
        """The source's cursor over its readable shards; an unreadable one (not a tar, gzip data,
        truncated) stops the run or is skipped with a warning and counted as `corrupt_shard`."""
        shards, indexes = [], []
        for shard in expand_shard_paths(source.path):
            index = try_index_shard(shard)
            if isinstance(index, str):
                if on_corrupt_shard == "error":
                    raise DataError(f"{shard} (source {source.name!r}) is not a readable tar shard ({index}); "
                                    "fix or remove it, or set data.on_corrupt_shard=skip to train on the others")
                if self.rank == 0:  # counters are summed over ranks: one count per shard
                    print(f"warning: skipping {shard} (source {source.name!r}): not a readable tar shard ({index}); "
                          "counted as skipped/corrupt_shard", file=sys.stderr, flush=True)
                    self._plan_skipped["corrupt_shard"] += 1
                    self._plan_skipped_by_source[f"{source.name}/corrupt_shard"] += 1
                continue
            shards.append(shard)
            indexes.append(index)
        if not shards:
            raise DataError(f"data source {source.name!r} ({source.path}) has no readable shard")
        return SourceCursor(source.name, shards, indexes, seed)

    def _count_skip(self, source_id: int, reason: str) -> None:
        """Count a planning skip; a source whose recent samples were all skipped stops the run."""
        self._plan_skipped[reason] += 1
        self._plan_skipped_by_source[f"{self.names[source_id]}/{reason}"] += 1
        streak = self._streaks[source_id]
        streak[reason] += 1
        limit = min(self.max_skips_in_a_row, self.cursors[source_id].num_samples)
        if sum(streak.values()) >= limit:
            reasons = ", ".join(f"{r} {n}" for r, n in streak.most_common())
            raise DataError(
                f"data source {self.names[source_id]!r} ({self.sources[source_id].path}): the last "
                f"{sum(streak.values())} samples drawn from it were all skipped ({reasons}); nothing usable comes "
                f"from it with these settings (data.seq_length={self.spec.seq_length}). Check it with "
                f"`python -m data_pipelines.lint {self.sources[source_id].path}`, fix the data or the settings, or "
                "drop the source (data.max_skips_in_a_row sets this limit)")

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
        future = self._pool.submit(_plan_in_worker, job) if self._pool else None
        self._pending.append((job, future, self._planning_state()))

    def _still_there(self, position: tuple) -> bool:
        cursor = self.cursors[int(position[0])]
        return int(position[2]) < cursor.samples_in(cursor.resolve(position[1]))

    def _job_at(self, position: tuple) -> Job:
        source_id, index = int(position[0]), int(position[2])
        cursor = self.cursors[source_id]
        shard = cursor.resolve(position[1])
        return Job(source_id, shard, index, cursor.entry(shard, index))

    def _next_plan(self) -> SamplePlan:
        while True:
            while len(self._pending) < self._prefetch:
                self._submit()
            job, future, state_after = self._pending.popleft()
            result = future.result() if future else _plan_job(job, self.tokenizer, self.specs, self.names)
            self._planned = state_after
            if isinstance(result, str):
                self._count_skip(job.source_id, result)
                continue
            self._streaks[job.source_id].clear()
            return result

    # ---- choosing rows and decoding them -------------------------------------------------------
    def _row_state(self) -> dict:
        buffer = [[p.position[0], self.cursors[p.position[0]].relative(p.position[1]), p.position[2]]
                  for p in self.packer.buffer]
        return {**self._planned, "buffer": buffer,
                "plan_skipped": dict(self._plan_skipped),
                "plan_skipped_by_source": dict(self._plan_skipped_by_source)}

    def _choose_row(self) -> None:
        while len(self.packer.buffer) < self.pack_buffer:
            self.packer.add(self._next_plan())
        plans = self.packer.pop_row()
        jobs = [self._job_at(p.position) for p in plans]
        decoded = [self._pool.submit(_decode_in_worker, job, plan.media) if self._pool else None
                   for job, plan in zip(jobs, plans)]
        self._rows.append(_ChosenRow(plans, jobs, decoded, self._row_state()))

    def _use_row(self) -> list[Sample]:
        while len(self._rows) < self._rows_ahead:
            self._choose_row()
        row = self._rows.popleft()
        samples = []
        for plan, job, future in zip(row.plans, row.jobs, row.decoded):
            tiles = future.result() if future else _decode_job(job, plan.media, self.specs[job.source_id])
            if isinstance(tiles, str):  # opened when planned, failed to decode: a hole in the row
                self._decode_skipped[tiles] += 1
                self._decode_skipped_by_source[f"{plan.source}/{tiles}"] += 1
                continue
            self.samples_by_source[plan.source] += 1
            self.tokens_by_source[plan.source] += plan.length
            for note in plan.notes:
                self._note(plan.source, note)
            samples.append(plan.with_tiles(tiles))
        self._committed = row.state
        return samples

    def _note(self, source: str, note: str) -> None:
        """Count a switch a used sample took (`SamplePlan.notes`); the first of each kind is also
        printed, so no run changes its path without saying so."""
        if note not in self._warned and self.rank == 0:
            self._warned.add(note)
            print(f"warning: source {source!r}: {NOTE_MEANING.get(note, note)}; every such sample is counted in "
                  "metrics and summary.json (fallbacks_by_source)", file=sys.stderr, flush=True)
        self.fallbacks_by_source[f"{source}/{note}"] += 1

    def next_batch(self) -> PackedBatch:
        rows = [self._use_row() for _ in range(self.micro_batch_size)]
        return collate_rows(rows, self.spec.seq_length, self.tokenizer.special_ids[st.PAD], self.spec.tiling.tile_size,
                            self.loss_weighting)

    @property
    def skipped(self) -> Counter[str]:
        """Skipped samples by reason, as of the last used row."""
        return Counter(self._committed["plan_skipped"]) + self._decode_skipped

    @property
    def skipped_by_source(self) -> Counter[str]:
        return Counter(self._committed["plan_skipped_by_source"]) + self._decode_skipped_by_source

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
        """JSON-able state as of the last used row: planning position, the packer's buffer as
        sample positions, counters."""
        return {
            "draws": self._committed["draws"],
            "cursors": self._committed["cursors"],
            "world_size": self.world_size,
            "shard_fingerprints": {c.name: c.fingerprints() for c in self.cursors},
            "buffer": self._committed["buffer"],
            "skipped": dict(self.skipped),
            "skipped_by_source": dict(self.skipped_by_source),
            "samples_by_source": dict(self.samples_by_source),
            "tokens_by_source": dict(self.tokens_by_source),
            "fallbacks_by_source": dict(self.fallbacks_by_source),
        }

    def _reset_ahead(self) -> None:
        """Drop planned and chosen-but-unused work (a resume replaces it)."""
        futures = [f for _, f, _ in self._pending] + [f for row in self._rows for f in row.decoded]
        for future in futures:
            if future is not None:
                future.cancel()
        self._pending.clear()
        self._rows.clear()

    def _restart(self, draws: int, cursor_states: dict, buffer: list, counter_states: list[dict]) -> None:
        """Continue planning at `draws` with the packer holding `buffer` (sample positions) and
        the counters summed over `counter_states`."""
        self._reset_ahead()
        self.draws = draws
        for cursor in self.cursors:
            cursor.load_state(cursor_states[cursor.name])
        self._planned = self._planning_state()
        self._load_counters(counter_states)
        # Re-plan the buffered samples from their positions (in the pool when there is one): they
        # planned fine when first read, and planning is deterministic (and cheap: no pixels).
        self.packer.buffer = []
        # A buffered sample a changed shard no longer holds (data.accept_changed_shards) is counted, not read.
        gone = [p for p in buffer if not self._still_there(p)]
        for position in gone:
            self._plan_skipped["changed_shard"] += 1
            self._plan_skipped_by_source[f"{self.names[int(position[0])]}/changed_shard"] += 1
        buffer = [p for p in buffer if p not in gone]
        jobs = [self._job_at(position) for position in buffer]
        plans = (self._pool.map(_plan_in_worker, jobs) if self._pool else
                 (_plan_job(job, self.tokenizer, self.specs, self.names) for job in jobs))
        for position, plan in zip(buffer, plans):
            if isinstance(plan, str):  # the shard changed under the run: count it, go on
                self._plan_skipped[plan] += 1
                self._plan_skipped_by_source[f"{self.names[int(position[0])]}/{plan}"] += 1
            else:
                self.packer.add(plan)
        self._committed = self._row_state()

    def _check_shards_unchanged(self, state: dict) -> None:
        """A shard rewritten since the save (same name, other content) would resume on other data."""
        for cursor in self.cursors:
            changed = cursor.changed_shards(state.get("shard_fingerprints", {}).get(cursor.name, {}))
            if not changed:
                continue
            message = (f"source {cursor.name!r}: {len(changed)} shard(s) changed since the checkpoint: {changed[0]}"
                       f"{' ...' if len(changed) > 1 else ''}")
            if not self.accept_changed_shards:
                raise DataError(f"{message}; resuming would continue on other data: restore the shards, start a new "
                                "run directory, or set data.accept_changed_shards=true to resume anyway")
            if self.rank == 0:
                print(f"warning: {message}; resuming anyway (data.accept_changed_shards=true)", file=sys.stderr,
                      flush=True)

    def load_state_dict(self, state: dict) -> None:
        """Resume with the same world size as the run that saved `state`."""
        if state.get("world_size", 1) != self.world_size:
            raise ValueError("saved with a different world size: use load_resharded with every rank's state")
        self._check_shards_unchanged(state)
        self._restart(state["draws"], state["cursors"], state["buffer"], [state])

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
        self._check_shards_unchanged(states[0])
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
        cursor_states = {c.name: c.state() for c in self.cursors}
        leftovers = [p for s in states for p in s["buffer"]] + gap_positions
        # Counters are per rank and summed when reported: keep the old totals on new rank 0 only.
        self._restart(d_star, cursor_states, leftovers[self.rank::self.world_size],
                      states if self.rank == 0 else [])

    def _load_counters(self, states: list[dict]) -> None:
        def total(key: str) -> Counter:
            return sum((Counter(s.get(key, {})) for s in states), Counter())  # .get: states saved before a counter existed

        self._plan_skipped, self._plan_skipped_by_source = total("skipped"), total("skipped_by_source")
        self._decode_skipped, self._decode_skipped_by_source = Counter(), Counter()
        self.samples_by_source, self.tokens_by_source = total("samples_by_source"), total("tokens_by_source")
        self.fallbacks_by_source = total("fallbacks_by_source")


def sample_spec(cfg: DataConfig, tokens_per_tile: int, seed: int) -> SampleSpec:
    """The plain values sample building needs from the data section (plus the model's tokens per tile)."""
    return SampleSpec(
        seq_length=cfg.seq_length, tokens_per_tile=tokens_per_tile, tiling=cfg.tiling, video_fps=cfg.video_fps,
        max_frames=cfg.max_frames, reasoning_on_ratio=cfg.reasoning_on_ratio, chat_template=cfg.chat_template,
        loss_on_think=cfg.loss_on_think, seed=seed, evs=cfg.evs, max_json_bytes=cfg.max_json_bytes,
    )


def build_batch_stream(cfg: DataConfig, tokenizer: Tokenizer, *, tokens_per_tile: int, seed: int,
                       micro_batch_size: int, rank: int = 0, world_size: int = 1,
                       loss_weighting: str = "token") -> PackedBatchStream:
    """The batch stream of data-parallel rank `rank` of `world_size` for a recipe's data section."""
    return PackedBatchStream(cfg.sources, sample_spec(cfg, tokens_per_tile, seed), tokenizer,
                             micro_batch_size=micro_batch_size, pack_buffer=cfg.pack_buffer,
                             max_samples_per_pack=cfg.max_samples_per_pack, rank=rank, world_size=world_size,
                             num_workers=cfg.num_workers, loss_weighting=loss_weighting,
                             max_skips_in_a_row=cfg.max_skips_in_a_row, on_corrupt_shard=cfg.on_corrupt_shard,
                             accept_changed_shards=cfg.accept_changed_shards)
