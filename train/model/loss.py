"""The language-model loss of a packed batch: one entry point an engine can swap.

`ChunkedCrossEntropy(chunk_size)(hidden, targets, weights, head_weight)` returns the weighted sum of
next-token cross-entropy over the batch's targets and how many targets there were. Targets and
their weights come with the batch (`data_pipelines.training.batch`: next-token ids that never
cross a sample boundary, per-token or per-turn weights), so every engine computes the same loss;
an engine whose output head is split over ranks passes its own vocab-parallel loss with the same
call signature instead of this one.

The caller divides by the global sum of target weights (all micro-batches and ranks), so packing
and accumulation never change a token's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from data_pipelines.training.conversation import IGNORE_INDEX


class LanguageModelLoss(Protocol):
    def __call__(self, hidden: Tensor, targets: Tensor, weights: Tensor, head_weight: Tensor) -> tuple[Tensor, int]:
        """hidden (..., D) final normalised states, targets and weights (...) in the same layout ->
        (weighted loss sum, number of targets)."""


ChunkLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def cross_entropy_chunk(hidden: Tensor, targets: Tensor, head_weight: Tensor, weights: Tensor) -> Tensor:
    """sum w * CE of one chunk of rows (n, D) through the whole head (V, D)."""
    logits = hidden @ head_weight.t()
    # bf16 logits lose too much in the softmax: accumulate in at least fp32.
    losses = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")
    return (losses * weights.to(losses.dtype)).sum()


@dataclass(frozen=True)
class ChunkedCrossEntropy:
    """Cross-entropy through the output head `chunk_size` rows at a time (see `chunked_cross_entropy`).
    `chunk_loss` computes one chunk: the whole head here; a vocabulary-parallel head passes its own
    (`train.engines.mcore.loss`)."""

    chunk_size: int
    chunk_loss: ChunkLoss = cross_entropy_chunk

    def __call__(self, hidden: Tensor, targets: Tensor, weights: Tensor, head_weight: Tensor) -> tuple[Tensor, int]:
        rows = targets != IGNORE_INDEX  # (B, L)
        loss = chunked_cross_entropy(hidden[rows], targets[rows], head_weight, self.chunk_size, weights[rows],
                                     self.chunk_loss)
        return loss, int(rows.sum())


def chunked_cross_entropy(hidden: Tensor, targets: Tensor, head_weight: Tensor, chunk_size: int,
                          weights: Tensor | None = None, chunk_loss: ChunkLoss = cross_entropy_chunk) -> Tensor:
    """sum w * CE(hidden @ head_weight.T, targets) computed `chunk_size` rows at a time.

    Each chunk is recomputed in backward (activation checkpointing), so at most one chunk of
    logits (chunk_size x V) exists at a time instead of L x V.
    """
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    if weights is None:
        weights = torch.ones(targets.shape, dtype=total.dtype, device=targets.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], head_weight,
                                   weights[start:end], use_reentrant=False)
    return total
