"""Torch datasets over a staged dataset, one per stage.

* :class:`PretrainClips`: (fbank, one random frame of the 10) per clip.
* :class:`FinetuneClips`: + soft targets, with mixup, SpecAugment and label smoothing.
* :class:`EvalClips`: deterministic fbank, all 10 frames and exact targets.

Samples are read from the dataset's shards by the byte ranges of the index
(:class:`~avsiam.data.index.DatasetIndex`): a split is an array of clip-table rows, so a
dataset holds no Python object per clip and forks into DataLoader workers without copying.
Training datasets take keys ``(index, seed)`` from :class:`~avsiam.data.sampler.
DistributedClipSampler`; every random draw of a sample comes from a generator seeded with its
key's seed, so augmentations are reproducible whatever the worker count (exact resume relies
on it). A clip that fails to decode raises, naming the shard and the clip: it never becomes a
constant tensor (the published loaders do that, silently, in training and evaluation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from avsiam.config import RecipeConfig
from avsiam.data import augment
from avsiam.data.audio import decode_wav, normalize_fbank, waveform_to_fbank
from avsiam.data.clips import eval_inputs
from avsiam.data.index import DatasetIndex
from avsiam.data.sampler import mix_seed
from avsiam.data.shards import AUDIO_MEMBER, FRAME_MEMBERS, MEDIA_MEMBERS, Sample
from avsiam.data.video import decode_frame, normalize_frames

Key = int | tuple[int, int]


class StagedClips(Dataset):
    """Clips of one split of a staged dataset, with the recipe's preprocessing."""

    def __init__(self, index: DatasetIndex, split: str, recipe: RecipeConfig) -> None:
        self.index, self.split, self.recipe = index, split, recipe
        self.rows = index.split_rows(split)
        if not len(self.rows):
            counts = ", ".join(f"{k}: {v}" for k, v in index.split_counts().items())
            raise ValueError(f"{index.location}: split {split!r} has no clips ({counts})")
        self.num_classes = index.num_classes
        self.image_mean = torch.tensor(recipe.arch.image_mean)
        self.image_std = torch.tensor(recipe.arch.image_std)
        self.reader = index.reader()

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self, index: int) -> np.ndarray:
        """Class indices of clip ``index`` of this split."""
        return self.index.clips.labels(self.rows[index])

    def _resolve(self, key: Key) -> tuple[int, torch.Generator]:
        index, seed = key if isinstance(key, tuple) else (key, mix_seed(self.recipe.seed, key))
        return index, torch.Generator().manual_seed(seed)

    def _sample(self, index: int) -> Sample:
        return self.index.read_sample(self.reader, self.rows[index])

    def _waveform(self, sample: Sample) -> torch.Tensor:
        return decode_wav(sample.media(AUDIO_MEMBER), f"{sample.where}: member {AUDIO_MEMBER}")

    def _fbank(self, waveform: torch.Tensor) -> torch.Tensor:
        return waveform_to_fbank(waveform, self.recipe.arch.audio_frames, self.recipe.arch.mel_bins)

    def _normalize_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        return normalize_fbank(fbank, self.recipe.input_norm_mean, self.recipe.input_norm_std)

    def _frame(self, sample: Sample, frame_no: int) -> torch.Tensor:
        """One uint8 frame [3, H, W] of ``sample``."""
        member = FRAME_MEMBERS[frame_no]
        return decode_frame(sample.media(member), f"{sample.where}: member {member}")

    def _normalize_frames(self, frames_uint8: torch.Tensor) -> torch.Tensor:
        return normalize_frames(frames_uint8, self.image_mean, self.image_std)

    def _train_audio_noise(self, fbank: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.recipe.noise:
            fbank = augment.add_noise(fbank, g)
        if self.recipe.random_time_shift:
            fbank = augment.random_time_shift(fbank, g)
        return fbank

    @staticmethod
    def _random_frame_no(g: torch.Generator) -> int:
        return int(torch.randint(len(FRAME_MEMBERS), (1,), generator=g))

    def exact_target(self, index: int) -> torch.Tensor:
        """Multi-hot (multi-label) or one-hot (single-label) float target, no smoothing."""
        target = torch.zeros(self.num_classes)
        target[torch.from_numpy(self.labels(index).astype(np.int64))] = 1.0
        return target

    def label_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, values)``: the class indices of every clip of the split as CSR arrays
        (clip ``i`` has ``values[offsets[i]:offsets[i + 1]]``), without reading a sample."""
        clips = self.index.clips
        counts = np.diff(clips.label_offsets)
        in_split = np.zeros(len(clips), dtype=bool)
        in_split[self.rows] = True
        values = clips.label_values[np.repeat(in_split, counts)]
        return np.concatenate([[0], np.cumsum(counts[self.rows])]), values

    def exact_targets(self) -> np.ndarray:
        """``[N, C]`` exact targets of the whole split."""
        offsets, values = self.label_csr()
        targets = np.zeros((len(self), self.num_classes), dtype=np.float32)
        targets[np.repeat(np.arange(len(self)), np.diff(offsets)), values] = 1.0
        return targets


class PretrainClips(StagedClips):
    """Pretraining pairs: the clip's fbank and one random frame of its 10 (the supplement)."""

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, g = self._resolve(key)
        sample = self._sample(index)
        fbank = self._normalize_audio(self._fbank(self._waveform(sample)))
        frame = self._frame(sample, self._random_frame_no(g))
        return {
            "audio": self._train_audio_noise(fbank, g),
            "frame": self._normalize_frames(frame),
            "index": index,
        }


class FinetuneClips(StagedClips):
    """Finetuning examples: mixup (waveform, frame and labels share one lambda), SpecAugment,
    label smoothing, noise and time shift, as the recipe enables them."""

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, g = self._resolve(key)
        r = self.recipe
        sample = self._sample(index)
        waveform = self._waveform(sample)
        frame = self._frame(sample, self._random_frame_no(g)).float()
        partner, lam = None, 1.0
        if r.mixup and float(torch.rand((), generator=g)) < r.mixup_rate:
            # The partner is drawn uniformly from the whole split, independent of the sampler
            # (as published); unlike the published AVSiam code the frames are mixed with the
            # same lambda as the waveform and the labels.
            partner = int(torch.randint(len(self), (1,), generator=g))
            lam = augment.mixup_lambda(r.mixup_alpha, g)
            partner_sample = self._sample(partner)
            waveform = augment.mix_waveforms(waveform, self._waveform(partner_sample), lam)
            partner_frame = self._frame(partner_sample, self._random_frame_no(g)).float()
            frame = lam * frame + (1.0 - lam) * partner_frame
        fbank = self._fbank(waveform)
        if r.freqm or r.timem:
            fbank = augment.spec_augment(fbank, r.freqm, r.timem, g)
        fbank = self._train_audio_noise(self._normalize_audio(fbank), g)
        target = augment.soft_targets(
            self.labels(index).tolist(),
            self.num_classes,
            r.label_smoothing,
            labels_b=None if partner is None else self.labels(partner).tolist(),
            lam=lam,
        )
        return {"audio": fbank, "frame": self._normalize_frames(frame), "target": target, "index": index}


class EvalClips(StagedClips):
    """Deterministic evaluation examples: no augmentation, all frames, exact targets."""

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index = key[0] if isinstance(key, tuple) else key
        sample = self._sample(index)
        inputs = eval_inputs({m: sample.media(m) for m in MEDIA_MEMBERS}, self.recipe, sample.where)
        return {**inputs, "target": self.exact_target(index), "index": index}
