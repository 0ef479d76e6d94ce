"""Analytic FLOPs per sample, to read utilisation off measured step times.

Matmuls only, 2 FLOPs per multiply-add (LayerNorm, softmax, GELU and biases are ignored, the
usual convention for model-FLOPs utilisation). One transformer block on N tokens of width D costs
F(N, D) = 24 N D^2 + 4 N^2 D: QKV 6ND^2, projection 2ND^2, MLP 16ND^2, then QK^T and AV. A
trained layer costs 3x its forward (forward, input gradient, weight gradient); a layer run
without autograd costs its forward only.
"""

from __future__ import annotations

from collections.abc import Sequence

from avsiam.config import ArchConfig, RecipeConfig
from avsiam.model.finetune import MIXED_HEAD_PROBABILITIES
from avsiam.model.masking import num_kept

_RECIPE_DEFAULTS = RecipeConfig.model_fields

TRAIN_FACTOR = 3


def block_flops(num_tokens: int, dim: int) -> float:
    return 24 * num_tokens * dim**2 + 4 * num_tokens**2 * dim


def num_tokens(arch: ArchConfig, modality: str) -> int:
    freq, time = arch.audio_grid if modality == "audio" else arch.visual_grid
    return freq * time


def encoder_forward_flops(arch: ArchConfig, modality: str, kept: int | None = None) -> float:
    """Patch embedding of all tokens, then ``arch.depth`` blocks on the ``kept`` ones."""
    tokens = num_tokens(arch, modality)
    patch_values = arch.patch_size**2 * (1 if modality == "audio" else 3)
    kept = tokens if kept is None else kept
    return 2 * tokens * patch_values * arch.embed_dim + arch.depth * block_flops(kept, arch.embed_dim)


def fusion_forward_flops(arch: ArchConfig, tokens: int) -> float:
    return arch.fusion_depth * block_flops(tokens, arch.embed_dim)


def contrastive_train_flops(arch: ArchConfig, mask_ratios: Sequence[float]) -> float:
    """One clip's multi-ratio contrastive step, averaged over equally likely ratios."""
    forward = sum(
        encoder_forward_flops(arch, modality, num_kept(num_tokens(arch, modality), ratio))
        for ratio in mask_ratios
        for modality in ("audio", "visual")
    ) / len(mask_ratios)
    return TRAIN_FACTOR * forward


def mae_train_flops(arch: ArchConfig, mask_ratio: float = 0.75, stop_gradient: bool = True) -> float:
    """The MAE step: masked encoder (forward only under the stop-gradient), fusion of the kept
    tokens, decoder over all tokens, prediction of the removed ones."""
    n_audio, n_visual = num_tokens(arch, "audio"), num_tokens(arch, "visual")
    k_audio, k_visual = num_kept(n_audio, mask_ratio), num_kept(n_visual, mask_ratio)
    encoder = encoder_forward_flops(arch, "audio", k_audio) + encoder_forward_flops(arch, "visual", k_visual)
    dec = arch.decoder_embed_dim
    trained = (
        fusion_forward_flops(arch, k_audio + k_visual)
        + 2 * (k_audio + k_visual) * arch.embed_dim * dec
        + arch.decoder_depth * block_flops(n_audio + n_visual, dec)
        + 2 * (n_audio - k_audio) * dec * arch.patch_size**2
        + 2 * (n_visual - k_visual) * dec * arch.patch_size**2 * 3
    )
    return (1 if stop_gradient else TRAIN_FACTOR) * encoder + TRAIN_FACTOR * trained


def finetune_train_flops(arch: ArchConfig, head: str) -> float:
    """One clip, one frame, training one head (the classifier itself is negligible)."""
    audio, visual = encoder_forward_flops(arch, "audio"), encoder_forward_flops(arch, "visual")
    fusion = fusion_forward_flops(arch, num_tokens(arch, "audio") + num_tokens(arch, "visual"))
    forward = {"audio": audio, "visual": visual, "multimodal": audio + visual + fusion}[head]
    return TRAIN_FACTOR * forward


def eval_flops(arch: ArchConfig, num_frames: int = 10) -> float:
    """One clip at evaluation: audio once, every frame, and every frame fused with the audio."""
    fused = num_tokens(arch, "audio") + num_tokens(arch, "visual")
    return encoder_forward_flops(arch, "audio") + num_frames * (
        encoder_forward_flops(arch, "visual") + fusion_forward_flops(arch, fused)
    )


def flops_summary(
    arch: ArchConfig,
    contrastive_mask_ratios: Sequence[float] = tuple(_RECIPE_DEFAULTS["contrastive_mask_ratios"].default_factory()),
    mae_mask_ratio: float = _RECIPE_DEFAULTS["mae_mask_ratio"].default,
    stop_gradient: bool = _RECIPE_DEFAULTS["stop_gradient_before_fusion"].default,
    num_eval_frames: int = 10,
) -> dict[str, float]:
    """FLOPs per sample of every step kind. ``pretrain_train`` is contrastive + MAE (the patch
    embedding, computed once for both in the model, is counted in each: <0.3 % of the total)."""
    contrastive = contrastive_train_flops(arch, contrastive_mask_ratios)
    mae = mae_train_flops(arch, mae_mask_ratio, stop_gradient)
    per_head = {head: finetune_train_flops(arch, head) for head in MIXED_HEAD_PROBABILITIES}
    return {
        "contrastive_train": contrastive,
        "mae_train": mae,
        "pretrain_train": contrastive + mae,
        **{f"finetune_train_{head}": flops for head, flops in per_head.items()},
        "finetune_train_mixed": sum(p * per_head[h] for h, p in MIXED_HEAD_PROBABILITIES.items()),
        "eval": eval_flops(arch, num_eval_frames),
    }
