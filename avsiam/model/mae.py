"""The masked-autoencoding branch: a joint audio-visual decoder and the masked-patch MSE.

The decoder follows CAV-MAE (the reference the supplement names for this loss): one shared
mask token, fixed 2-D sin-cos position embeddings per modality, a learnable modality embedding
per modality, ``depth`` ViT blocks over all [audio; visual] tokens, and one linear prediction
head per modality. Targets are the normalised inputs themselves, patchified in the encoder's
token order.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from avsiam.model.encoder import MODALITIES, spectrogram_as_image
from avsiam.model.masking import MaeMask, gather_tokens


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, h * w, p * p * C] patches, row-major like the patch embedding.

    Values within a patch are ordered (row, column, channel), as in MAE. Pixels beyond the last
    whole patch (Huge's patch 14 on 128 mel bins) are dropped, as the strided patch embedding
    drops them.
    """
    b, c, height, width = images.shape
    h, w, p = height // patch_size, width // patch_size, patch_size
    x = images[:, :, : h * p, : w * p].reshape(b, c, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, h * w, p * p * c)


def patchify_audio(fbank: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, time, mel] fbank -> [B, F * T, p * p] patches in the encoder's (frequency, time) order."""
    return patchify(spectrogram_as_image(fbank), patch_size)


def masked_patch_mse(prediction: torch.Tensor, target: torch.Tensor, norm_pix_loss: bool = False) -> torch.Tensor:
    """Mean squared error over the removed patches [B, M, P] (every sample removes M patches).

    ``norm_pix_loss`` normalises each target patch by its own mean and variance (MAE, CAV-MAE);
    the published AVSiam code leaves it off.
    """
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return (prediction.float() - target.float()).pow(2).mean()


class MaeDecoder(nn.Module):
    """Reconstructs the removed audio and visual patches from the fused kept tokens."""

    def __init__(
        self,
        encoder_dim: int,
        audio_grid: tuple[int, int],
        visual_grid: tuple[int, int],
        audio_patch_dim: int,
        visual_patch_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos tables (CAV-MAE), not the published zero-initialised learnable ones: the
        # decoder is discarded after pretraining, so nothing has to load into it.
        for modality, grid in zip(MODALITIES, (audio_grid, visual_grid), strict=True):
            table = build_sincos2d_pos_embed(list(grid), dim=embed_dim).unsqueeze(0)
            self.register_buffer(f"pos_embed_{modality}", table, persistent=False)
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, embed_dim)) for m in MODALITIES})
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.pred = nn.ModuleDict(
            {"audio": nn.Linear(embed_dim, audio_patch_dim), "visual": nn.Linear(embed_dim, visual_patch_dim)}
        )
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's decoder initialisation: N(0, 0.02) tokens, xavier-uniform linear layers."""
        nn.init.normal_(self.mask_token, std=0.02)
        for token in self.modality_embed.values():
            nn.init.normal_(token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _unshuffle(self, kept: torch.Tensor, mask: MaeMask) -> torch.Tensor:
        """Kept tokens [B, K, D] -> all N tokens in input order, mask tokens where removed."""
        mask_tokens = self.mask_token.expand(kept.shape[0], mask.removed.shape[1], -1)
        x = torch.cat([kept, mask_tokens], dim=1)
        return gather_tokens(x, mask.restore)

    def forward(
        self, fused: torch.Tensor, audio_mask: MaeMask, visual_mask: MaeMask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused kept tokens [B, Ka + Kv, D] -> predicted audio and visual patches of the
        removed tokens only, [B, Na - Ka, Pa] and [B, Nv - Kv, Pv] (the loss ignores the rest)."""
        x = self.embed(fused)
        num_audio_kept = audio_mask.keep.shape[1]
        # The tables stay float32 when DeepSpeed casts the parameters to bf16/fp16 (it keeps
        # buffers); added as they are, they would promote the decoder's tokens to float32.
        audio = self._unshuffle(x[:, :num_audio_kept], audio_mask) + self.pos_embed_audio.to(x.dtype)
        visual = self._unshuffle(x[:, num_audio_kept:], visual_mask) + self.pos_embed_visual.to(x.dtype)
        audio, visual = audio + self.modality_embed["audio"], visual + self.modality_embed["visual"]
        x = self.blocks(torch.cat([audio, visual], dim=1))
        num_audio = audio.shape[1]
        audio_pred = self.pred["audio"](self.norm(gather_tokens(x[:, :num_audio], audio_mask.removed)))
        visual_pred = self.pred["visual"](self.norm(gather_tokens(x[:, num_audio:], visual_mask.removed)))
        return audio_pred, visual_pred
