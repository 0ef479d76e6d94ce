"""Training augmentations: reproducible from a generator, within the published bounds."""

from __future__ import annotations

import pytest
import torch

from avsiam.data.augment import (
    add_noise,
    mix_waveforms,
    mixup_lambda,
    random_time_shift,
    soft_targets,
    spec_augment,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fbank(frames: int = 64, bins: int = 16) -> torch.Tensor:
    return torch.randn(frames, bins, generator=_gen(1234)) - 5.0


@pytest.mark.parametrize(
    "augment",
    [
        random_time_shift,
        add_noise,
        lambda fbank, g: spec_augment(fbank, 8, 20, g),
    ],
)
def test_same_seed_same_result_and_the_global_rng_is_untouched(augment):
    fbank = _fbank()
    torch.manual_seed(0)
    global_state = torch.get_rng_state()

    first, again, other = augment(fbank, _gen(7)), augment(fbank, _gen(7)), augment(fbank, _gen(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_time_shift_is_a_circular_roll_over_the_full_range():
    frames = 16
    fbank = torch.arange(frames, dtype=torch.float32)[:, None].expand(frames, 4)
    residues = set()
    for seed in range(400):
        shifted = random_time_shift(fbank, _gen(seed))
        residue = int(-shifted[0, 0]) % frames
        assert torch.equal(shifted, torch.roll(fbank, residue, dims=0))
        residues.add(residue)
    assert residues == set(range(frames))


def test_noise_is_positive_and_below_a_tenth():
    fbank = _fbank()
    scales = []
    for seed in range(50):
        added = add_noise(fbank, _gen(seed)) - fbank
        assert added.shape == fbank.shape
        assert (added >= 0).all() and (added < 0.1 + 1e-6).all()
        scales.append(added.max().item())
    # One scale per sample, drawn from U(0, 0.1): some samples are barely touched.
    assert min(scales) < 0.02 and max(scales) > 0.08


def test_spec_augment_masks_one_band_each_way_within_bounds():
    frames, bins, freqm, timem = 100, 32, 12, 30
    fbank = torch.full((frames, bins), -3.0)
    time_widths, freq_widths = set(), set()
    for seed in range(300):
        masked = spec_augment(fbank, freqm, timem, _gen(seed))
        zero = masked == 0
        zero_rows, zero_cols = zero.all(dim=1), zero.all(dim=0)
        # Every zero lies in a fully masked row or column, the rest is untouched.
        assert torch.equal(zero, zero_rows[:, None] | zero_cols[None, :])
        assert (masked[~zero] == -3.0).all()
        for band, limit, widths in ((zero_rows, timem, time_widths), (zero_cols, freqm, freq_widths)):
            positions = band.nonzero().flatten()
            if positions.numel():
                assert positions[-1] - positions[0] + 1 == positions.numel()  # one contiguous band
            assert positions.numel() < limit
            widths.add(positions.numel())
    assert 0 in time_widths and timem - 1 in time_widths
    assert 0 in freq_widths and freqm - 1 in freq_widths


def test_spec_augment_with_zero_widths_is_the_identity():
    fbank = _fbank()
    assert torch.equal(spec_augment(fbank, 0, 0, _gen(0)), fbank)


def test_spec_augment_rejects_masks_wider_than_the_input():
    with pytest.raises(ValueError, match="freqm"):
        spec_augment(_fbank(64, 16), 17, 10, _gen(0))


def test_mixup_lambda_is_a_reproducible_beta_draw():
    assert mixup_lambda(10.0, _gen(3)) == mixup_lambda(10.0, _gen(3))
    g = _gen(0)
    draws = torch.tensor([mixup_lambda(10.0, g) for _ in range(4000)])
    assert ((draws > 0) & (draws < 1)).all()
    assert abs(draws.mean().item() - 0.5) < 0.01
    # Var of Beta(a, a) is 1 / (4 (2a + 1)).
    assert abs(draws.var().item() - 1 / 84) < 0.002
    with pytest.raises(ValueError, match="alpha"):
        mixup_lambda(0.0, g)


def test_mix_waveforms_pads_or_cuts_the_partner():
    waveform = torch.ones(6)
    torch.testing.assert_close(
        mix_waveforms(waveform, torch.full((3,), 2.0), 0.25), torch.tensor([1.75, 1.75, 1.75, 0.25, 0.25, 0.25])
    )
    torch.testing.assert_close(mix_waveforms(waveform, torch.arange(10.0), 0.5), 0.5 + 0.5 * torch.arange(6.0))
    torch.testing.assert_close(mix_waveforms(waveform, torch.zeros(2), 1.0), waveform)


def test_targets_without_mixup_set_positives():
    targets = soft_targets([1, 3], num_classes=5, smoothing=0.1)
    torch.testing.assert_close(targets, torch.tensor([0.02, 0.9, 0.02, 0.9, 0.02]))


def test_targets_with_mixup_add_weighted_labels():
    targets = soft_targets([0, 2], num_classes=4, smoothing=0.1, labels_b=[2, 3], lam=0.7)
    eps = 0.1 / 4
    expected = torch.tensor([eps + 0.7 * 0.9, eps, eps + 0.9, eps + 0.3 * 0.9])
    torch.testing.assert_close(targets, expected)
    # Disjoint label sets: smoothing mass + each clip's weight per label.
    disjoint = soft_targets([0], num_classes=4, smoothing=0.1, labels_b=[1, 2], lam=0.6)
    torch.testing.assert_close(disjoint.sum(), torch.tensor(0.1 + 0.6 * 0.9 + 2 * 0.4 * 0.9))


def test_targets_without_smoothing_are_exact_multi_hot():
    assert torch.equal(soft_targets([0, 2], num_classes=3, smoothing=0.0), torch.tensor([1.0, 0.0, 1.0]))


def test_targets_reject_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        soft_targets([5], num_classes=5, smoothing=0.1)
    with pytest.raises(ValueError, match="repeat"):
        soft_targets([1, 1], num_classes=5, smoothing=0.1)
    with pytest.raises(ValueError, match="labels_b"):
        soft_targets([1], num_classes=5, smoothing=0.1, lam=0.5)
