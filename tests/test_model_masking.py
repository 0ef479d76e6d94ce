"""Vectorised masking: kept counts, time-frequency structure, buckets, determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avsiam.model.masking import (
    gather_tokens,
    keep_lowest,
    mae_mask,
    num_kept,
    ratio_buckets,
    time_frequency_noise,
    uniform_noise,
)

RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)
AUDIO_GRID, VISUAL_TOKENS = (8, 64), 196  # patch 16


@pytest.mark.parametrize(
    ("ratio", "audio_kept", "visual_kept", "marked"),
    [(0.0, 512, 196, 0), (0.2, 409, 156, 120), (0.4, 307, 117, 230), (0.6, 204, 78, 322), (0.8, 102, 39, 396)],
)
def test_kept_and_marked_counts_match_the_published_table(ratio, audio_kept, visual_kept, marked) -> None:
    assert num_kept(512, ratio) == audio_kept
    assert num_kept(VISUAL_TOKENS, ratio) == visual_kept
    noise = time_frequency_noise(16, AUDIO_GRID, ratio, generator=torch.Generator().manual_seed(0))
    is_marked = noise > 1
    assert (is_marked.sum(dim=1) == marked).all()
    kept = keep_lowest(noise, audio_kept)
    assert kept.shape == (16, audio_kept)
    assert (kept.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct tokens
    kept_marked = is_marked.gather(1, kept).sum(dim=1)
    removed = 512 - audio_kept
    # marked tokens go first: all of them when they are fewer than the removals, else only marked ones
    assert (kept_marked == max(0, marked - removed)).all()


def test_marked_tokens_are_whole_time_columns_and_frequency_rows() -> None:
    freq, time = AUDIO_GRID
    noise = time_frequency_noise(32, AUDIO_GRID, 0.6, generator=torch.Generator().manual_seed(1))
    marked = (noise > 1).view(32, freq, time)
    full_rows, full_cols = marked.all(dim=2), marked.all(dim=1)
    assert (full_rows.sum(dim=1) == 3).all() and (full_cols.sum(dim=1) == 26).all()
    assert torch.equal(marked, full_rows[:, :, None] | full_cols[:, None, :])
    # rows and columns differ between samples: the draw is per sample
    assert not torch.equal(full_cols[0], full_cols[1])


def test_masking_is_deterministic_under_a_seed_and_a_generator() -> None:
    torch.manual_seed(3)
    a = (time_frequency_noise(8, AUDIO_GRID, 0.4), uniform_noise(8, 196), ratio_buckets(10, 5))
    torch.manual_seed(3)
    b = (time_frequency_noise(8, AUDIO_GRID, 0.4), uniform_noise(8, 196), ratio_buckets(10, 5))
    torch.testing.assert_close(a[:2], b[:2])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(uniform_noise(4, 16, generator=g1), uniform_noise(4, 16, generator=g2))
    assert not torch.equal(uniform_noise(4, 16, generator=g1), uniform_noise(4, 16, generator=g2.manual_seed(6)))


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 200), num_ratios=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_ratio_buckets_partition_the_batch_evenly(batch: int, num_ratios: int, seed: int) -> None:
    buckets = ratio_buckets(batch, num_ratios, generator=torch.Generator().manual_seed(seed))
    assert len(buckets) == num_ratios
    assert sorted(torch.cat(buckets).tolist()) == list(range(batch))
    sizes = [len(b) for b in buckets]
    assert max(sizes) - min(sizes) <= 1


def test_ratio_buckets_at_batch_96_and_below_the_number_of_ratios() -> None:
    sizes = sorted(len(b) for b in ratio_buckets(96, 5, generator=torch.Generator().manual_seed(0)))
    assert sizes == [19, 19, 19, 19, 20]
    # B < R: some ratios get no clip, and which ones rotates from step to step
    generator = torch.Generator().manual_seed(0)
    empty = {tuple(len(b) == 0 for b in ratio_buckets(3, 5, generator=generator)) for _ in range(30)}
    assert len(empty) > 1 and all(sum(e) == 2 for e in empty)


def test_mae_mask_splits_and_restores() -> None:
    tokens = torch.randn(4, 20, 3)
    mask = mae_mask(uniform_noise(4, 20, generator=torch.Generator().manual_seed(0)), num_kept(20, 0.75))
    assert mask.keep.shape == (4, 5) and mask.removed.shape == (4, 15)
    assert (torch.cat([mask.keep, mask.removed], dim=1).sort(dim=1).values == torch.arange(20)).all()
    shuffled = torch.cat([gather_tokens(tokens, mask.keep), gather_tokens(tokens, mask.removed)], dim=1)
    torch.testing.assert_close(gather_tokens(shuffled, mask.restore), tokens)
