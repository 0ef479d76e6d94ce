"""Torch datasets over a staged dataset, one per stage.

* :class:`PretrainClips`: (fbank, one random frame of the 10) per clip.
* :class:`FinetuneClips`: + soft targets, with mixup, SpecAugment and label smoothing.
* :class:`EvalClips`: deterministic fbank, all 10 frames and exact targets.

Training datasets take keys ``(index, seed)`` from :class:`~avsiam.data.sampler.
DistributedClipSampler`; every random draw of a sample comes from a generator seeded with its
key's seed, so augmentations are reproducible whatever the worker count (exact resume relies
on it). A clip that fails to decode raises, naming the file: it never becomes a constant
tensor (the published loaders do that, silently, in training and evaluation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from avsiam.config import RecipeConfig
from avsiam.data import augment
from avsiam.data.audio import load_waveform, normalize_fbank, waveform_to_fbank
from avsiam.data.manifest import ClipRecord, Manifest
from avsiam.data.sampler import mix_seed
from avsiam.data.video import load_frame, normalize_frames

Key = int | tuple[int, int]


class StagedClips(Dataset):
    """Clips of one split of a staged dataset, with the recipe's preprocessing."""

    def __init__(self, manifest: Manifest, split: str, recipe: RecipeConfig) -> None:
        self.manifest, self.split, self.recipe = manifest, split, recipe
        self.clips: list[ClipRecord] = manifest.split(split)
        if not self.clips:
            counts = ", ".join(f"{k}: {v}" for k, v in manifest.split_counts().items())
            raise ValueError(f"{manifest.root}: split {split!r} has no clips ({counts})")
        self.label_indices = [manifest.label_indices(c) for c in self.clips]
        self.num_classes = manifest.num_classes
        self.image_mean = torch.tensor(recipe.arch.image_mean)
        self.image_std = torch.tensor(recipe.arch.image_std)

    def __len__(self) -> int:
        return len(self.clips)

    def _resolve(self, key: Key) -> tuple[int, torch.Generator]:
        index, seed = key if isinstance(key, tuple) else (key, mix_seed(self.recipe.seed, key))
        return index, torch.Generator().manual_seed(seed)

    def _waveform(self, index: int) -> torch.Tensor:
        return load_waveform(self.manifest.path(self.clips[index].audio))

    def _fbank(self, waveform: torch.Tensor) -> torch.Tensor:
        return waveform_to_fbank(waveform, self.recipe.arch.audio_frames, self.recipe.arch.mel_bins)

    def _normalize_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        return normalize_fbank(fbank, self.recipe.input_norm_mean, self.recipe.input_norm_std)

    def _frame(self, index: int, frame_no: int) -> torch.Tensor:
        """One uint8 frame [3, H, W] of clip ``index``."""
        return load_frame(self.manifest.path(self.clips[index].frames[frame_no]))

    def _normalize_frames(self, frames_uint8: torch.Tensor) -> torch.Tensor:
        return normalize_frames(frames_uint8, self.image_mean, self.image_std)

    def _train_audio_noise(self, fbank: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.recipe.noise:
            fbank = augment.add_noise(fbank, g)
        if self.recipe.random_time_shift:
            fbank = augment.random_time_shift(fbank, g)
        return fbank

    def _random_frame_no(self, index: int, g: torch.Generator) -> int:
        return int(torch.randint(len(self.clips[index].frames), (1,), generator=g))

    def exact_target(self, index: int) -> torch.Tensor:
        """Multi-hot (multi-label) or one-hot (single-label) float target, no smoothing."""
        target = torch.zeros(self.num_classes)
        target[self.label_indices[index]] = 1.0
        return target


class PretrainClips(StagedClips):
    """Pretraining pairs: the clip's fbank and one random frame of its 10 (the supplement)."""

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, g = self._resolve(key)
        fbank = self._normalize_audio(self._fbank(self._waveform(index)))
        frame = self._frame(index, self._random_frame_no(index, g))
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
        waveform = self._waveform(index)
        frame = self._frame(index, self._random_frame_no(index, g)).float()
        partner, lam = None, 1.0
        if r.mixup and float(torch.rand((), generator=g)) < r.mixup_rate:
            # The partner is drawn uniformly from the whole split, independent of the sampler
            # (as published); unlike the published AVSiam code the frames are mixed with the
            # same lambda as the waveform and the labels.
            partner = int(torch.randint(len(self.clips), (1,), generator=g))
            lam = augment.mixup_lambda(r.mixup_alpha, g)
            waveform = augment.mix_waveforms(waveform, self._waveform(partner), lam)
            partner_frame = self._frame(partner, self._random_frame_no(partner, g)).float()
            frame = lam * frame + (1.0 - lam) * partner_frame
        fbank = self._fbank(waveform)
        if r.freqm or r.timem:
            fbank = augment.spec_augment(fbank, r.freqm, r.timem, g)
        fbank = self._train_audio_noise(self._normalize_audio(fbank), g)
        target = augment.soft_targets(
            self.label_indices[index],
            self.num_classes,
            r.label_smoothing,
            labels_b=None if partner is None else self.label_indices[partner],
            lam=lam,
        )
        return {"audio": fbank, "frame": self._normalize_frames(frame), "target": target, "index": index}


class EvalClips(StagedClips):
    """Deterministic evaluation examples: no augmentation, all frames, exact targets."""

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index = key[0] if isinstance(key, tuple) else key
        fbank = self._normalize_audio(self._fbank(self._waveform(index)))
        frames = torch.stack([self._frame(index, i) for i in range(len(self.clips[index].frames))])
        return {
            "audio": fbank,
            "frames": self._normalize_frames(frames),
            "target": self.exact_target(index),
            "index": index,
        }
