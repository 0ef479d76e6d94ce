"""The audio-visual encoder: one shared ViT (AVSiam) or two ViTs that share nothing (CAV).

Both modalities are ViT token sequences. Audio is the [time, mel] log-mel fbank laid out as a
one-channel image [mel, time], so its patches tile (frequency, time) and token ``f * T + t`` is
frequency-major. Each modality has its own patch embedding, learnable position table and final
norm; what differs between the two encoders is only the stack of blocks:

* :class:`SharedBlocks` (AVSiam): attention and MLP weights are shared by both modalities, and
  every block holds one LayerNorm pair per modality (the published ``norm1_a/norm2_a`` and
  ``norm1_v/norm2_v``).
* :class:`SeparateBlocks` (the CAV baseline of the supplement's Table 3): one plain timm block
  stack per modality.

There is no cls token and no modality token; features are mean-pooled after the final norm.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from timm.layers import Attention, LayerNorm, Mlp, PatchEmbed, trunc_normal_
from timm.models import named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

from avsiam.config import ArchConfig

Modality = Literal["audio", "visual"]
MODALITIES: tuple[Modality, ...] = ("audio", "visual")


def spectrogram_as_image(fbank: torch.Tensor) -> torch.Tensor:
    """[B, time, mel] fbank -> [B, 1, mel, time]: patches then tile (frequency, time)."""
    return fbank.transpose(1, 2).unsqueeze(1)


class SiameseBlock(nn.Module):
    """Pre-norm ViT block whose attention and MLP serve every modality; each modality has its
    own LayerNorm pair, which is all that tells the modalities apart inside the encoder."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        modalities: tuple[str, ...] = MODALITIES,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = nn.ModuleDict({m: norm_layer(dim) for m in modalities})
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.ModuleDict({m: norm_layer(dim) for m in modalities})
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        x = x + self.attn(self.norm1[modality](x))
        return x + self.mlp(self.norm2[modality](x))


def _run_block(block: nn.Module, x: torch.Tensor, *args, checkpointing: bool) -> torch.Tensor:
    """``block(x, *args)``; with activation checkpointing (while training) only the block's
    input is kept and its activations are recomputed in backward: memory for ~1/3 more compute."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


class SharedBlocks(nn.ModuleList):
    """AVSiam's trunk: one stack of :class:`SiameseBlock` run by both modalities."""

    activation_checkpointing = False

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        for block in self:
            x = _run_block(block, x, modality, checkpointing=self.activation_checkpointing)
        return x


class SeparateBlocks(nn.ModuleDict):
    """The CAV baseline's trunk: one stack of timm blocks per modality, nothing shared."""

    activation_checkpointing = False

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        for block in self[modality]:
            x = _run_block(block, x, checkpointing=self.activation_checkpointing)
        return x


class AudioVisualEncoder(nn.Module):
    """Patch + position embedding, a trunk of blocks, and a final norm, per modality.

    ``embed`` gives the full token sequence (masking selects from it), ``encode`` runs the trunk
    and the final norm on any subset of tokens, and ``forward`` does both.
    """

    def __init__(
        self,
        blocks: SharedBlocks | SeparateBlocks,
        embed_dim: int,
        patch_size: int,
        img_size: int,
        audio_size: tuple[int, int],
        input_doubling: bool = False,
        norm_layer: type[nn.Module] = LayerNorm,
    ) -> None:
        """``audio_size`` is (mel_bins, audio_frames), the spectrogram as an image."""
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.patch_embed = nn.ModuleDict(
            {
                "audio": PatchEmbed(audio_size, patch_size, in_chans=1, embed_dim=embed_dim),
                "visual": PatchEmbed(img_size, patch_size, in_chans=3, embed_dim=embed_dim),
            }
        )
        self.pos_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(1, self.patch_embed[m].num_patches, embed_dim)) for m in MODALITIES}
        )
        self.blocks = blocks
        self.norm = nn.ModuleDict({m: norm_layer(embed_dim) for m in MODALITIES})
        self.input_doubling = input_doubling
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT initialisation: trunc-normal(0.02) positions and linear layers."""
        for pos in self.pos_embed.values():
            trunc_normal_(pos, std=0.02)
        named_apply(init_weights_vit_timm, self)

    def grid(self, modality: str) -> tuple[int, int]:
        return tuple(self.patch_embed[modality].grid_size)

    def num_tokens(self, modality: str) -> int:
        return self.patch_embed[modality].num_patches

    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Audio [B, time, mel] or frames [B, 3, H, W] -> all tokens with positions [B, N, D]."""
        if modality == "audio":
            x = spectrogram_as_image(x)
        x = self.patch_embed[modality](x) + self.pos_embed[modality]
        # The published code adds norm_pre(x), an Identity, to x. In a pre-norm residual network
        # doubling the input halves every residual branch's relative contribution, so the
        # released weights expect it; models trained here leave it off.
        return x + x if self.input_doubling else x

    def encode(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        """Tokens [B, K, D] (any subset of ``embed``'s) -> normalised output tokens [B, K, D]."""
        return self.norm[modality](self.blocks(tokens, modality))

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.encode(self.embed(x, modality), modality)


def block_norm(arch: ArchConfig) -> Callable[[int], nn.Module]:
    """The LayerNorm of the blocks, fusion layers and heads, with ``arch.block_norm_eps``."""
    return partial(LayerNorm, eps=arch.block_norm_eps)


def build_encoder(arch: ArchConfig) -> AudioVisualEncoder:
    """The shared (``arch.encoder == "siamese"``) or separate encoder of an architecture."""

    block = dict(dim=arch.embed_dim, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True,
                 norm_layer=block_norm(arch))
    if arch.encoder == "siamese":
        blocks = SharedBlocks([SiameseBlock(**block) for _ in range(arch.depth)])
    else:
        blocks = SeparateBlocks({m: nn.Sequential(*[Block(**block) for _ in range(arch.depth)]) for m in MODALITIES})
    blocks.activation_checkpointing = arch.activation_checkpointing
    return AudioVisualEncoder(
        blocks,
        embed_dim=arch.embed_dim,
        patch_size=arch.patch_size,
        img_size=arch.img_size,
        audio_size=(arch.mel_bins, arch.audio_frames),
        input_doubling=arch.input_doubling,
    )


def build_fusion_layers(arch: ArchConfig) -> nn.Sequential:
    """``arch.fusion_depth`` plain ViT blocks over the concatenated [audio; visual] tokens.

    They have a single LayerNorm pair for all tokens. The published code gives them the
    siamese block's three pairs but always runs them with the audio pair, which is what the
    published-checkpoint conversion maps onto this one pair. No final norm follows them.
    """
    fusion = nn.Sequential(
        *[
            Block(arch.embed_dim, arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True, norm_layer=block_norm(arch))
            for _ in range(arch.fusion_depth)
        ]
    )
    named_apply(init_weights_vit_timm, fusion)
    return fusion
