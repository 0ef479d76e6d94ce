"""Typed configuration: the architecture of a model size and the resolved recipe of a run.

Every field of the paper's Tables 4-6 is a field of :class:`RecipeConfig`; everything the
tables leave implicit (augmentation strengths, masking ratios, runtime knobs) is a field
with the value the published code uses, documented where it is declared. Unknown keys are
errors (``extra="forbid"``), so a typo in a preset or an override never goes unnoticed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from avsiam.config.lr_schedule import LrSchedule

Stage = Literal["pretrain", "finetune"]
Dataset = Literal["as2m", "as20k", "vggsound"]
Loss = Literal["cl+mae", "bce", "ce"]
GpuType = Literal["A5000", "V100", "CPU"]
Precision = Literal["fp32", "fp16", "bf16"]
FinetuneMode = Literal["mixed", "multimodal", "audio", "visual"]
EncoderKind = Literal["siamese", "separate"]
AudioMasking = Literal["tf", "unstructured"]  # contrastive passes: whole time frames / frequency bands, or single patches
AudioPosInit = Literal["bicubic", "nearest_1d"]  # from a timm ViT: 2-D resize of the visual grid, or the published 1-D stretch
FusionInit = Literal["last_blocks", "last_block"]  # from a timm ViT: the last blocks, or the published last block in every layer


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and
    no float may be inf or nan (``lr=.inf`` passes ``gt=0`` otherwise)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class ArchConfig(StrictModel):
    """Architecture of one model size (``presets/models.yaml``)."""

    embed_dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0)
    img_size: int = Field(default=224, gt=0)
    # Audio input: [audio_frames x mel_bins] log-mel fbank (10 s at a 10 ms shift, padded).
    audio_frames: int = Field(default=1024, gt=0)
    mel_bins: int = Field(default=128, gt=0)
    # Two multimodal fusion layers over [audio; visual] tokens (pretraining MAE and finetuning).
    fusion_depth: int = Field(default=2, ge=0)
    decoder_embed_dim: int = Field(default=512, gt=0)
    decoder_depth: int = Field(default=8, gt=0)
    decoder_num_heads: int = Field(default=16, gt=0)
    # "siamese": one shared ViT (AVSiam); "separate": an audio and a visual encoder that share
    # nothing (the CAV baseline of Table 3).
    encoder: EncoderKind = "siamese"
    # timm model name whose ImageNet weights initialise the encoder (loaded from a local file).
    timm_name: str | None = None
    # Image normalisation the initial weights were trained with (timm's in21k ViTs: 0.5/0.5).
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # The published code adds norm_pre(x) (an Identity) to x, doubling every token before
    # block 1. Only needed to reproduce the released weights; off by default.
    input_doubling: bool = False
    # Audio position table when initialising from a timm ViT: a bicubic 2-D resize of the visual
    # grid, or the published nearest-neighbour 1-D stretch (for parity with released weights).
    audio_pos_init: AudioPosInit = "bicubic"
    # Fusion layers when initialising from a timm ViT: copies of the last fusion_depth blocks,
    # or the published pretraining's copies of the last block into every fusion layer.
    fusion_init: FusionInit = "last_blocks"
    # eps of the LayerNorms in the blocks, fusion layers and heads: timm's 1e-6, or the
    # published code's 1e-5 (torch's nn.LayerNorm default there; its final norms are timm's).
    block_norm_eps: float = Field(default=1e-6, gt=0, lt=1)
    # Recompute each encoder block's activations in backward instead of storing them: what
    # lets Base/Large pretraining batches fit 24 GB A5000s (see `avsiam plan`).
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ArchConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        return self

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency, time) patch grid of the audio spectrogram; Huge's patch 14 gives 9x73."""
        return self.mel_bins // self.patch_size, self.audio_frames // self.patch_size

    @property
    def visual_grid(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size


# Fields that never change a run's numbers (how it reads data and keeps checkpoints): a
# stage's cache key ignores them (RecipeConfig.result_key).
RESULT_NEUTRAL_FIELDS = frozenset({"num_workers", "checkpoint_every", "keep_checkpoints"})
# Fields that may differ between a run and its resumption from a checkpoint: the neutral ones,
# and max_steps (a longer run continues the steps of the shorter one).
RESUMABLE_FIELDS = RESULT_NEUTRAL_FIELDS | {"max_steps"}


class RecipeConfig(StrictModel):
    """One resolved run configuration: a row of Tables 4-6 plus what the tables leave implicit."""

    # --- identity -------------------------------------------------------------------------
    model: str
    stage: Stage
    recipe: str
    dataset: Dataset

    # --- the paper's tables -----------------------------------------------------------------
    optimizer: Literal["adam"] = "adam"
    weight_decay: float = Field(ge=0)  # coupled L2 (torch.optim.Adam), not AdamW
    betas: tuple[float, float]
    lr: float = Field(gt=0)  # backbone learning rate
    head_lr_multiplier: float | None = Field(default=None, gt=0)  # classifier lr = lr x this
    lr_decay_start_epoch: int = Field(ge=0)
    lr_decay_rate: float = Field(gt=0, le=1)
    lr_decay_step: int = Field(gt=0)
    epochs: int = Field(gt=0)
    batch_size_per_gpu: int = Field(gt=0)
    num_gpus: int = Field(gt=0)
    gpu_type: GpuType
    class_balanced_sampling: bool
    mixup: bool
    random_time_shift: bool
    loss: Loss
    input_norm_mean: float
    input_norm_std: float = Field(gt=0)

    # --- implicit in the tables: the published code's values --------------------------------
    # Fusion layers' lr = lr x this (the published fine-tuning's mm_lr; defaults to the head's).
    fusion_lr_multiplier: float | None = Field(default=None, gt=0)
    # Linear lr warmup over the first optimizer steps. The paper's recipes have none (they start
    # from ImageNet weights); models trained from scratch, like the tiny demo, need it.
    warmup_steps: int = Field(default=0, ge=0)
    mixup_rate: float = Field(default=0.5, ge=0, le=1)  # probability a training clip is mixed
    mixup_alpha: float = Field(default=10.0, gt=0)  # lambda ~ Beta(alpha, alpha)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    freqm: int = Field(default=48, ge=0)  # SpecAugment frequency mask width (finetuning)
    timem: int = Field(default=192, ge=0)  # SpecAugment time mask width (finetuning)
    noise: bool = True  # small additive noise on the normalised fbank (training)
    contrastive_mask_ratios: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    # "tf": time-frequency structured audio masking (AVSiam); "unstructured": random tokens.
    audio_contrastive_masking: AudioMasking = "tf"
    contrastive_weight: float = Field(default=1.0, gt=0)  # L = w * L_c + L_mae (CAV-MAE: 0.01)
    use_mae: bool = True  # False: contrastive only (Table 3's plain CAV row)
    norm_pix_loss: bool = False  # the published code computes MSE on the raw normalised inputs
    mae_mask_ratio: float = Field(default=0.75, gt=0, lt=1)  # 0 would leave nothing to reconstruct
    temperature: float = Field(default=0.05, gt=0)
    stop_gradient_before_fusion: bool = True  # the supplement: stop-gradient before fusion
    finetune_mode: FinetuneMode = "mixed"  # mixed: multimodal 0.5, audio 0.25, visual 0.25
    val_fraction: float = Field(default=0.1, ge=0, lt=1)  # held-out split for model selection

    # --- runtime ------------------------------------------------------------------------------
    seed: int = 0
    max_steps: int | None = Field(default=None, gt=0)
    checkpoint_every: int | None = Field(default=None, gt=0)  # optimizer steps; epoch ends always
    keep_checkpoints: int = Field(default=2, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    gradient_clipping: float = Field(default=0.0, ge=0)  # 0 disables (the published code has none)
    zero_stage: int = Field(default=2, ge=0, le=3)
    precision: Precision = "fp32"
    num_workers: int = Field(default=2, ge=0)

    arch: ArchConfig

    @model_validator(mode="after")
    def _consistent(self) -> RecipeConfig:
        if self.stage == "pretrain" and self.head_lr_multiplier is not None:
            raise ValueError("head_lr_multiplier must be null for pretraining (there is no classifier)")
        if self.stage == "finetune" and self.head_lr_multiplier is None:
            raise ValueError("head_lr_multiplier is required for finetuning")
        if self.stage == "pretrain" and self.loss != "cl+mae":
            raise ValueError(f"pretraining uses loss 'cl+mae', got {self.loss!r}")
        if self.stage == "finetune" and self.loss == "cl+mae":
            raise ValueError("finetuning uses loss 'bce' or 'ce', got 'cl+mae'")
        if not self.contrastive_mask_ratios or any(not 0 <= r < 1 for r in self.contrastive_mask_ratios):
            raise ValueError(f"contrastive_mask_ratios must be a non-empty list in [0, 1), got {self.contrastive_mask_ratios}")
        return self

    @property
    def lr_schedule(self) -> list[float]:
        """Backbone lr for each 1-based epoch, as the published per-epoch MultiStepLR gives it."""
        schedule = LrSchedule.of(self)
        return [schedule.epoch_lr(e) for e in range(1, self.epochs + 1)]

    @property
    def multi_label(self) -> bool:
        return self.loss == "bce"

    def result_key(self) -> dict:
        """The fields that determine the run's numbers (all but :data:`RESULT_NEUTRAL_FIELDS`), as JSON values."""
        return self.model_dump(mode="json", exclude=set(RESULT_NEUTRAL_FIELDS))
