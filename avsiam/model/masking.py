"""Vectorised token masking: unstructured, time-frequency structured, and multi-ratio buckets.

Masking is "keep the tokens with the lowest noise", as in MAE. Every function draws its random
numbers from ``generator`` (on the generator's device) or, when it is None, from the global RNG
on ``device``, so a step is reproducible under ``torch.manual_seed``; results live on ``device``.
Nothing here loops over samples: the published code's per-sample ``random.sample`` loop becomes
a batched random subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The published "tf" masking marks int(T * r * 0.7) whole time columns and int(F * r * 0.7) whole
# frequency rows; the removals these rows and columns do not cover are random tokens.
TF_MARKED_FRACTION = 0.7
# Added to U(0, 1) noise: marked tokens sort after every unmarked one (removed first), and
# among themselves stay in random order, so when more tokens are marked than are removed a
# random subset of the marked ones survives, as in the published code.
MARKED_NOISE_OFFSET = 1.1


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens kept at mask ratio ``ratio``: int(N * (1 - r)), the published rounding."""
    return int(num_tokens * (1 - ratio))


def _device_for(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    return generator.device if generator is not None else torch.device(device or "cpu")


def uniform_noise(
    batch: int, num_tokens: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """U(0, 1) noise [B, N]: keeping its lowest values is unstructured random masking."""
    noise = torch.rand(batch, num_tokens, generator=generator, device=_device_for(generator, device))
    return noise.to(device) if device is not None else noise


def _random_subsets(
    batch: int, size: int, count: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """[B, size] bool, ``count`` random True entries per row."""
    chosen = torch.rand(batch, size, generator=generator, device=device).argsort(dim=1)[:, :count]
    return torch.zeros(batch, size, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def time_frequency_noise(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise [B, F*T] for the published "tf" structured audio masking on a (freq, time) grid.

    Per sample, random whole time columns and frequency rows are marked (see
    ``TF_MARKED_FRACTION``) and get noise above every unmarked token, so they are removed first.
    Token order is frequency-major (``f * T + t``), the encoder's audio layout.
    """
    num_freq, num_time = grid
    draw_device = _device_for(generator, device)
    # Same operation order as the published code (T * r * 0.7): it fixes the rounding.
    time_cols = _random_subsets(batch, num_time, int(num_time * ratio * TF_MARKED_FRACTION), generator, draw_device)
    freq_rows = _random_subsets(batch, num_freq, int(num_freq * ratio * TF_MARKED_FRACTION), generator, draw_device)
    marked = (freq_rows[:, :, None] | time_cols[:, None, :]).flatten(1)
    noise = torch.rand(batch, num_freq * num_time, generator=generator, device=draw_device)
    noise = noise + MARKED_NOISE_OFFSET * marked
    return noise.to(device) if device is not None else noise


def keep_lowest(noise: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices [B, K] of the ``num_keep`` lowest-noise tokens, in no particular order (callers
    that only pool or attend over the kept tokens do not need them sorted)."""
    return noise.topk(num_keep, dim=1, largest=False, sorted=False).indices


@dataclass(frozen=True)
class MaeMask:
    """An MAE masking of N tokens: K kept (encoded) and N - K removed (reconstructed)."""

    keep: torch.Tensor  # [B, K] indices of the kept tokens
    removed: torch.Tensor  # [B, N - K] indices of the removed tokens
    restore: torch.Tensor  # [B, N] where token n sits in the sequence [kept; removed]


def mae_mask(noise: torch.Tensor, num_keep: int) -> MaeMask:
    """MAE's masking: sort by noise, keep the first ``num_keep``; ``restore`` un-shuffles."""
    shuffle = noise.argsort(dim=1)
    return MaeMask(keep=shuffle[:, :num_keep], removed=shuffle[:, num_keep:], restore=shuffle.argsort(dim=1))


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def ratio_buckets(
    batch: int,
    num_ratios: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Split clip indices 0..B-1 into ``num_ratios`` buckets, one per mask ratio.

    Clips are dealt round-robin over a random permutation, so every clip gets a ratio and
    bucket sizes differ by at most one (the published ``torch.chunk`` instead drops the last
    ratios when B is small or not a multiple of their number). A random rotation decides which
    ratios get the extra clips, so no ratio is favoured, even when B < ``num_ratios`` and some
    buckets must be empty. Bucket k holds the clips of ratio k; their sizes follow from B and
    the rotation, a Python int (read from the device, a sync, only when drawn on a GPU).
    """
    draw_device = _device_for(generator, device)
    perm = torch.randperm(batch, generator=generator, device=draw_device)
    rotation = int(torch.randint(num_ratios, (), generator=generator, device=draw_device))
    if device is not None:
        perm = perm.to(device)
    # Position j of the permutation gets ratio (j + rotation) mod R.
    return [perm[(k - rotation) % num_ratios :: num_ratios] for k in range(num_ratios)]
