"""AVSiam models: the shared (or separate) audio-visual encoder, pretraining and finetuning."""

from avsiam.model.builders import (
    build_finetune_model,
    build_finetune_model_from_recipe,
    build_pretrain_model,
    build_pretrain_model_from_recipe,
)
from avsiam.model.encoder import AudioVisualEncoder, build_encoder, build_fusion_layers
from avsiam.model.finetune import (
    AudioVisualClassifier,
    draw_training_head,
    frame_averaged_probabilities,
)
from avsiam.model.flops import flops_summary
from avsiam.model.pretrain import AudioVisualPretrainingModel
from avsiam.model.weights import LoadReport, init_from_timm_vit, load_pretrained, read_state_dict

__all__ = [
    "AudioVisualClassifier",
    "AudioVisualEncoder",
    "AudioVisualPretrainingModel",
    "LoadReport",
    "build_encoder",
    "build_finetune_model",
    "build_finetune_model_from_recipe",
    "build_fusion_layers",
    "build_pretrain_model",
    "build_pretrain_model_from_recipe",
    "draw_training_head",
    "flops_summary",
    "frame_averaged_probabilities",
    "init_from_timm_vit",
    "load_pretrained",
    "read_state_dict",
]
