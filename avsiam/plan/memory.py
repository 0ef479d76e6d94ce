"""GPU memory of a training step: ZeRO model states, activations, and whether they fit.

Model states follow DeepSpeed's mixed-precision ZeRO optimizers (and their estimators,
``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``). The
ZeRO paper counts 2 + 2 + 12 bytes per parameter (16-bit weights and gradients; fp32 master
weights, Adam m and v); DeepSpeed's optimizers also upcast the gradient partition they step
with to fp32, 4 more bytes per parameter of the partition, which is why its estimators use 18
(not 14) bytes per partitioned parameter at ZeRO 2.

Activations use the estimate of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", eq. 2) for one pre-LN block on one sequence of N tokens of width D,
with 16-bit activations: 34 N D bytes for the linear layers, GELU, LayerNorms and dropout masks,
plus 5 heads N^2 for the attention scores, their softmax and its dropout mask. The model has no
dropout, so this is a slight over-estimate; fused attention kernels (``F.scaled_dot_product_
attention`` on a GPU, which timm's Attention uses) store no N^2 scores at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from avsiam.config import ArchConfig, RecipeConfig
from avsiam.model.finetune import MODE_HEADS
from avsiam.model.flops import num_tokens
from avsiam.model.masking import num_kept
from avsiam.plan.hardware import GIB

ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model-state tensor of a mixed-precision ZeRO optimizer."""

    weights: int = 2  # the 16-bit weights the forward runs with
    grads: int = 2  # their 16-bit gradients
    fp32_grads: int = 4  # the fp32 copy of the gradient partition the optimizer steps with
    optimizer: int = 12  # fp32 master weights + Adam m + v


MIXED_PRECISION = StateBytes()


def model_state_bytes(params: int, largest_layer_params: int, zero_stage: int, world_size: int) -> int:
    """Model-state bytes on one GPU: stage 1 partitions the optimizer states (and their fp32
    gradients), stage 2 also the 16-bit gradients, stage 3 also the 16-bit weights; stage 3
    then gathers one layer at a time, whose whole weights and gradients are live."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {zero_stage}")
    b = MIXED_PRECISION
    shard = math.ceil(params / world_size)  # DeepSpeed pads every rank's partition to the same size
    optimizer = (b.optimizer + b.fp32_grads) * (shard if zero_stage >= 1 else params)
    grads = b.grads * (shard if zero_stage >= 2 else params)
    weights = b.weights * (shard if zero_stage >= 3 else params)
    gathered_layer = (b.weights + b.grads) * largest_layer_params if zero_stage == 3 else 0
    return optimizer + grads + weights + gathered_layer


@dataclass(frozen=True)
class BlockRun:
    """One call of a stack of transformer blocks whose activations the backward needs."""

    name: str
    layers: int
    tokens: int  # sequence length
    width: int
    heads: int
    clip_share: float  # fraction of the micro-batch's clips this call processes


def pretraining_block_runs(recipe: RecipeConfig) -> list[BlockRun]:
    """The autograd-tracked block calls of a pretraining step: every contrastive ratio bucket
    (1/R of the clips each, at that ratio's kept tokens), then the MAE branch: the masked
    encoder only without the stop-gradient, the fusion layers on the kept tokens of both
    modalities, and the decoder on all tokens."""
    arch = recipe.arch
    tokens = {m: num_tokens(arch, m) for m in ("audio", "visual")}
    share = 1 / len(recipe.contrastive_mask_ratios)
    runs = [
        BlockRun(f"contrastive {m} r={ratio:g}", arch.depth, num_kept(tokens[m], ratio), arch.embed_dim, arch.num_heads, share)
        for m in tokens
        for ratio in recipe.contrastive_mask_ratios
    ]
    if not recipe.use_mae:
        return runs
    kept = {m: num_kept(n, recipe.mae_mask_ratio) for m, n in tokens.items()}
    if not recipe.stop_gradient_before_fusion:
        runs += [BlockRun(f"MAE encoder {m}", arch.depth, kept[m], arch.embed_dim, arch.num_heads, 1.0) for m in tokens]
    return runs + [
        BlockRun("fusion", arch.fusion_depth, sum(kept.values()), arch.embed_dim, arch.num_heads, 1.0),
        BlockRun("decoder", arch.decoder_depth, sum(tokens.values()), arch.decoder_embed_dim, arch.decoder_num_heads, 1.0),
    ]


def head_block_runs(arch: ArchConfig, head: str) -> list[BlockRun]:
    """The block calls of a finetuning step that trains ``head`` on one frame per clip: the
    modality's encoder, or for the multimodal head both encoders and the fusion layers."""
    modalities = ("audio", "visual") if head == "multimodal" else (head,)
    tokens = {m: num_tokens(arch, m) for m in modalities}
    runs = [BlockRun(f"encoder {m}", arch.depth, n, arch.embed_dim, arch.num_heads, 1.0) for m, n in tokens.items()]
    if head == "multimodal":
        runs.append(BlockRun("fusion", arch.fusion_depth, sum(tokens.values()), arch.embed_dim, arch.num_heads, 1.0))
    return runs


def finetuning_block_runs(recipe: RecipeConfig) -> list[BlockRun]:
    """The block calls of the finetuning step that needs the most memory: the multimodal head's
    when the mode trains it (it runs both encoders), else the mode's one head."""
    heads = MODE_HEADS[recipe.finetune_mode]
    return head_block_runs(recipe.arch, "multimodal" if "multimodal" in heads else heads[0])


def block_runs(recipe: RecipeConfig) -> list[BlockRun]:
    return pretraining_block_runs(recipe) if recipe.stage == "pretrain" else finetuning_block_runs(recipe)


def block_activation_bytes(run: BlockRun, fused_attention: bool) -> float:
    """16-bit activations one block of ``run`` stores for one clip."""
    scores = 0 if fused_attention else 5 * run.heads * run.tokens**2
    return 34 * run.tokens * run.width + scores


def activation_bytes(runs: list[BlockRun], micro_batch: int, checkpointing: bool, fused_attention: bool = False) -> int:
    """Activation bytes of one micro-batch. With activation checkpointing every block keeps only
    its 16-bit input, and the backward recomputes one block call at a time (the largest: the
    whole micro-batch through one decoder block, or the largest contrastive bucket)."""
    if not checkpointing:
        return math.ceil(sum(r.layers * micro_batch * r.clip_share * block_activation_bytes(r, fused_attention) for r in runs))
    inputs = sum(r.layers * micro_batch * r.clip_share * 2 * r.tokens * r.width for r in runs)
    recomputed = max(math.ceil(micro_batch * r.clip_share) * block_activation_bytes(r, fused_attention) for r in runs if r.layers)
    return math.ceil(inputs + recomputed)


# What a step needs beyond model states and activations: allocator fragmentation and temporary
# buffers (a share of what is allocated), the CUDA context, cuBLAS/cuDNN workspaces and
# DeepSpeed's communication buckets (ZeRO's default reduce bucket is 5e8 elements, 1 GB in 16 bit).
FRAGMENTATION_SHARE = 0.10
FRAMEWORK_BYTES = int(1.5 * GIB)


def required_bytes(model_states: int, activations: int) -> int:
    return math.ceil((model_states + activations) * (1 + FRAGMENTATION_SHARE)) + FRAMEWORK_BYTES
