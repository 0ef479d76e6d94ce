"""Compute of a recipe: parameters, FLOPs per sample, and the GPU-hours it should take."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from avsiam.config import ArchConfig, RecipeConfig
from avsiam.model import build_finetune_model, build_pretrain_model
from avsiam.model.finetune import MIXED_HEAD_PROBABILITIES, MODE_HEADS
from avsiam.model.flops import block_flops, contrastive_train_flops, finetune_train_flops, mae_train_flops
from avsiam.plan.memory import BlockRun, head_block_runs, pretraining_block_runs

# Training clips per epoch, from the training logs CAV-MAE released (YuanGongND/cav-mae).
TRAIN_CLIPS = {"as2m": 1_772_023, "as20k": 18_691, "vggsound": 183_727}
NUM_CLASSES = {"as2m": 527, "as20k": 527, "vggsound": 309}


@dataclass(frozen=True)
class ParameterCount:
    total: int
    trainable: int
    largest_layer: int  # the most parameters one module holds itself (what ZeRO 3 gathers at once)


def count_parameters(recipe: RecipeConfig) -> ParameterCount:
    """Parameters of the model the recipe trains: encoder + fusion + decoder for pretraining,
    encoder + fusion + heads for finetuning (AudioSet's 527 or VGGSound's 309 classes)."""
    num_classes = NUM_CLASSES[recipe.dataset] if recipe.stage == "finetune" else 0
    return _count_parameters(recipe.arch.model_dump_json(), recipe.stage, recipe.use_mae, recipe.finetune_mode, num_classes)


# Cached: the config generator and the planner count the same few models many times. The
# arguments are everything the parameter count depends on.
@functools.cache
def _count_parameters(arch_json: str, stage: str, use_mae: bool, finetune_mode: str, num_classes: int) -> ParameterCount:
    arch = ArchConfig.model_validate_json(arch_json)
    with torch.device("meta"):  # shapes only: no memory allocated, even for Huge
        if stage == "pretrain":
            model = build_pretrain_model(arch, use_mae=use_mae)
        else:
            model = build_finetune_model(arch, num_classes, mode=finetune_mode)
    params = list(model.parameters())
    return ParameterCount(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
    )


def trained_head_shares(recipe: RecipeConfig) -> dict[str, float]:
    """How often each head of the finetune mode is trained: the published mm_grad draw for
    ``mixed``, always for a single-head mode."""
    heads = MODE_HEADS[recipe.finetune_mode]
    return dict(MIXED_HEAD_PROBABILITIES) if len(heads) > 1 else {heads[0]: 1.0}


def train_flops_per_sample(recipe: RecipeConfig) -> float:
    """Model FLOPs of one training clip (avsiam.model.flops): contrastive (+ MAE) for
    pretraining, the expected trained head's for finetuning."""
    arch = recipe.arch
    if recipe.stage == "pretrain":
        contrastive = contrastive_train_flops(arch, recipe.contrastive_mask_ratios)
        mae = mae_train_flops(arch, recipe.mae_mask_ratio, recipe.stop_gradient_before_fusion) if recipe.use_mae else 0.0
        return contrastive + mae
    return sum(share * finetune_train_flops(arch, head) for head, share in trained_head_shares(recipe).items())


def _forward_flops(runs: list[BlockRun]) -> float:
    return sum(r.layers * r.clip_share * block_flops(r.tokens, r.width) for r in runs)


def recompute_flops_per_sample(recipe: RecipeConfig) -> float:
    """What activation checkpointing adds per clip: one more forward of every block whose
    activations the backward needs."""
    if recipe.stage == "pretrain":
        return _forward_flops(pretraining_block_runs(recipe))
    return sum(share * _forward_flops(head_block_runs(recipe.arch, head)) for head, share in trained_head_shares(recipe).items())


def predicted_gpu_hours(recipe: RecipeConfig, flops_per_sample: float, peak_flops: float, utilisation: float) -> float:
    """Device-hours of the whole recipe: every epoch's clips at ``utilisation`` of the peak."""
    total_flops = TRAIN_CLIPS[recipe.dataset] * recipe.epochs * flops_per_sample
    return total_flops / (peak_flops * utilisation) / 3600
