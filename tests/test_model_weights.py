"""Loading pretrained weights: this project's safetensors and the published AVSiam layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from avsiam.config import ArchConfig
from avsiam.model import build_finetune_model, build_pretrain_model, load_pretrained

NUM_CLASSES = 4


def tiny_arch(**overrides) -> ArchConfig:
    fields = dict(
        embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, audio_frames=64, mel_bins=16,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    )
    return ArchConfig(**{**fields, **overrides})


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> None:
    for name, tensor in a.state_dict().items():
        if name.startswith(prefix):
            torch.testing.assert_close(b.state_dict()[name], tensor, msg=name)


def test_own_pretraining_checkpoint_loads_into_the_classifier(tmp_path) -> None:
    arch = tiny_arch()
    pretrained = randomised(build_pretrain_model(arch), seed=1)
    path = tmp_path / "pretrain.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(path))
    classifier = build_finetune_model(arch, NUM_CLASSES)
    report = load_pretrained(classifier, path)
    assert_same_parameters(pretrained, classifier, "encoder.")
    assert_same_parameters(pretrained, classifier, "fusion.")
    assert report.dropped and all(k.startswith("decoder.") for k in report.dropped)
    assert report.missing and all(k.startswith("heads.") for k in report.missing)
    assert not report.unexpected
    # the builder does the same
    assert_same_parameters(pretrained, build_finetune_model(arch, NUM_CLASSES, pretrained=path), "encoder.")


def published_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under the published AVSiam names, with the published extras."""
    arch_depth = len(model.encoder.blocks)
    dim = model.encoder.embed_dim
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def put(published: str, tensor: torch.Tensor) -> None:
        out[f"module.{published}"] = tensor.clone()

    for kind in ("weight", "bias"):
        put(f"vit_base.patch_embed.proj.{kind}", ours[f"encoder.patch_embed.visual.proj.{kind}"])
        put(f"vit_base.patch_embed_a.proj.{kind}", ours[f"encoder.patch_embed.audio.proj.{kind}"])
        put(f"vit_base.norm.{kind}", ours[f"encoder.norm.visual.{kind}"])
        put(f"vit_base.norm_a.{kind}", ours[f"encoder.norm.audio.{kind}"])
        for i in range(arch_depth):
            for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                put(f"vit_base.blocks.{i}.{layer}.{kind}", ours[f"encoder.blocks.{i}.{layer}.{kind}"])
                put(f"my_blocks.{i}.{layer}.{kind}", ours[f"encoder.blocks.{i}.{layer}.{kind}"])
            for n in (1, 2):
                put(f"vit_base.blocks.{i}.norm{n}_a.{kind}", ours[f"encoder.blocks.{i}.norm{n}.audio.{kind}"])
                put(f"vit_base.blocks.{i}.norm{n}_v.{kind}", ours[f"encoder.blocks.{i}.norm{n}.visual.{kind}"])
                put(f"vit_base.blocks.{i}.norm{n}.{kind}", torch.randn(dim))
        for j in range(len(model.fusion)):
            for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                put(f"mm_layer_{j + 1}.{layer}.{kind}", ours[f"fusion.{j}.{layer}.{kind}"])
            for n in (1, 2):
                put(f"mm_layer_{j + 1}.norm{n}_a.{kind}", ours[f"fusion.{j}.norm{n}.{kind}"])
                put(f"mm_layer_{j + 1}.norm{n}_v.{kind}", torch.randn(dim))
                put(f"mm_layer_{j + 1}.norm{n}.{kind}", torch.randn(dim))
        for published, head in (("mlp_head", "visual"), ("mlp_head_a", "audio"), ("mlp_head_mm", "multimodal")):
            for index in (0, 1):
                put(f"{published}.{index}.{kind}", ours[f"heads.{head}.{index}.{kind}"])
    put("vit_base.cls_token", torch.randn(1, 1, dim))
    put("vit_base.pos_embed", torch.cat([torch.randn(1, 1, dim), ours["encoder.pos_embed.visual"]], dim=1))
    put("vit_base.pos_embed_a", ours["encoder.pos_embed.audio"])
    extras = [
        "vit_base.head.weight", "my_patch_embed.proj.weight", "my_patch_embed_a.proj.weight",
        "ast_base.blocks.0.attn.qkv.weight", "decoder_embed.weight", "decoder_pos_embed_a", "decoder_pred_v.bias",
        "mask_token", "mlp_head_mm_v2.1.weight",
    ]
    for name in extras:
        put(name, torch.randn(3))
    return out


def test_published_layout_maps_onto_the_shared_encoder(tmp_path) -> None:
    arch = tiny_arch(input_doubling=True)
    source = randomised(build_finetune_model(arch, NUM_CLASSES), seed=2)
    checkpoint = published_checkpoint(source)
    checkpoint["module.something_new.weight"] = torch.randn(2)
    path = tmp_path / "published.pth"
    torch.save(checkpoint, path)
    target = build_finetune_model(arch, NUM_CLASSES)
    report = load_pretrained(target, path)
    assert_same_parameters(source, target)
    assert not report.missing
    assert report.unexpected == ["module.something_new.weight"]
    dropped = set(report.dropped)
    assert {"module.ast_base.blocks.0.attn.qkv.weight", "module.vit_base.cls_token", "module.mask_token"} <= dropped
    assert any(k.startswith("module.my_blocks.") for k in dropped)
    assert any(k.startswith("module.mm_layer_1.norm1_v") for k in dropped)
    assert len(report.loaded) == len(target.state_dict())


@pytest.mark.parametrize("size", ["large", "huge"])
def test_published_large_and_huge_layouts_load_like_base(size: str) -> None:
    # Their model classes hold the shared ViT as vit_large / vit_huge; the rest is Base's layout.
    arch = tiny_arch(input_doubling=True)
    source = randomised(build_finetune_model(arch, NUM_CLASSES), seed=4)
    checkpoint = {k.replace("module.vit_base.", f"module.vit_{size}."): v for k, v in published_checkpoint(source).items()}
    target = build_finetune_model(arch, NUM_CLASSES)
    report = load_pretrained(target, checkpoint)
    assert_same_parameters(source, target)
    assert not report.missing and not report.unexpected
    assert f"module.vit_{size}.cls_token" in report.dropped


def test_a_published_checkpoint_of_another_size_names_the_model_to_use() -> None:
    checkpoint = {k.replace("module.vit_base.", "module.vit_large."): v
                  for k, v in published_checkpoint(build_finetune_model(tiny_arch(), NUM_CLASSES)).items()}
    wider = build_finetune_model(tiny_arch(embed_dim=64, num_heads=4), NUM_CLASSES)
    with pytest.raises(ValueError, match=r"published vit_large checkpoint .* pass --model large"):
        load_pretrained(wider, checkpoint)


def test_published_layout_needs_the_shared_encoder() -> None:
    checkpoint = published_checkpoint(build_finetune_model(tiny_arch(), NUM_CLASSES))
    separate = build_finetune_model(tiny_arch(encoder="separate"), NUM_CLASSES)
    with pytest.raises(ValueError, match="lacks encoder tensors"):
        load_pretrained(separate, checkpoint)


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="neither"):
        load_pretrained(build_finetune_model(tiny_arch(), NUM_CLASSES), {"blocks.0.attn.qkv.weight": torch.zeros(1)})
