"""Training augmentations of the published recipe, every random draw from an explicit generator.

Taking a ``torch.Generator`` (never the global RNG, ``numpy.random`` or ``random``) makes a
sample's augmentation a function of its seed alone, whatever the worker count or order.
As published, a finetuning example is built in this order: mixup of waveforms (and of
targets) -> fbank -> :func:`spec_augment` -> normalisation -> :func:`add_noise` ->
:func:`random_time_shift`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def random_time_shift(fbank: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Roll ``fbank [T, F]`` along time by a random integer in ``[-T, T-1]``, as published.

    The roll is circular: the end-of-clip zero padding (and the clip's end) wrap around into
    the middle of the spectrogram. Kept for fidelity to the published recipe.
    """
    frames = fbank.shape[0]
    shift = int(torch.randint(-frames, frames, (), generator=generator))
    return torch.roll(fbank, shift, dims=0)


def add_noise(fbank: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add ``U(0, 1)`` noise per element, scaled by one ``U(0, 1) / 10`` draw per sample.

    Applied to the normalised fbank as published; the noise is positive (mean 0.025).
    """
    noise = torch.rand(fbank.shape, generator=generator, dtype=fbank.dtype)
    scale = torch.rand((), generator=generator, dtype=fbank.dtype) / 10
    return fbank + noise * scale


def spec_augment(fbank: torch.Tensor, freqm: int, timem: int, generator: torch.Generator) -> torch.Tensor:
    """One frequency mask and one time mask of ``fbank [T, F]``, masked cells set to 0.

    Widths are uniform in ``[0, freqm)`` and ``[0, timem)``, positions uniform among those that
    fit (torchaudio's ``FrequencyMasking``/``TimeMasking``). As published it runs on the
    un-normalised fbank, so a masked cell becomes ``(0 - mean) / std`` after normalisation.
    """
    frames, bins = fbank.shape
    if not (0 <= freqm <= bins and 0 <= timem <= frames):
        raise ValueError(f"need 0 <= freqm <= {bins} and 0 <= timem <= {frames}, got freqm={freqm}, timem={timem}")
    keep_bins = _keep_mask(bins, freqm, generator)
    keep_frames = _keep_mask(frames, timem, generator)
    return fbank.masked_fill(~(keep_frames[:, None] & keep_bins[None, :]), 0.0)


def _keep_mask(size: int, max_width: int, generator: torch.Generator) -> torch.Tensor:
    """False on one random band of ``floor(U * max_width)`` cells, True elsewhere (torchaudio's
    ``mask_along_axis``: the start is drawn within ``size`` minus the real-valued width)."""
    width = torch.rand((), generator=generator) * max_width
    start = (torch.rand((), generator=generator) * (size - width)).long()
    index = torch.arange(size)
    return (index < start) | (index >= start + width.long())


def mixup_lambda(alpha: float, generator: torch.Generator) -> float:
    """A mixing weight drawn from ``Beta(alpha, alpha)``."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    # torch's Beta/Gamma samplers take no generator; a numpy Generator seeded from one draw of
    # ours keeps lambda a function of `generator` alone.
    seed = int(torch.randint(2**63 - 1, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_waveforms(waveform: torch.Tensor, partner: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * waveform + (1 - lam) * partner``, the partner zero-padded or cut to the length of
    ``waveform`` (1-D, 16 kHz)."""
    if waveform.ndim != 1 or partner.ndim != 1:
        raise ValueError(f"mix_waveforms takes 1-D waveforms, got {tuple(waveform.shape)} and {tuple(partner.shape)}")
    length = waveform.shape[0]
    partner = F.pad(partner, (0, length - partner.shape[0])) if partner.shape[0] < length else partner[:length]
    return lam * waveform + (1.0 - lam) * partner


def soft_targets(
    labels_a: Sequence[int],
    num_classes: int,
    smoothing: float,
    labels_b: Sequence[int] | None = None,
    lam: float = 1.0,
) -> torch.Tensor:
    """Label-smoothed multi-hot (or one-hot) targets ``[num_classes]``, as published.

    Every entry starts at ``smoothing / num_classes``. Without a partner the positives are
    *set* to ``1 - smoothing``. With mixup (``labels_b`` given) each label of clip a gets
    ``+= lam * (1 - smoothing)`` and each label of clip b ``+= (1 - lam) * (1 - smoothing)``,
    so a label both clips carry reaches ``smoothing / num_classes + 1 - smoothing``.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if not 0 <= lam <= 1:
        raise ValueError(f"the mixup weight must be in [0, 1], got {lam}")
    if labels_b is None and lam != 1.0:
        raise ValueError(f"a mixup weight ({lam}) needs the partner's labels (labels_b)")
    index_a = _label_index(labels_a, num_classes)
    targets = torch.full((num_classes,), smoothing / num_classes)
    if labels_b is None:
        targets[index_a] = 1.0 - smoothing
        return targets
    index_b = _label_index(labels_b, num_classes)
    targets[index_a] += lam * (1.0 - smoothing)
    targets[index_b] += (1.0 - lam) * (1.0 - smoothing)
    return targets


def _label_index(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    index = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if ((index < 0) | (index >= num_classes)).any():
        raise ValueError(f"labels {index.tolist()} fall outside [0, {num_classes})")
    if index.unique().numel() != index.numel():
        # An indexed += counts a repeated label once; the published loop would count it twice.
        raise ValueError(f"labels {index.tolist()} repeat a class")
    return index
