"""The loss of the megatron-core engine: the native chunked cross-entropy with the output head split
over the vocabulary (tensor parallelism). Each rank multiplies a chunk of hidden states by its rows of
the head and megatron's `vocab_parallel_cross_entropy` combines the ranks' partial softmaxes, so no
rank ever holds a full-vocabulary logit tensor.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import Tensor

from train.model.loss import ChunkedCrossEntropy


def vocab_parallel_chunk(hidden: Tensor, targets: Tensor, head_weight: Tensor, weights: Tensor) -> Tensor:
    """sum w * CE of one chunk of rows (n, D), whole on every rank, through this rank's head rows (V / tp, D)."""
    logits = hidden @ head_weight.t()  # (n, V / tp)
    # bf16 logits lose too much in the softmax: at least fp32, as the native loss.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = vocab_parallel_cross_entropy(logits.unsqueeze(1), targets.unsqueeze(1)).squeeze(1)  # (n,)
    return (losses * weights.to(losses.dtype)).sum()


def vocab_parallel_loss(chunk_size: int) -> ChunkedCrossEntropy:
    return ChunkedCrossEntropy(chunk_size, vocab_parallel_chunk)
