"""The audio-visual encoder: sizes, token layout, timm initialisation and the timm oracle."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from avsiam.config import ArchConfig, arch_config
from avsiam.model.encoder import SharedBlocks, build_encoder, build_fusion_layers
from avsiam.model.mae import patchify_audio
from avsiam.model.weights import audio_positions_from_visual, init_from_timm_vit


def tiny_arch(**overrides) -> ArchConfig:
    fields = dict(
        embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=32, audio_frames=64, mel_bins=16,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    )
    return ArchConfig(**{**fields, **overrides})


def timm_vit(arch: ArchConfig, class_token: bool = False, **kwargs) -> VisionTransformer:
    """A timm ViT of ``arch``'s visual side, every parameter randomised (norms included)."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, class_token=class_token, global_pool="avg",
        num_classes=0, **{"fc_norm": False, **kwargs},
    )
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit.eval()


@pytest.mark.parametrize(("size", "expected_millions"), [("base", 100.65), ("large", 329.5), ("huge", 671.6)])
def test_encoder_plus_fusion_parameter_count(size: str, expected_millions: float) -> None:
    arch = arch_config(size)
    with torch.device("meta"):
        modules = [build_encoder(arch), build_fusion_layers(arch)]
    count = sum(p.numel() for m in modules for p in m.parameters()) / 1e6
    assert count == pytest.approx(expected_millions, rel=0.02)


def test_token_grids_of_each_size() -> None:
    with torch.device("meta"):
        base, huge = build_encoder(arch_config("base")), build_encoder(arch_config("huge"))
    assert base.grid("audio") == (8, 64) and base.grid("visual") == (14, 14)
    assert huge.grid("audio") == (9, 73) and huge.grid("visual") == (16, 16)


def test_separate_encoders_share_nothing_and_siamese_shares_blocks() -> None:
    arch = tiny_arch()
    siamese, separate = build_encoder(arch), build_encoder(arch.model_copy(update={"encoder": "separate"}))
    assert isinstance(siamese.blocks, SharedBlocks)
    audio_ids = {id(p) for p in separate.blocks["audio"].parameters()}
    assert audio_ids.isdisjoint(id(p) for p in separate.blocks["visual"].parameters())
    shared_block_params = sum(p.numel() for p in siamese.blocks.parameters())
    separate_block_params = sum(p.numel() for p in separate.blocks.parameters())
    norms = arch.depth * 4 * 2 * arch.embed_dim  # the siamese blocks' per-modality norm pairs
    assert separate_block_params == 2 * (shared_block_params - norms) + norms


def test_audio_tokens_are_frequency_major_patches_of_the_spectrogram() -> None:
    """Token f*T + t embeds the patch at (frequency f, time t), which is also the MAE target."""
    arch = tiny_arch()
    encoder = build_encoder(arch)
    fbank = torch.randn(2, arch.audio_frames, arch.mel_bins)
    proj = encoder.patch_embed["audio"].proj
    tokens = encoder.patch_embed["audio"](fbank.transpose(1, 2).unsqueeze(1))
    expected = patchify_audio(fbank, arch.patch_size) @ proj.weight.flatten(1).T + proj.bias
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    freq, time = arch.audio_grid
    patch = fbank[1, 8 * 3 : 8 * 4, 8:16]  # time patch 3, frequency patch 1 (time x mel)
    torch.testing.assert_close(patchify_audio(fbank, 8)[1, 1 * time + 3], patch.T.reshape(-1))


