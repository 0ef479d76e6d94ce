"""Distributed, resumable samplers that also hand every sample its own RNG seed.

One epoch is a *global* order of N draws (a permutation, or N class-balanced draws with
replacement), padded to a multiple of the world size and dealt round-robin to the ranks, so
an epoch covers the dataset once in total whatever the number of ranks (the published
balanced sampler runs a full non-distributed sampler on every rank: W epochs per "epoch").

Each yielded key is ``(index, seed)``: the seed is a hash of (run seed, epoch, global
position) and drives every random augmentation of that sample. Augmentations therefore do
not depend on the number of data-loader workers, and resuming mid-epoch (``set_epoch(epoch,
start=k)``) continues with exactly the samples and augmentations an uninterrupted run sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser): nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def class_balanced_weights(label_offsets: np.ndarray, label_values: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weight = sum over the sample's labels of 1000 / (n_c + 0.01) (CAV-MAE's rule).

    Labels are CSR arrays: sample ``i`` has ``label_values[label_offsets[i]:label_offsets[i + 1]]``.
    """
    label_offsets, label_values = np.asarray(label_offsets), np.asarray(label_values, dtype=np.int64)
    label_weight = 1000.0 / (np.bincount(label_values, minlength=num_classes).astype(np.float64) + 0.01)
    sample_of_label = np.repeat(np.arange(len(label_offsets) - 1), np.diff(label_offsets))
    return np.bincount(sample_of_label, weights=label_weight[label_values], minlength=len(label_offsets) - 1)


class DistributedClipSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for this rank's share of each epoch's global order.

    ``shuffle``: a fresh permutation per epoch (else dataset order). ``weights``: N draws with
    replacement proportional to the weights (class-balanced sampling). ``pad``: repeat the head
    of the order so every rank gets the same number of samples (training; DeepSpeed steps in
    lock-step); without it ranks get disjoint shares of unequal length (evaluation).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | np.ndarray | None = None,
        pad: bool = True,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"the sampler needs at least one sample, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if weights is not None:
            weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if weights.shape != (num_samples,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError("weights must be one non-negative number per sample, not all zero")
        self.num_samples, self.world_size, self.rank, self.seed = num_samples, world_size, rank, seed
        self.shuffle, self.weights, self.pad = shuffle, weights, pad
        self.epoch, self.start = 0, 0

    @property
    def samples_per_rank(self) -> int:
        if self.pad:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` skips this rank's first samples (mid-epoch resume)."""
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start {start} is outside this rank's {self.samples_per_rank} samples")
        self.epoch, self.start = epoch, start

    def global_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=g)
        return torch.arange(self.num_samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.global_order(self.epoch)
        if self.pad:
            total = self.samples_per_rank * self.world_size
            order = order.repeat(math.ceil(total / self.num_samples))[:total]
        mine = order[self.rank :: self.world_size].tolist()
        for pos in range(self.start, len(mine)):
            global_pos = pos * self.world_size + self.rank
            yield mine[pos], mix_seed(self.seed, self.epoch, global_pos)

    def __len__(self) -> int:
        return self.samples_per_rank - self.start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.set_epoch(int(state["epoch"]), int(state["start"]))
