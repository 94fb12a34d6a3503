"""The loss of the megatron-core engine: the native chunked cross-entropy with the output head split
over the vocabulary (tensor parallelism). Each rank multiplies a chunk of hidden states by its rows of
the head and megatron's `vocab_parallel_cross_entropy` combines the ranks' partial softmaxes, so no
rank ever holds a full-vocabulary logit tensor; chunks are recomputed in backward as in
`train.model.loss.ChunkedCrossEntropy`, whose call signature this shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.conversation import IGNORE_INDEX


@dataclass(frozen=True)
class VocabParallelChunkedCrossEntropy:
    chunk_size: int

    def __call__(self, hidden: Tensor, batch: PackedBatch, head_weight: Tensor) -> tuple[Tensor, int]:
        """hidden (B, L, D) whole on every tensor-parallel rank; head_weight this rank's (V / tp, D)."""
        rows = batch.targets != IGNORE_INDEX  # (B, L)
        hidden, targets, weights = hidden[rows], batch.targets[rows], batch.target_weights[rows]
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for start in range(0, hidden.shape[0], self.chunk_size):
            end = start + self.chunk_size
            total = total + checkpoint(_chunk_loss, hidden[start:end], targets[start:end], head_weight,
                                       weights[start:end], use_reentrant=False)
        return total, int(rows.sum())


def _chunk_loss(hidden: Tensor, targets: Tensor, head_weight: Tensor, weights: Tensor) -> Tensor:
    logits = hidden @ head_weight.t()  # (n, V / tp)
    # bf16 logits lose too much in the softmax: at least fp32, as the native loss.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = vocab_parallel_cross_entropy(logits.unsqueeze(1), targets.unsqueeze(1)).squeeze(1)  # (n,)
    return (losses * weights.to(losses.dtype)).sum()
