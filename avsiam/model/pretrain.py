"""AVSiam pretraining: multi-ratio masked contrastive learning plus masked autoencoding.

One forward computes both objectives and returns their sum, for one optimizer (the paper's
L = L_c + L_rec; the published code instead alternates two Adam optimizers, one per loss).

* Contrastive: each modality's clips are dealt into one bucket per mask ratio; audio is masked
  with time-frequency structure, frames without; each bucket is encoded in one batched call
  and mean-pooled, and a symmetric InfoNCE runs over the batch gathered from every rank.
* MAE: 75 % of each modality's tokens are removed at random; the kept tokens are encoded, then
  fused jointly by the fusion layers and decoded. The supplement stops the gradient before the
  fusion layers, so this loss trains only the fusion layers and the decoder, and the encoder
  runs here without autograd (``stop_gradient_before_fusion=False`` lets it train the encoder,
  as the published Base code does).

The contrastive features are mean-pooled encoder outputs (no projection head, fixed
temperature), as published. CAV-MAE-style configurations (Table 3) only change the options.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from avsiam.config.schema import AudioMasking
from avsiam.model.contrastive import gather_with_grad, info_nce
from avsiam.model.encoder import AudioVisualEncoder
from avsiam.model.mae import MaeDecoder, masked_patch_mse, patchify, patchify_audio
from avsiam.model.masking import (
    gather_tokens,
    keep_lowest,
    mae_mask,
    num_kept,
    ratio_buckets,
    time_frequency_noise,
    uniform_noise,
)


class AudioVisualPretrainingModel(nn.Module):
    """Encoder + (fusion layers + MAE decoder); ``forward`` returns the summed loss."""

    def __init__(
        self,
        encoder: AudioVisualEncoder,
        fusion: nn.Module | None,
        decoder: MaeDecoder | None,
        *,
        contrastive_mask_ratios: Sequence[float],
        audio_contrastive_masking: AudioMasking,
        mae_mask_ratio: float,
        temperature: float,
        stop_gradient_before_fusion: bool,
        contrastive_weight: float,
        norm_pix_loss: bool,
    ) -> None:
        """``fusion`` and ``decoder`` together are the MAE branch: both None for contrastive only.
        The objective's options are the recipe's (``RecipeConfig`` defines and validates them;
        ``avsiam.model.builders`` passes them)."""
        super().__init__()
        if (fusion is None) != (decoder is None):
            raise ValueError("the MAE branch needs both the fusion layers and the decoder, or neither")
        self.encoder = encoder
        self.fusion = fusion
        self.decoder = decoder
        self.contrastive_mask_ratios = tuple(float(r) for r in contrastive_mask_ratios)
        self.audio_contrastive_masking = audio_contrastive_masking
        self.mae_mask_ratio = mae_mask_ratio
        self.temperature = temperature
        self.stop_gradient_before_fusion = stop_gradient_before_fusion
        self.contrastive_weight = contrastive_weight
        self.norm_pix_loss = norm_pix_loss

    # --- contrastive ------------------------------------------------------------------------
    def _contrastive_noise(
        self, modality: str, batch: int, ratio: float, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        if modality == "audio" and self.audio_contrastive_masking == "tf":
            return time_frequency_noise(batch, self.encoder.grid("audio"), ratio, generator=generator, device=device)
        return uniform_noise(batch, self.encoder.num_tokens(modality), generator=generator, device=device)

    def pooled_multi_ratio(
        self, tokens: torch.Tensor, modality: str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """All tokens [B, N, D] -> one mean-pooled feature per clip [B, D], each clip encoded
        with the kept tokens of its bucket's mask ratio."""
        batch, num_tokens, _ = tokens.shape
        buckets = ratio_buckets(batch, len(self.contrastive_mask_ratios), generator=generator, device=tokens.device)
        pooled, order = [], []
        for ratio, clips in zip(self.contrastive_mask_ratios, buckets, strict=True):
            if clips.shape[0] == 0:
                continue
            keep = num_kept(num_tokens, ratio)
            if keep == num_tokens:
                kept = tokens[clips]
            else:
                noise = self._contrastive_noise(modality, clips.shape[0], ratio, generator, tokens.device)
                kept = tokens[clips.unsqueeze(1), keep_lowest(noise, keep)]
            pooled.append(self.encoder.encode(kept, modality).mean(dim=1))
            order.append(clips)
        return torch.cat(pooled)[torch.cat(order).argsort()]

    def contrastive_loss(
        self, audio_tokens: torch.Tensor, visual_tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(InfoNCE loss, retrieval accuracy) over the global batch; audio and visual bucket
        assignments are independent, so one clip's two modalities get independent ratios."""
        audio = self.pooled_multi_ratio(audio_tokens, "audio", generator)
        visual = self.pooled_multi_ratio(visual_tokens, "visual", generator)
        return info_nce(gather_with_grad(audio), gather_with_grad(visual), self.temperature)

    # --- masked autoencoding ----------------------------------------------------------------
    def mae_loss(
        self,
        audio: torch.Tensor,
        frames: torch.Tensor,
        audio_tokens: torch.Tensor,
        visual_tokens: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(audio, visual) masked-patch MSE; ``*_tokens`` are the encoder's ``embed`` of the inputs."""
        masks = {}
        for modality, tokens in (("audio", audio_tokens), ("visual", visual_tokens)):
            batch, num_tokens, _ = tokens.shape
            noise = uniform_noise(batch, num_tokens, generator=generator, device=tokens.device)
            masks[modality] = mae_mask(noise, num_kept(num_tokens, self.mae_mask_ratio))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.stop_gradient_before_fusion):
            encoded = [
                self.encoder.encode(gather_tokens(tokens, masks[modality].keep), modality)
                for modality, tokens in (("audio", audio_tokens), ("visual", visual_tokens))
            ]
        fused = self.fusion(torch.cat(encoded, dim=1))
        audio_pred, visual_pred = self.decoder(fused, masks["audio"], masks["visual"])
        patch_size = self.encoder.patch_size
        audio_target = gather_tokens(patchify_audio(audio, patch_size), masks["audio"].removed)
        visual_target = gather_tokens(patchify(frames, patch_size), masks["visual"].removed)
        return (
            masked_patch_mse(audio_pred, audio_target, self.norm_pix_loss),
            masked_patch_mse(visual_pred, visual_target, self.norm_pix_loss),
        )

    # --- both -------------------------------------------------------------------------------
    def forward(
        self, audio: torch.Tensor, frames: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """audio [B, time, mel] and one frame per clip [B, 3, H, W] -> losses and metrics.

        Returns ``loss`` (to back-propagate) and, detached, ``loss_contrastive`` and
        ``contrastive_acc``; with the MAE branch also ``loss_mae`` = ``loss_mae_audio`` +
        ``loss_mae_visual``. All randomness comes from ``generator`` or the global RNG.
        """
        audio_tokens = self.encoder.embed(audio, "audio")
        visual_tokens = self.encoder.embed(frames, "visual")
        contrastive, accuracy = self.contrastive_loss(audio_tokens, visual_tokens, generator)
        loss = self.contrastive_weight * contrastive
        out = {"loss_contrastive": contrastive.detach(), "contrastive_acc": accuracy}
        if self.decoder is not None:
            mae_audio, mae_visual = self.mae_loss(audio, frames, audio_tokens, visual_tokens, generator)
            loss = loss + mae_audio + mae_visual
            out.update(
                loss_mae=(mae_audio + mae_visual).detach(),
                loss_mae_audio=mae_audio.detach(),
                loss_mae_visual=mae_visual.detach(),
            )
        return {"loss": loss, **out}
