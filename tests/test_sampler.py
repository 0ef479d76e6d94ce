"""Distributed sampler: one pass per epoch in total, deterministic, resumable, balanced."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avsiam.data.sampler import DistributedClipSampler, class_balanced_weights, mix_seed


def _epoch(n, world, epoch=0, **kw):
    shards = []
    for rank in range(world):
        s = DistributedClipSampler(n, world_size=world, rank=rank, **kw)
        s.set_epoch(epoch)
        shards.append(list(s))
    return shards


@given(n=st.integers(1, 300), world=st.integers(1, 9), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_an_epoch_covers_the_dataset_once_across_ranks(n, world, seed, epoch):
    shards = _epoch(n, world, epoch, seed=seed)
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)  # lock-step ranks
    indices = [i for s in shards for i, _ in s]
    assert set(indices) == set(range(n))
    assert len(indices) - n == per_rank * world - n < world  # only the padding repeats
    seeds = [sd for s in shards for _, sd in s]
    assert len(set(seeds)) == len(seeds)  # every sample position gets its own augmentation seed


@given(n=st.integers(1, 200), world=st.integers(1, 7))
def test_evaluation_shards_are_disjoint_without_padding(n, world):
    shards = _epoch(n, world, shuffle=False, pad=False)
    assert sorted(i for s in shards for i, _ in s) == list(range(n))


@given(n=st.integers(2, 200), world=st.integers(1, 5), start=st.integers(0, 40), seed=st.integers(0, 1000))
def test_resume_mid_epoch_continues_with_the_same_keys(n, world, start, seed):
    full = _epoch(n, world, epoch=3, seed=seed)
    for rank in range(world):
        s = DistributedClipSampler(n, world_size=world, rank=rank, seed=seed)
        k = min(start, len(full[rank]))
        s.load_state_dict({"epoch": 3, "start": k, "seed": seed})
        assert list(s) == full[rank][k:]
        assert len(s) == len(full[rank]) - k


def test_epochs_and_seeds_change_the_order_deterministically():
    a, b = _epoch(100, 2, epoch=0), _epoch(100, 2, epoch=1)
    assert a == _epoch(100, 2, epoch=0) and a != b
    assert _epoch(100, 2, seed=1) != a
    assert mix_seed(0, 1) != mix_seed(1, 0)


def _csr(labels):
    return np.cumsum([0] + [len(x) for x in labels]), np.array([c for x in labels for c in x], dtype=np.int64)


def test_class_balanced_weights_follow_cavmae_rule():
    labels = [[0], [0], [0], [1], [0, 1]]
    w = class_balanced_weights(*_csr(labels), 3)
    n0, n1 = 4, 2
    assert w[0] == pytest.approx(1000 / (n0 + 0.01))
    assert w[4] == pytest.approx(1000 / (n0 + 0.01) + 1000 / (n1 + 0.01))


@given(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=4, unique=True), min_size=1, max_size=40))
def test_class_balanced_weights_equal_the_per_sample_rule(labels):
    """The vectorised weights against the rule written out sample by sample."""
    counts = Counter(c for x in labels for c in x)
    expected = [sum(1000 / (counts[c] + 0.01) for c in x) for x in labels]
    np.testing.assert_allclose(class_balanced_weights(*_csr(labels), 7), expected, rtol=1e-12)


@given(n=st.integers(1, 100), world=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_weighted_epoch_draws_n_in_total_and_never_zero_weight(n, world, seed):
    weights = np.ones(n)
    weights[0] = 0.0 if n > 1 else 1.0
    shards = _epoch(n, world, seed=seed, weights=weights)
    draws = [i for s in shards for i, _ in s]
    assert len(draws) == -(-n // world) * world  # N draws per epoch in total (plus padding), not W*N
    if n > 1:
        assert 0 not in draws


def test_class_balanced_sampling_balances_classes():
    labels = [[0]] * 900 + [[1]] * 90 + [[2]] * 10
    weights = class_balanced_weights(*_csr(labels), 3)
    counts = Counter()
    for epoch in range(5):
        for shard in _epoch(len(labels), 2, epoch, weights=weights):
            counts.update(labels[i][0] for i, _ in shard)
    total = sum(counts.values())
    for c in range(3):
        assert counts[c] / total == pytest.approx(1 / 3, abs=0.04)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        DistributedClipSampler(10, world_size=2, rank=2)
    with pytest.raises(ValueError, match="at least one sample"):
        DistributedClipSampler(0)
    with pytest.raises(ValueError, match="one non-negative number per sample"):
        DistributedClipSampler(3, weights=[1, -1, 1])
    s = DistributedClipSampler(10, seed=1)
    with pytest.raises(ValueError, match="saved with seed 2"):
        s.load_state_dict({"epoch": 0, "start": 0, "seed": 2})
