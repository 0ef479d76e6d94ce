"""Finetuning: audio-only, visual-only and multimodal classification heads on the encoder.

* ``audio`` / ``visual``: mean of the modality's tokens -> LayerNorm + Linear.
* ``multimodal``: the fusion layers over [audio; visual] tokens, then the mean of the audio part
  and the mean of the visual part, concatenated -> LayerNorm(2D) + Linear(2D -> C).

Mode ``mixed`` (the published ``mm_grad``) holds all three heads and trains one per step, drawn
by :func:`draw_training_head`; the forward computes only the heads it is asked for, so a step
does no work for heads it does not train. Evaluation feeds all frames of a clip, [B, T, 3, H,
W]: the audio is encoded once, the T frames as one batch, and each frame is fused with the
audio, giving per-frame logits [B, T, C] that :func:`frame_averaged_probabilities` averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from timm.layers import LayerNorm, trunc_normal_
from torch import nn

from avsiam.config.schema import FinetuneMode
from avsiam.model.encoder import AudioVisualEncoder

Head = Literal["multimodal", "audio", "visual"]
MODE_HEADS: dict[str, tuple[Head, ...]] = {
    "mixed": ("multimodal", "audio", "visual"),
    "multimodal": ("multimodal",),
    "audio": ("audio",),
    "visual": ("visual",),
}
# The published mm_grad draws one u ~ U(0, 1) per step: u > 0.5 multimodal, u < 0.25 audio,
# otherwise visual.
MIXED_HEAD_PROBABILITIES: dict[Head, float] = {"multimodal": 0.5, "audio": 0.25, "visual": 0.25}


def draw_training_head(mode: FinetuneMode, generator: torch.Generator | None = None) -> Head:
    """The head to train this step. For ``mixed`` it is random: pass a generator seeded the
    same on every rank for the step (e.g. from the seed and the step number), so all ranks
    train the same head and compute gradients for the same parameters."""
    heads = MODE_HEADS[mode]
    if len(heads) == 1:
        return heads[0]
    names = list(MIXED_HEAD_PROBABILITIES)
    weights = torch.tensor([MIXED_HEAD_PROBABILITIES[name] for name in names])
    return names[int(torch.multinomial(weights, 1, generator=generator))]


def classification_head(in_features: int, num_classes: int, norm_eps: float = 1e-6) -> nn.Sequential:
    """LayerNorm + Linear, the published ``mlp_head*`` layout (``0`` norm, ``1`` linear)."""
    head = nn.Sequential(LayerNorm(in_features, eps=norm_eps), nn.Linear(in_features, num_classes))
    trunc_normal_(head[1].weight, std=0.02)
    nn.init.zeros_(head[1].bias)
    return head


def frame_averaged_probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Logits [B, T, C] (per frame) or [B, C] -> class probabilities [B, C], averaged over frames.

    Probabilities, not logits, are averaged (CAV-MAE, AVSiam): sigmoid for multi-label tasks,
    softmax for single-label ones (the published code applies sigmoid to both).
    """
    probabilities = logits.sigmoid() if multi_label else logits.softmax(dim=-1)
    return probabilities.mean(dim=1) if probabilities.dim() == 3 else probabilities


class AudioVisualClassifier(nn.Module):
    """Encoder + the heads of a finetune mode (+ fusion layers for the multimodal head)."""

    def __init__(
        self,
        encoder: AudioVisualEncoder,
        fusion: nn.Module | None,
        num_classes: int,
        mode: FinetuneMode,
        head_norm_eps: float,
    ) -> None:
        """``fusion`` is needed by (and only kept for) the modes with a multimodal head."""
        super().__init__()
        if mode not in MODE_HEADS:
            raise ValueError(f"unknown finetune mode {mode!r}; allowed: {', '.join(MODE_HEADS)}")
        self.mode = mode
        self.head_names = MODE_HEADS[mode]
        multimodal = "multimodal" in self.head_names
        if multimodal and fusion is None:
            raise ValueError(f"mode {mode!r} has a multimodal head and needs fusion layers")
        self.encoder = encoder
        self.fusion = fusion if multimodal else None
        widths = {"multimodal": 2 * encoder.embed_dim, "audio": encoder.embed_dim, "visual": encoder.embed_dim}
        self.heads = nn.ModuleDict({name: classification_head(widths[name], num_classes, head_norm_eps)
                                    for name in self.head_names})

    def forward(
        self,
        audio: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        heads: Head | Sequence[Head] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits of the requested ``heads`` (default: all of this mode's heads).

        audio [B, time, mel]; frames [B, 3, H, W] (one frame per clip) or [B, T, 3, H, W].
        Returns {head: logits}: audio [B, C]; visual and multimodal [B, C] for one frame per
        clip, [B, T, C] for T frames. Only the inputs the requested heads need are required.
        """
        heads = self.head_names if heads is None else ((heads,) if isinstance(heads, str) else tuple(heads))
        unknown = set(heads) - set(self.head_names)
        if unknown:
            raise ValueError(f"heads {sorted(unknown)} are not in mode {self.mode!r} (heads: {self.head_names})")
        out: dict[str, torch.Tensor] = {}
        if "audio" in heads or "multimodal" in heads:
            audio_tokens = self.encoder(audio, "audio")  # [B, Na, D]
            if "audio" in heads:
                out["audio"] = self.heads["audio"](audio_tokens.mean(dim=1))
        if "visual" in heads or "multimodal" in heads:
            per_frame = frames.dim() == 5
            batch, num_frames = frames.shape[0], frames.shape[1] if per_frame else 1
            visual_tokens = self.encoder(frames.flatten(0, 1) if per_frame else frames, "visual")  # [B*T, Nv, D]
            if "visual" in heads:
                logits = self.heads["visual"](visual_tokens.mean(dim=1))
                out["visual"] = logits.unflatten(0, (batch, num_frames)) if per_frame else logits
        if "multimodal" in heads:
            num_audio = audio_tokens.shape[1]
            # Every frame is fused with the clip's one audio encoding, all frames in one batch.
            audio_per_frame = audio_tokens.unsqueeze(1).expand(-1, num_frames, -1, -1).flatten(0, 1)
            fused = self.fusion(torch.cat([audio_per_frame, visual_tokens], dim=1))
            pooled = torch.cat([fused[:, :num_audio].mean(dim=1), fused[:, num_audio:].mean(dim=1)], dim=-1)
            logits = self.heads["multimodal"](pooled)
            out["multimodal"] = logits.unflatten(0, (batch, num_frames)) if per_frame else logits
        return out
