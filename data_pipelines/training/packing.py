"""Pack variable-length samples into fixed-length rows, and collate rows into a batch.

The packer keeps a buffer of built samples and emits one row at a time: the oldest sample
first (so nothing waits long), then the buffered samples that fill the row best (an exact
subset-sum that prefers older samples); the buffer refills after every row.
Each row is padded to `seq_length`; the batch describes sample boundaries with `cu_seqlens`
and `seq_idx` so attention and Mamba state never cross them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.conversation import IGNORE_INDEX
from data_pipelines.training.samples import Sample


class Packer:
    """Continuous-buffer packer: each row is the oldest buffered sample plus the buffered
    samples that fill the rest of the row best.

    Why this shape: a buffer that is emptied whole (Megatron-Energon's greedy knapsack) must
    also emit its poorly filled leftover packs; here the buffer refills after every row, so a
    leftover waits for partners instead. Forcing the oldest sample into every row keeps the
    buffer nearly FIFO: no sample waits more rows than there were samples ahead of it when it
    arrived, and on a VLM mix the longest wait lands within a few rows of the floor set by the
    tokens the buffer holds (tests/bench/bench_packing.py). The rest of the row is an exact
    subset-sum fill (`best_fill_subset`) rather than greedy largest-first, because greedy
    leaves gaps that another combination of the same buffer closes (a video capped just under
    seq_length needs the one short text that fits beside it); among equally full rows it
    prefers older samples.

    `max_wait_rows` > 0 adds a backstop: a sample that has waited that many rows goes into the
    next row (oldest first, while they fit). See `_forced` for when the bound can hold.
    Without it, decisions depend only on `buffer` order and lengths, so a loader that saves
    the buffer order resumes exactly; with it, also save `waits()` and restore `set_waits`.
    """

    def __init__(self, seq_length: int, max_samples_per_pack: int = 0, max_wait_rows: int = 0):
        self.seq_length = seq_length
        self.max_samples_per_pack = max_samples_per_pack
        self.max_wait_rows = max_wait_rows
        self.buffer: list[Sample] = []
        self.rows_emitted = 0
        # id(sample) -> (sample, rows_emitted when it arrived). Holding the sample keeps its id
        # from being reused by another object while the entry lives.
        self._arrivals: dict[int, tuple[Sample, int]] = {}

    def add(self, sample: Sample) -> None:
        if sample.length > self.seq_length:
            raise ValueError(f"sample {getattr(sample, 'key', '?')} has {sample.length} tokens "
                             f"> seq_length {self.seq_length}")
        self.buffer.append(sample)
        self._arrivals[id(sample)] = (sample, self.rows_emitted)

    def pop_row(self) -> list[Sample]:
        """Remove and return the next row's samples, in arrival order (the oldest first)."""
        if not self.buffer:
            raise IndexError("packer buffer is empty")
        if len(self._arrivals) != len(self.buffer):  # `buffer` was replaced from outside
            self._sync_arrivals()
        forced = self._forced()
        free = self.seq_length - sum(self.buffer[i].length for i in forced)
        taken = set(forced).union(self._fill(forced, free))
        row = [s for i, s in enumerate(self.buffer) if i in taken]
        self.buffer = [s for i, s in enumerate(self.buffer) if i not in taken]
        for sample in row:
            self._arrivals.pop(id(sample), None)
        self.rows_emitted += 1
        return row

    def waits(self) -> list[int]:
        """Rows each buffered sample has waited so far, aligned with `buffer`.

        A sample put into `buffer` directly (as a resumed loader does) counts as arriving now.
        """
        self._sync_arrivals()
        return [self.rows_emitted - self._arrivals[id(s)][1] for s in self.buffer]

    def _sync_arrivals(self) -> None:
        """Match the arrival records to `buffer`: drop the gone, stamp the unknown as now."""
        arrivals = {}
        for s in self.buffer:
            entry = self._arrivals.get(id(s))
            arrivals[id(s)] = entry if entry is not None and entry[0] is s else (s, self.rows_emitted)
        self._arrivals = arrivals

    def set_waits(self, waits: Sequence[int]) -> None:
        """Restore `waits()` (aligned with `buffer`, so never increasing), e.g. after a resume."""
        if len(waits) != len(self.buffer):
            raise ValueError(f"{len(waits)} waits for {len(self.buffer)} buffered samples")
        if any(older < younger for older, younger in zip(waits, waits[1:])):
            raise ValueError("waits must not increase along `buffer`: it is in arrival order")
        self._arrivals = {id(s): (s, self.rows_emitted - int(w)) for s, w in zip(self.buffer, waits)}

    def _forced(self) -> list[int]:
        """Buffer positions that must go into this row: the oldest, then overdue samples.

        An overdue sample (waited `max_wait_rows` rows) goes in oldest first while it fits, so
        the bound holds as long as the overdue samples of a row fit in it. No packer can beat
        the floor of ceil(buffered tokens / seq_length) - 1 rows (the buffer's tokens need that
        many rows to drain), about pack_buffer / samples-per-row rows: a bound below it cannot
        hold, and two near-full samples due in the same row go out one row apart.
        """
        forced = [0]
        if not self.max_wait_rows:
            return forced
        free = self.seq_length - self.buffer[0].length
        limit = self.max_samples_per_pack or len(self.buffer)
        due = self.rows_emitted - self.max_wait_rows  # arrived at or before this row: overdue
        for i in range(1, len(self.buffer)):
            sample = self.buffer[i]
            entry = self._arrivals.get(id(sample))
            if entry is None or entry[0] is not sample or entry[1] > due:
                break  # `buffer` is in arrival order: everyone after this one is younger
            if len(forced) < limit and sample.length <= free:
                forced.append(i)
                free -= sample.length
        return forced

    def _fill(self, forced: list[int], free: int) -> list[int]:
        """Positions of the samples that best fill `free` tokens, older samples preferred."""
        skip = set(forced)
        candidates = [i for i, s in enumerate(self.buffer) if i not in skip and s.length <= free]
        chosen = [candidates[p] for p in best_fill_subset([self.buffer[i].length for i in candidates], free)]
        room = self.max_samples_per_pack - len(forced) if self.max_samples_per_pack else len(chosen)
        if len(chosen) <= room:
            return chosen
        # Subset-sum ignores the sample cap; largest-first fills the most with the fewest samples.
        chosen = []
        for i in sorted(candidates, key=lambda i: -self.buffer[i].length):
            if len(chosen) < room and self.buffer[i].length <= free:
                chosen.append(i)
                free -= self.buffer[i].length
        return chosen


def best_fill_subset(lengths: Sequence[int], capacity: int) -> list[int]:
    """Positions of a subset of `lengths` whose sum is the largest one <= `capacity`.

    Exact subset-sum over a Python-int bitset (bit t set = total t reachable): one shift-or per
    item, so O(len(lengths) * capacity / 64) word operations, stopping at the first item that
    makes `capacity` reachable. Among equally full subsets it leaves out later positions when
    it can, so callers list the samples they prefer to emit (older ones) first. Keeps one
    bitset per item for the backtrack: len(lengths) * capacity / 8 bytes transiently.
    """
    if capacity <= 0 or not lengths:
        return []
    mask = (1 << (capacity + 1)) - 1
    reachable = [1]  # reachable[k]: totals reachable with the first k items
    for n in lengths:
        reachable.append((reachable[-1] | (reachable[-1] << n)) & mask)
        if reachable[-1] >> capacity & 1:
            break
    total = reachable[-1].bit_length() - 1
    chosen = []
    for k in range(len(reachable) - 2, -1, -1):  # item k takes reachable[k] to reachable[k + 1]
        if not reachable[k] >> total & 1:
            chosen.append(k)
            total -= lengths[k]
    return chosen[::-1]


def collate_rows(rows: Sequence[Sequence[Sample]], seq_length: int, pad_id: int, tile_size: int = 0,
                 loss_weighting: str = "token") -> PackedBatch:
    """Concatenate each row's samples, pad rows to seq_length, and describe the boundaries.

    A row may be empty (all padding). `tile_size` shapes the empty tile tensor of a batch
    without media (default: the first sample's). `loss_weighting` ("token" or "sqrt_turn")
    sets the targets' weights (`data_pipelines.training.batch.token_weights`)."""
    batch = len(rows)
    input_ids = torch.full((batch, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((batch, seq_length), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((batch, seq_length), dtype=torch.int64)
    seq_idx = torch.zeros((batch, seq_length), dtype=torch.int32)
    boundaries = [0]
    tiles, media_index, video_evs = [], [], []
    num_tiles = segment = 0
    num_samples = real = 0
    for r, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = sample.length
            input_ids[r, offset:offset + n] = torch.from_numpy(sample.input_ids)
            labels[r, offset:offset + n] = torch.from_numpy(sample.labels)
            position_ids[r, offset:offset + n] = torch.arange(n)
            seq_idx[r, offset:offset + n] = segment
            if len(sample.video_evs):
                videos = torch.from_numpy(sample.video_evs).clone()  # (V, 5), into batch coordinates:
                videos[:, 0] += num_tiles
                videos[:, 3] += r * seq_length + offset
                video_evs.append(videos)
            if sample.tiles.shape[0]:
                tiles.append(sample.tiles)
                media_index.append(torch.full((sample.tiles.shape[0],), segment, dtype=torch.int64))
                num_tiles += sample.tiles.shape[0]
            offset += n
            boundaries.append(r * seq_length + offset)
            segment += 1
            num_samples += 1
            real += n
        if offset < seq_length:  # padding: its own segment, never supervised
            position_ids[r, offset:] = torch.arange(seq_length - offset)
            seq_idx[r, offset:] = segment
            boundaries.append((r + 1) * seq_length)
            segment += 1
    tile_size = tile_size or next((s.tiles.shape[-1] for row in rows for s in row), 0)
    return PackedBatch.build(
        input_ids, labels, seq_idx, torch.tensor(boundaries, dtype=torch.int32),
        torch.cat(tiles) if tiles else torch.zeros(0, 3, tile_size, tile_size, dtype=torch.uint8),
        video_evs=torch.cat(video_evs) if video_evs else None, loss_weighting=loss_weighting,
        position_ids=position_ids,
        media_sample_index=torch.cat(media_index) if media_index else torch.zeros(0, dtype=torch.int64),
        num_samples=num_samples, num_real_tokens=real,
    )


def fill_ratio(batch: PackedBatch) -> float:
    return batch.num_real_tokens / batch.input_ids.numel()



