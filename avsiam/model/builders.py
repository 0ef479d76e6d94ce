"""Build the pretraining and finetuning models from a size name, an ArchConfig or a recipe.

The objective options default to ``RecipeConfig``'s defaults. Table 3 of the supplement (the
CAV baseline, ``arch.encoder == "separate"``) is expressible as:

* CAV: ``use_mae=False, contrastive_mask_ratios=[0.75], audio_contrastive_masking="unstructured"``
* + MAE loss: ``use_mae=True`` with the same single ratio (CAV-MAE also weights the
  contrastive loss by ``contrastive_weight=0.01``)
* + multi-ratio masking: ``use_mae=True`` and the default ratios and tf audio masking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from avsiam.config import ArchConfig, RecipeConfig, arch_config
from avsiam.config.schema import AudioMasking, FinetuneMode
from avsiam.model.encoder import build_encoder, build_fusion_layers
from avsiam.model.finetune import AudioVisualClassifier
from avsiam.model.mae import MaeDecoder
from avsiam.model.pretrain import AudioVisualPretrainingModel
from avsiam.model.weights import init_from_timm_vit, load_pretrained

logger = logging.getLogger(__name__)

_RECIPE_DEFAULTS = RecipeConfig.model_fields


def _arch(size: str | ArchConfig) -> ArchConfig:
    return size if isinstance(size, ArchConfig) else arch_config(size)


def build_pretrain_model(
    size: str | ArchConfig,
    *,
    contrastive_mask_ratios: Sequence[float] = tuple(_RECIPE_DEFAULTS["contrastive_mask_ratios"].default_factory()),
    audio_contrastive_masking: AudioMasking = _RECIPE_DEFAULTS["audio_contrastive_masking"].default,
    mae_mask_ratio: float = _RECIPE_DEFAULTS["mae_mask_ratio"].default,
    temperature: float = _RECIPE_DEFAULTS["temperature"].default,
    stop_gradient_before_fusion: bool = _RECIPE_DEFAULTS["stop_gradient_before_fusion"].default,
    use_mae: bool = _RECIPE_DEFAULTS["use_mae"].default,
    contrastive_weight: float = _RECIPE_DEFAULTS["contrastive_weight"].default,
    norm_pix_loss: bool = _RECIPE_DEFAULTS["norm_pix_loss"].default,
    init_weights: str | Path | None = None,
) -> AudioVisualPretrainingModel:
    """The pretraining model (contrastive + MAE) of ``size``.

    ``init_weights`` is a local timm ViT weights file (safetensors or torch) to initialise the
    encoder and fusion layers from (:func:`~avsiam.model.weights.init_from_timm_vit`); without
    it the model trains from scratch with timm's ViT initialisation.
    """
    arch = _arch(size)
    encoder = build_encoder(arch)
    fusion = build_fusion_layers(arch) if use_mae else None
    decoder = None
    if use_mae:
        decoder = MaeDecoder(
            encoder_dim=arch.embed_dim,
            audio_grid=arch.audio_grid,
            visual_grid=arch.visual_grid,
            audio_patch_dim=arch.patch_size**2,
            visual_patch_dim=arch.patch_size**2 * 3,
            embed_dim=arch.decoder_embed_dim,
            depth=arch.decoder_depth,
            num_heads=arch.decoder_num_heads,
            mlp_ratio=arch.mlp_ratio,
        )
    if init_weights is not None:
        logger.info("%s", init_from_timm_vit(encoder, fusion, init_weights, arch.audio_pos_init, arch.fusion_init))
    return AudioVisualPretrainingModel(
        encoder,
        fusion,
        decoder,
        contrastive_mask_ratios=contrastive_mask_ratios,
        audio_contrastive_masking=audio_contrastive_masking,
        mae_mask_ratio=mae_mask_ratio,
        temperature=temperature,
        stop_gradient_before_fusion=stop_gradient_before_fusion,
        contrastive_weight=contrastive_weight,
        norm_pix_loss=norm_pix_loss,
    )


def build_finetune_model(
    size: str | ArchConfig,
    num_classes: int,
    *,
    mode: FinetuneMode = _RECIPE_DEFAULTS["finetune_mode"].default,
    pretrained: str | Path | None = None,
    init_weights: str | Path | None = None,
) -> AudioVisualClassifier:
    """The finetuning classifier of ``size`` with the heads of ``mode``.

    ``pretrained`` is a pretrained checkpoint (this project's or the published layout; see
    :func:`~avsiam.model.weights.load_pretrained`, whose report is logged). ``init_weights`` is
    a timm ViT file, for finetuning straight from ImageNet; it is applied first, so a
    ``pretrained`` checkpoint overrides what it covers.
    """
    arch = _arch(size)
    encoder = build_encoder(arch)
    fusion = build_fusion_layers(arch) if mode in ("mixed", "multimodal") else None
    if init_weights is not None:
        logger.info("%s", init_from_timm_vit(encoder, fusion, init_weights, arch.audio_pos_init, arch.fusion_init))
    model = AudioVisualClassifier(encoder, fusion, num_classes, mode, head_norm_eps=arch.block_norm_eps)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def build_pretrain_model_from_recipe(recipe: RecipeConfig, **options) -> AudioVisualPretrainingModel:
    """:func:`build_pretrain_model` for ``recipe.arch`` with the recipe's objective settings;
    ``options`` (e.g. ``init_weights``) are passed on and override them."""
    settings = dict(
        contrastive_mask_ratios=recipe.contrastive_mask_ratios,
        audio_contrastive_masking=recipe.audio_contrastive_masking,
        mae_mask_ratio=recipe.mae_mask_ratio,
        temperature=recipe.temperature,
        stop_gradient_before_fusion=recipe.stop_gradient_before_fusion,
        use_mae=recipe.use_mae,
        contrastive_weight=recipe.contrastive_weight,
        norm_pix_loss=recipe.norm_pix_loss,
    )
    return build_pretrain_model(recipe.arch, **{**settings, **options})


def build_finetune_model_from_recipe(recipe: RecipeConfig, num_classes: int, **options) -> AudioVisualClassifier:
    """:func:`build_finetune_model` for ``recipe.arch`` and ``recipe.finetune_mode``."""
    return build_finetune_model(recipe.arch, num_classes, **{"mode": recipe.finetune_mode, **options})