@pytest.mark.parametrize("file_format", ["safetensors", "pth"])
@pytest.mark.parametrize("encoder_kind", ["siamese", "separate"])
def test_visual_path_equals_timm_vit(tmp_path, file_format: str, encoder_kind: str) -> None:
    arch = tiny_arch(encoder=encoder_kind)
    vit = timm_vit(arch)
    path = tmp_path / f"vit.{file_format}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(path)) if file_format == "safetensors" else torch.save(state, path)
    encoder, fusion = build_encoder(arch), build_fusion_layers(arch)
    report = init_from_timm_vit(encoder, fusion, path)
    assert not report.unexpected
    frames = torch.randn(3, 3, arch.img_size, arch.img_size)
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(frames), pre_logits=True)
        ours = encoder(frames, "visual").mean(dim=1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_audio_side_and_fusion_are_derived_from_the_vit() -> None:
    arch = tiny_arch()
    vit = timm_vit(arch)
    state = vit.state_dict()
    encoder, fusion = build_encoder(arch), build_fusion_layers(arch)
    init_from_timm_vit(encoder, fusion, state)
    kernel = state["patch_embed.proj.weight"]
    torch.testing.assert_close(encoder.patch_embed["audio"].proj.weight, kernel.mean(dim=1, keepdim=True))
    torch.testing.assert_close(encoder.patch_embed["audio"].proj.bias, state["patch_embed.proj.bias"])
    expected_pos = audio_positions_from_visual(state["pos_embed"], arch.visual_grid, arch.audio_grid, "bicubic")
    torch.testing.assert_close(encoder.pos_embed["audio"], expected_pos)
    for block_index, block in enumerate(encoder.blocks):
        for modality in ("audio", "visual"):
            torch.testing.assert_close(block.norm1[modality].weight, state[f"blocks.{block_index}.norm1.weight"])
            torch.testing.assert_close(block.norm2[modality].bias, state[f"blocks.{block_index}.norm2.bias"])
    torch.testing.assert_close(encoder.norm["audio"].weight, state["norm.weight"])
    # fusion layer j starts as block depth - fusion_depth + j
    for j, layer in enumerate(fusion):
        source = arch.depth - arch.fusion_depth + j
        torch.testing.assert_close(layer.attn.qkv.weight, state[f"blocks.{source}.attn.qkv.weight"])
        torch.testing.assert_close(layer.norm1.weight, state[f"blocks.{source}.norm1.weight"])


def test_published_fusion_init_copies_the_last_block_into_every_fusion_layer() -> None:
    arch = tiny_arch(fusion_init="last_block")
    state = timm_vit(arch).state_dict()
    encoder, fusion = build_encoder(arch), build_fusion_layers(arch)
    init_from_timm_vit(encoder, fusion, state, fusion_init=arch.fusion_init)
    last = arch.depth - 1
    assert len(fusion) == 2
    for layer in fusion:
        torch.testing.assert_close(layer.attn.qkv.weight, state[f"blocks.{last}.attn.qkv.weight"])
        torch.testing.assert_close(layer.mlp.fc2.bias, state[f"blocks.{last}.mlp.fc2.bias"])
        torch.testing.assert_close(layer.norm2.weight, state[f"blocks.{last}.norm2.weight"])


def test_audio_positions_published_nearest_stretch() -> None:
    visual = torch.randn(1, 14 * 14, 4)
    stretched = audio_positions_from_visual(visual, (14, 14), (8, 64), "nearest_1d")
    assert stretched.shape == (1, 512, 4)
    for i in (0, 1, 3, 100, 511):
        torch.testing.assert_close(stretched[0, i], visual[0, i * 196 // 512])
    resized = audio_positions_from_visual(visual, (14, 14), (8, 64), "bicubic")
    assert resized.shape == (1, 512, 4)


def test_cls_slot_is_dropped_from_a_timm_checkpoint() -> None:
    arch = tiny_arch()
    vit = timm_vit(arch, class_token=True)
    encoder = build_encoder(arch)
    report = init_from_timm_vit(encoder, None, vit.state_dict())
    torch.testing.assert_close(encoder.pos_embed["visual"], vit.pos_embed[:, 1:])
    assert report.unexpected == ["cls_token"]


def test_average_pooling_vit_without_token_norm_is_refused() -> None:
    arch = tiny_arch()
    vit = timm_vit(arch, fc_norm=True)  # its final norm applies after pooling
    with pytest.raises(ValueError, match="norm.weight"):
        init_from_timm_vit(build_encoder(arch), None, vit.state_dict())


def test_input_doubling_changes_the_output() -> None:
    arch = tiny_arch()
    state = timm_vit(arch).state_dict()
    plain, doubled = build_encoder(arch), build_encoder(arch.model_copy(update={"input_doubling": True}))
    init_from_timm_vit(plain, None, state)
    init_from_timm_vit(doubled, None, state)
    frames = torch.randn(2, 3, arch.img_size, arch.img_size)
    with torch.no_grad():
        assert not torch.allclose(plain(frames, "visual"), doubled(frames, "visual"), atol=1e-3)
        torch.testing.assert_close(doubled.embed(frames, "visual"), 2 * plain.embed(frames, "visual"))


def test_vit_of_another_depth_is_refused() -> None:
    vit = timm_vit(tiny_arch(depth=2))
    with pytest.raises(ValueError, match="has 2 blocks, the encoder 3"):
        init_from_timm_vit(build_encoder(tiny_arch()), None, vit.state_dict())


def test_activation_checkpointing_gives_the_same_gradients():
    import torch

    from avsiam.config import arch_config
    from avsiam.model.encoder import build_encoder

    arch = arch_config("tiny").model_copy(update={"depth": 2})
    torch.manual_seed(0)
    plain = build_encoder(arch)
    checkpointed = build_encoder(arch.model_copy(update={"activation_checkpointing": True}))
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 224, 224)
    for model in (plain, checkpointed):
        model(x, "visual").pow(2).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None) == (b.grad is None), name  # the audio side gets no gradient here
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6), name
