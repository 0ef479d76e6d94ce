"""What differs between pretraining and finetuning: the model, the data, the loss of a step,
the parameter groups and the epoch-end validation. The loop in ``trainer.py`` is shared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from avsiam.config import ConfigError, RecipeConfig
from avsiam.data.datasets import EvalClips, FinetuneClips, PretrainClips, StagedClips
from avsiam.data.index import DatasetIndex
from avsiam.data.sampler import class_balanced_weights, mix_seed
from avsiam.eval.predict import distributed_retrieval_recall, embed_clips, eval_loader, predict_probabilities
from avsiam.eval.report import evaluation_results, metric_name
from avsiam.launch.distributed import DistEnv
from avsiam.model import build_finetune_model_from_recipe, build_pretrain_model_from_recipe, load_pretrained
from avsiam.model.finetune import draw_training_head
from avsiam.model.weights import LoadReport
from avsiam.train.divergence import require_finite

# Parameter-name prefixes of the groups that get their own lr multiplier.
HEAD_PREFIX = "heads."
FUSION_PREFIX = "fusion."


@dataclass
class StepContext:
    """Per-step randomness: ``generator`` differs per rank (masking), ``shared`` is the same on
    every rank (choices all ranks must agree on, like the head trained this step)."""

    generator: torch.Generator
    shared: torch.Generator
    device: torch.device
    dtype: torch.dtype
    step: int  # the optimizer steps taken before this micro-step


def _to(batch: dict[str, Any], key: str, ctx: StepContext) -> torch.Tensor:
    return batch[key].to(ctx.device, ctx.dtype, non_blocking=True)


class Task:
    """Base: subclasses set ``dataset_class`` and implement the model, the loss and validation."""

    dataset_class: type[StagedClips]
    load_report: LoadReport | None = None  # what build_model loaded from its initial weights

    def __init__(self, recipe: RecipeConfig, index: DatasetIndex) -> None:
        self.recipe, self.index = recipe, index

    def train_dataset(self) -> StagedClips:
        return self.dataset_class(self.index, "train", self.recipe)

    def val_loader(self, env: DistEnv) -> DataLoader | None:
        """The held-out split used for model selection (never the test split), read by the
        recipe's DataLoader workers, which persist across epochs."""
        if not self.index.split_counts()["val"]:
            return None
        dataset = EvalClips(self.index, "val", self.recipe)
        return eval_loader(dataset, env, self.recipe.batch_size_per_gpu, self.recipe.num_workers, persistent=True)

    def sampler_weights(self, dataset: StagedClips) -> np.ndarray | None:
        return None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Backbone at lr, heads at lr x head multiplier, fusion layers at lr x fusion multiplier
        (which defaults to the head multiplier, as the published mm_lr does)."""
        r = self.recipe
        head_scale = r.head_lr_multiplier or 1.0
        fusion_scale = r.fusion_lr_multiplier or (r.head_lr_multiplier or 1.0)
        groups: dict[str, dict[str, Any]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith(HEAD_PREFIX):
                key, scale = "heads", head_scale
            elif name.startswith(FUSION_PREFIX) and r.stage == "finetune":
                key, scale = "fusion", fusion_scale
            else:
                key, scale = "backbone", 1.0
            group = groups.setdefault(key, {"params": [], "name": key, "lr_scale": scale, "lr": r.lr * scale})
            group["params"].append(param)
        return list(groups.values())


class PretrainTask(Task):
    dataset_class = PretrainClips

    def build_model(self, init_weights: str | None) -> nn.Module:
        return build_pretrain_model_from_recipe(self.recipe, init_weights=init_weights)

    def step_loss(self, engine, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        out = engine(_to(batch, "audio", ctx), _to(batch, "frame", ctx), generator=ctx.generator)
        extras = {k: float(v) for k, v in out.items() if k != "loss"}
        return out["loss"], extras

    def validate(self, model: nn.Module, loader: DataLoader, ctx: StepContext, env: DistEnv) -> dict[str, float]:
        """Audio-visual retrieval recall@k on held-out clips: did pretraining learn anything?"""
        audio, visual = embed_clips(model.encoder, loader, device=ctx.device, dtype=ctx.dtype)
        require_finite({"audio embeddings": audio, "visual embeddings": visual}, ctx.step, "validation")
        return distributed_retrieval_recall(audio, visual, env, ctx.device)

    selection_metric = "a2v_R1"


class FinetuneTask(Task):
    dataset_class = FinetuneClips

    def build_model(self, init_weights: str | None) -> nn.Module:
        model = build_finetune_model_from_recipe(self.recipe, self.index.num_classes)
        if init_weights:
            self.load_report = load_pretrained(model, init_weights)
        return model

    def sampler_weights(self, dataset: StagedClips) -> np.ndarray | None:
        if not self.recipe.class_balanced_sampling:
            return None
        return class_balanced_weights(*dataset.label_csr(), self.index.num_classes)

    def step_loss(self, engine, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        head = draw_training_head(self.recipe.finetune_mode, ctx.shared)
        frames = _to(batch, "frame", ctx) if head != "audio" else None
        audio = _to(batch, "audio", ctx) if head != "visual" else None
        logits = engine(audio=audio, frames=frames, heads=head)[head].float()
        target = batch["target"].to(ctx.device)
        if self.recipe.loss == "bce":
            loss = F.binary_cross_entropy_with_logits(logits, target)
        else:  # cross-entropy with soft (mixup / smoothed) targets
            loss = -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
        return loss, {"head": head}

    def validate(self, model: nn.Module, loader: DataLoader, ctx: StepContext, env: DistEnv) -> dict[str, float]:
        multi_label = self.index.multi_label
        probs = predict_probabilities(model, loader, multi_label=multi_label, device=ctx.device, dtype=ctx.dtype)
        require_finite({f"{head} probabilities": p for head, p in probs.items()}, ctx.step, "validation")
        results = evaluation_results(probs, loader.dataset.exact_targets(), multi_label)
        return {k: v for k, v in results.items() if isinstance(v, float)}

    @property
    def selection_metric(self) -> str:
        return metric_name(self.index.multi_label)


# A recipe's precision as the autocast dtype of its steps.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_task(recipe: RecipeConfig, index: DatasetIndex) -> Task:
    if recipe.stage == "finetune" and index.multi_label != (recipe.loss == "bce"):
        kind = "multi-label" if index.multi_label else "single-label"
        raise ConfigError(
            f"{index.location}: a {kind} dataset does not fit recipe {recipe.recipe!r} (loss {recipe.loss}); "
            "use an AudioSet recipe (bce) for multi-label data and finetune_vggsound (ce) for single-label data"
        )
    return (PretrainTask if recipe.stage == "pretrain" else FinetuneTask)(recipe, index)


def step_context(seed: int, env: DistEnv, global_step: int, micro_step: int, device, dtype) -> StepContext:
    """Randomness of one micro-step, derived from (seed, step): a resumed run draws exactly
    what an uninterrupted one draws, with no RNG state to restore."""
    return StepContext(
        generator=torch.Generator().manual_seed(mix_seed(seed, 1, env.rank, global_step, micro_step)),
        shared=torch.Generator().manual_seed(mix_seed(seed, 2, global_step, micro_step)),
        device=torch.device(device),
        dtype=dtype,
        step=global_step,
    )
