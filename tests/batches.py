"""Exact comparison of packed batches: every tensor of the batch contract, not a fingerprint."""

from __future__ import annotations

from dataclasses import fields

import torch


def batch_tensors(batch) -> dict[str, torch.Tensor]:
    """Every tensor of a PackedBatch: ids, labels, targets and weights, positions, seq_idx,
    cu_seqlens, tiles and their sample index, EVS rows."""
    return {f.name: getattr(batch, f.name) for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        ta, tb = batch_tensors(a), batch_tensors(b)
        assert ta.keys() == tb.keys()
        for name in tb:
            assert ta[name].shape == tb[name].shape and torch.equal(ta[name], tb[name]), f"batch {i}: {name} differs"
        assert (a.num_samples, a.num_real_tokens) == (b.num_samples, b.num_real_tokens), f"batch {i}: counts differ"
