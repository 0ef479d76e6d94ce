"""Labelling new videos with a finetuned model: ``avsiam predict`` and the served model
(:mod:`avsiam.eval.serving`) both go through :class:`ClipLabeler`, so they give the same records.

A clip is decoded by the staging decoders and preprocessed as evaluation does
(:mod:`avsiam.data.clips`); its 10 frames are each fused with its audio and the probabilities
averaged over frames. A record names the clip and its file, and gives the top-k classes of the
headline head (multimodal, or the only head of a single-modality model), and of the audio-only
and visual-only heads where the model has them::

    {"clip": "00W1lcxW-WU_40.000", "file": "clips/00W1lcxW-WU_40.000.mp4",
     "top": [{"class": "Speech", "mid": "/m/09x0r", "probability": 0.91}, ...],
     "audio_only": [...], "visual_only": [...]}

A clip that cannot be labelled gives ``{"clip", "file", "error"}`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avsiam.config import ConfigError, RecipeConfig, load_recipe_file, resolve_recipe
from avsiam.data.audio import DecodeError
from avsiam.data.clips import eval_inputs, staged_members
from avsiam.data.formats import ClassIndex, FormatError, read_class_labels
from avsiam.data.index import CLASSES_NAME
from avsiam.eval.evaluate import load_weights
from avsiam.eval.report import HEAD_PREFIX
from avsiam.model import build_finetune_model_from_recipe
from avsiam.model.finetune import AudioVisualClassifier, frame_averaged_probabilities
from avsiam.model.weights import published_size, resolve_checkpoint_recipe

DEFAULT_TOP_K = 5
RECIPE_NAME = "config.yaml"  # what a training run writes beside its weights
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi")


@dataclass
class ClipLabeler:
    """A finetuned model with its recipe and class list, ready to label clips."""

    model: AudioVisualClassifier
    recipe: RecipeConfig
    classes: ClassIndex
    device: torch.device

    @classmethod
    def from_files(cls, weights: str | Path, recipe_file: str | Path, classes_file: str | Path) -> ClipLabeler:
        """The model of a finetuning run's ``weights.safetensors``, its ``config.yaml`` and its
        class list (``class_labels_indices.csv``)."""
        recipe = load_recipe_file(recipe_file)
        if recipe.stage != "finetune":
            raise ConfigError(f"{recipe_file}: a {recipe.stage} recipe ({recipe.recipe}); labelling clips needs a finetuned model")
        return cls._build(weights, recipe, read_class_labels(classes_file))

    @classmethod
    def from_published(cls, weights: str | Path, recipe: str, classes_file: str | Path, size: str | None = None) -> ClipLabeler:
        """The model of a published AVSiam finetuned checkpoint: the preset ``recipe`` of its
        size (read from its layout unless ``size`` is given), with the architecture the
        checkpoint implies, and the class list it was trained on."""
        size = size or published_size(weights)
        if size is None:
            raise ConfigError(f"{weights}: not a published AVSiam checkpoint (no vit_base/vit_large/vit_huge tensors)")
        resolved = resolve_checkpoint_recipe(resolve_recipe(size, recipe), weights, {}, "--model")
        return cls._build(weights, resolved, read_class_labels(classes_file))

    @classmethod
    def _build(cls, weights: str | Path, recipe: RecipeConfig, classes: ClassIndex) -> ClipLabeler:
        model = build_finetune_model_from_recipe(recipe, len(classes.mids))
        load_weights(model, weights)
        return cls(model.eval(), recipe, classes, torch.device("cpu"))

    @classmethod
    def from_run_folder(cls, weights: str | Path) -> ClipLabeler:
        """The model of ``weights``, with the recipe and class list its training run wrote beside it."""
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no such file")
        needed = [weights.parent / RECIPE_NAME, weights.parent / CLASSES_NAME]
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise FormatError(f"{weights}: {' and '.join(missing)} not beside it; pass the weights of a finetuning run "
                              "folder, a registered model (models:/NAME@champion), or a published checkpoint with "
                              "--recipe and --classes")
        return cls.from_files(weights, *needed)

    def to(self, device: str | torch.device) -> ClipLabeler:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def multi_label(self) -> bool:
        return self.recipe.multi_label

    @torch.no_grad()
    def probabilities(self, members: Mapping[str, bytes], where: str) -> dict[str, torch.Tensor]:
        """{head: class probabilities [C]} of one clip's staged members."""
        inputs = eval_inputs(members, self.recipe, where)
        logits = self.model(audio=inputs["audio"][None].to(self.device), frames=inputs["frames"][None].to(self.device))
        return {head: frame_averaged_probabilities(x.float(), self.multi_label)[0].cpu() for head, x in logits.items()}

    def label(self, video: str | Path, clip: str, file: str, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
        """The record of one video file (see the module docstring); never raises for a clip
        that cannot be decoded: its record says why."""
        try:
            probabilities = self.probabilities(staged_members(video), file)
        except DecodeError as exc:
            return {"clip": clip, "file": file, "error": str(exc)}
        headline = "multimodal" if "multimodal" in probabilities else next(iter(probabilities))
        record: dict[str, Any] = {"clip": clip, "file": file, "top": self._top(probabilities[headline], top_k)}
        for head, probs in probabilities.items():
            if head != headline and HEAD_PREFIX[head]:
                record[HEAD_PREFIX[head]] = self._top(probs, top_k)
        return record

    def _top(self, probabilities: torch.Tensor, k: int) -> list[dict[str, Any]]:
        values, indices = probabilities.topk(min(k, probabilities.numel()))
        return [{"class": self.classes.names[i], "mid": self.classes.mids[i], "probability": round(float(p), 6)}
                for p, i in zip(values.tolist(), indices.tolist())]


def clip_name(path: str) -> str:
    """A clip's id: its file name without the extension (``00W1lcxW-WU_40.000.mp4`` -> ``00W1lcxW-WU_40.000``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in VIDEO_SUFFIXES else name


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return top_k
