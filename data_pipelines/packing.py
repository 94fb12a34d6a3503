"""Pack variable-length samples into fixed-length rows, and collate rows into a batch.

The packer keeps a buffer of built samples and emits one row at a time: the oldest sample
first (so nothing waits long), then the largest buffered samples that still fit (best fit).
Each row is padded to `seq_length`; the batch describes sample boundaries with `cu_seqlens`
and `seq_idx` so attention and Mamba state never cross them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from data_pipelines.conversation import IGNORE_INDEX
from data_pipelines.samples import Sample


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64, -100 on padding and unsupervised tokens
    position_ids: torch.Tensor  # (B, L) int64, restarting at 0 per sample
    seq_idx: torch.Tensor  # (B, L) int32, segment index over the flattened batch (padding is its own segment)
    cu_seqlens: torch.Tensor  # (S + 1,) int32, segment boundaries over the flattened B * L tokens
    tiles: torch.Tensor  # (N, 3, T, T) uint8, media of all samples in token order
    media_sample_index: torch.Tensor  # (N,) int64, segment index of each tile's sample
    num_samples: int
    num_real_tokens: int

    @property
    def num_supervised_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class Packer:
    """Buffered best-fit packer emitting one well-filled row at a time."""

    def __init__(self, seq_length: int, max_samples_per_pack: int = 0):
        self.seq_length = seq_length
        self.max_samples_per_pack = max_samples_per_pack
        self.buffer: list[Sample] = []

    def add(self, sample: Sample) -> None:
        if sample.length > self.seq_length:
            raise ValueError(f"sample {sample.key} has {sample.length} tokens > seq_length {self.seq_length}")
        self.buffer.append(sample)

    def pop_row(self) -> list[Sample]:
        """Remove and return the samples of the next row (oldest first, then best fit)."""
        if not self.buffer:
            raise IndexError("packer buffer is empty")
        row = [self.buffer.pop(0)]
        free = self.seq_length - row[0].length
        limit = self.max_samples_per_pack or len(self.buffer) + 1
        while len(row) < limit:
            best = max((i for i, s in enumerate(self.buffer) if s.length <= free),
                       key=lambda i: self.buffer[i].length, default=None)
            if best is None:
                break
            sample = self.buffer.pop(best)
            row.append(sample)
            free -= sample.length
        return row


def collate_rows(rows: Sequence[Sequence[Sample]], seq_length: int, pad_id: int) -> PackedBatch:
    """Concatenate each row's samples, pad rows to seq_length, and describe the boundaries."""
    batch = len(rows)
    input_ids = torch.full((batch, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((batch, seq_length), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((batch, seq_length), dtype=torch.int64)
    seq_idx = torch.zeros((batch, seq_length), dtype=torch.int32)
    boundaries = [0]
    tiles, media_index = [], []
    segment = 0
    num_samples = real = 0
    for r, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = sample.length
            input_ids[r, offset:offset + n] = torch.from_numpy(sample.input_ids)
            labels[r, offset:offset + n] = torch.from_numpy(sample.labels)
            position_ids[r, offset:offset + n] = torch.arange(n)
            seq_idx[r, offset:offset + n] = segment
            if sample.tiles.shape[0]:
                tiles.append(sample.tiles)
                media_index.append(torch.full((sample.tiles.shape[0],), segment, dtype=torch.int64))
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
    tile_size = rows[0][0].tiles.shape[-1] if rows and rows[0] else 0
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        seq_idx=seq_idx,
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        tiles=torch.cat(tiles) if tiles else torch.zeros(0, 3, tile_size, tile_size, dtype=torch.uint8),
        media_sample_index=torch.cat(media_index) if media_index else torch.zeros(0, dtype=torch.int64),
        num_samples=num_samples,
        num_real_tokens=real,
    )


def fill_ratio(batch: PackedBatch) -> float:
    return batch.num_real_tokens / batch.input_ids.numel()



