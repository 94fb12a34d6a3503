"""The packing benchmark's pieces: the length mix, the reference packers, and our Packer's
guarantees (valid rows, every sample once when drained, the wait bound, determinism).

The benchmark itself (tests/bench/bench_packing.py) reports fill and speed; these tests only
make sure what it measures is right, on slices small enough to stay well under a second.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from data_pipelines.training.packing import Packer, best_fill_subset
from tests.bench.bench_packing import (
    LengthOnly,
    check_rows,
    draw_mix,
    first_fit_decreasing,
    lengths_at,
    megatron_greedy_knapsack,
    pack_megatron,
    pack_ours,
    wait_floor,
)

SEQ = 16_384


@pytest.fixture(scope="module")
def mix_lengths() -> np.ndarray:
    """2,000 samples of the benchmark mix at 16K (the full 20,000 is the benchmark's job)."""
    return lengths_at(draw_mix(num=2_000, seed=0), SEQ)


def _random_lengths(n: int, seed: int, high: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, high) for _ in range(n)]


def test_mix_has_the_stated_kinds_and_fits_seq_length():
    mix = draw_mix(num=1_000, seed=0)
    kinds, counts = np.unique(mix.kind, return_counts=True)
    assert dict(zip(kinds.tolist(), counts.tolist())) == {"image": 400, "multi_image": 100, "video": 150, "text": 350}
    for seq in (SEQ, 49_152):
        lengths = lengths_at(mix, seq)
        assert lengths.min() >= 1 and lengths.max() <= seq
    video = lengths_at(mix, SEQ)[mix.kind == "video"]
    assert (video > SEQ - 256).any()  # 8..128 frames at 16K: long videos are capped just under it
    image = mix.media_tokens[mix.kind == "image"]
    assert image.min() >= 256 and image.max() <= 13 * 256 and (image % 256 == 0).all()


def test_mix_is_deterministic_per_seed():
    a, b, c = draw_mix(num=500, seed=0), draw_mix(num=500, seed=0), draw_mix(num=500, seed=1)
    assert (lengths_at(a, SEQ) == lengths_at(b, SEQ)).all()
    assert (lengths_at(a, SEQ) != lengths_at(c, SEQ)).any()


def test_megatron_greedy_knapsack_takes_the_longest_that_fits():
    # Sorted [10, 30, 45, 50, 60]: pack 1 = 60 + 30 + 10, pack 2 = 50 + 45.
    assert megatron_greedy_knapsack([60, 50, 30, 10, 45], 100) == [[0, 2, 3], [1, 4]]
    with pytest.raises(ValueError):
        megatron_greedy_knapsack([101], 100)
    with pytest.raises(ValueError):
        first_fit_decreasing([101], 100)


@pytest.mark.parametrize("seed", range(3))
def test_reference_packers_emit_valid_rows(seed):
    lengths = _random_lengths(300, seed)
    check_rows(megatron_greedy_knapsack(lengths, 100), lengths, 100)
    check_rows(first_fit_decreasing(lengths, 100), lengths, 100)


def test_check_rows_catches_a_cheat():
    with pytest.raises(AssertionError):
        check_rows([[0, 1]], [60, 50], 100)  # over seq_length
    with pytest.raises(AssertionError):
        check_rows([[0], [0]], [60, 50], 100)  # one sample twice, one never
    with pytest.raises(AssertionError):
        check_rows([[0, 0], [1]], [10, 50], 100)  # twice inside one row


def test_ffd_matches_the_known_optimum():
    # 6 x 60 and 6 x 40 pair up perfectly: 6 full rows.
    rows = first_fit_decreasing([60, 40] * 6, 100)
    assert len(rows) == 6 and all(len(r) == 2 for r in rows)


def test_megatron_buffers_and_waits(mix_lengths):
    run = pack_megatron(mix_lengths, SEQ, buffer=100)
    check_rows(run.rows, mix_lengths, SEQ)
    assert run.waits.min() == 0 and run.waits.max() >= wait_floor(run, mix_lengths, SEQ)


@pytest.mark.parametrize("seed", range(4))
def test_best_fill_subset_is_exact(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(9)]
    capacity = rng.randint(1, 100)
    best = max(sum(c) for k in range(len(lengths) + 1) for c in itertools.combinations(lengths, k)
               if sum(c) <= capacity)
    chosen = best_fill_subset(lengths, capacity)
    assert len(set(chosen)) == len(chosen) and sum(lengths[p] for p in chosen) == best


def test_best_fill_subset_prefers_earlier_positions():
    assert best_fill_subset([30, 30, 30], 30) == [0]
    assert best_fill_subset([], 10) == [] and best_fill_subset([5], 0) == []


def test_packer_closes_a_gap_that_greedy_leaves():
    # Greedy largest-first would take 50 + 30 and strand 20 tokens; 50 + 25 + 25 fills the row.
    packer = Packer(seq_length=100)
    for n in (50, 30, 25, 25):
        packer.add(LengthOnly(n, n))
    assert [s.length for s in packer.pop_row()] == [50, 25, 25]
    assert [s.length for s in packer.pop_row()] == [30]


def test_packer_respects_max_samples_per_pack():
    packer = Packer(seq_length=100, max_samples_per_pack=2)
    for i, n in enumerate([40, 10, 10, 10, 10, 20]):
        packer.add(LengthOnly(n, i))
    rows = []
    while packer.buffer:
        rows.append([s.index for s in packer.pop_row()])
    assert max(map(len, rows)) <= 2
    check_rows(rows, [40, 10, 10, 10, 10, 20], 100)


@pytest.mark.parametrize("buffer", [1, 7, 64])
def test_ours_drains_every_sample_once_within_seq_length(mix_lengths, buffer):
    run = pack_ours(mix_lengths, SEQ, buffer)
    check_rows(run.rows, mix_lengths, SEQ)  # every sample exactly once, no row over seq_length
    assert run.peak_buffered == buffer
    assert run.waits.max() <= buffer - 1  # the oldest goes into every row


def test_ours_is_deterministic(mix_lengths):
    assert pack_ours(mix_lengths, SEQ, 64).rows == pack_ours(mix_lengths, SEQ, 64).rows
    assert pack_ours(mix_lengths, SEQ, 64, max_wait_rows=20).rows == pack_ours(mix_lengths, SEQ, 64, max_wait_rows=20).rows


def test_max_wait_bound_is_honoured_where_it_binds():
    # Three 70s each need a row of their own, and a 30 always fills beside them exactly, so the
    # 20 is passed over until it is the oldest (3 rows). Bound 2: it joins the third 70 instead.
    lengths = [70, 70, 70, 20, 30, 30, 30] + [70, 30] * 10
    free_run = pack_ours(lengths, 100, buffer=6)
    bounded = pack_ours(lengths, 100, buffer=6, max_wait_rows=2)
    assert free_run.waits[3] == 3 and free_run.waits.max() == 3
    check_rows(bounded.rows, lengths, 100)
    assert bounded.waits.max() <= 2 and len(bounded.rows) == len(free_run.rows)


def test_max_wait_bound_on_the_mix(mix_lengths):
    """A bound tighter than the free run's longest wait (so it has to force samples out), above the
    floor no packer beats: it holds on the 16K mix, and every sample still goes out once."""
    free_run = pack_ours(mix_lengths, SEQ, 64)
    floor = wait_floor(free_run, mix_lengths, SEQ)
    assert free_run.waits.max() >= floor  # nobody beats the floor
    bound = free_run.waits.max() - 1
    assert bound > floor, "the mix leaves no room between the floor and the free run's wait"
    bounded = pack_ours(mix_lengths, SEQ, 64, max_wait_rows=bound)
    check_rows(bounded.rows, mix_lengths, SEQ)
    assert free_run.waits.max() > bound >= bounded.waits.max()
    assert len(bounded.rows) == len(free_run.rows)  # forcing the overdue out cost no extra row here


def test_waits_survive_a_rebuilt_buffer():
    packer = Packer(seq_length=100, max_wait_rows=5)
    for n in (90, 90, 90):
        packer.add(LengthOnly(n, n))
    packer.pop_row()
    assert packer.waits() == [1, 1]
    rebuilt = [LengthOnly(s.length, s.index) for s in packer.buffer]  # what a resume does
    packer.buffer = rebuilt
    assert packer.waits() == [0, 0]  # unknown samples count as arriving now...
    packer.set_waits([1, 1])  # ...unless the saved waits are restored
    assert packer.waits() == [1, 1]
    with pytest.raises(ValueError):
        packer.set_waits([0, 1])  # the buffer is in arrival order: waits never increase
