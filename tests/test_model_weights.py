"""Loading pretrained weights: this project's safetensors and the published AVSiam layout."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import published_checkpoint
from safetensors.torch import save_file

from avsiam.config import ArchConfig, ConfigError, explicit_settings, resolve_recipe
from avsiam.model import build_finetune_model, build_pretrain_model, load_pretrained
from avsiam.model.weights import LoadReport, published_size, resolve_checkpoint_recipe

NUM_CLASSES = 4
# What a model must be built with to take published weights (ArchConfig fields).
PUBLISHED = {"input_doubling": True, "block_norm_eps": 1e-5}


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


def test_published_layout_maps_onto_the_shared_encoder(tmp_path) -> None:
    arch = tiny_arch(**PUBLISHED)
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
    arch = tiny_arch(**PUBLISHED)
    source = randomised(build_finetune_model(arch, NUM_CLASSES), seed=4)
    checkpoint = {k.replace("module.vit_base.", f"module.vit_{size}."): v for k, v in published_checkpoint(source).items()}
    target = build_finetune_model(arch, NUM_CLASSES)
    report = load_pretrained(target, checkpoint)
    assert_same_parameters(source, target)
    assert not report.missing and not report.unexpected
    assert f"module.vit_{size}.cls_token" in report.dropped


def test_a_published_checkpoint_of_another_size_names_the_model_to_use() -> None:
    checkpoint = {k.replace("module.vit_base.", "module.vit_large."): v
                  for k, v in published_checkpoint(build_finetune_model(tiny_arch(**PUBLISHED), NUM_CLASSES)).items()}
    wider = build_finetune_model(tiny_arch(embed_dim=64, num_heads=4, **PUBLISHED), NUM_CLASSES)
    with pytest.raises(ValueError, match=r"published vit_large checkpoint .* pass --model large"):
        load_pretrained(wider, checkpoint)


def test_published_layout_needs_the_shared_encoder() -> None:
    checkpoint = published_checkpoint(build_finetune_model(tiny_arch(**PUBLISHED), NUM_CLASSES))
    separate = build_finetune_model(tiny_arch(encoder="separate", **PUBLISHED), NUM_CLASSES)
    with pytest.raises(ValueError, match="lacks encoder tensors"):
        load_pretrained(separate, checkpoint)


@pytest.mark.parametrize(("arch", "named"), [
    ({}, "arch.input_doubling=True arch.block_norm_eps=1e-05; this model has arch.input_doubling=False, arch.block_norm_eps=1e-06"),
    ({"input_doubling": True}, "arch.block_norm_eps=1e-05; this model has arch.block_norm_eps=1e-06"),
])
def test_a_model_built_without_the_published_architecture_refuses_published_weights(arch, named) -> None:
    checkpoint = published_checkpoint(build_finetune_model(tiny_arch(**PUBLISHED), NUM_CLASSES))
    with pytest.raises(ValueError, match=re.escape(named)):
        load_pretrained(build_finetune_model(tiny_arch(**arch), NUM_CLASSES), checkpoint)


def test_a_published_checkpoint_implies_its_architecture_and_refuses_a_contradicting_option(tmp_path) -> None:
    published = tmp_path / "published.pth"
    torch.save(published_checkpoint(build_finetune_model(tiny_arch(**PUBLISHED), NUM_CLASSES)), published)
    own = tmp_path / "own.safetensors"
    save_file({k: v.contiguous() for k, v in build_finetune_model(tiny_arch(), NUM_CLASSES).state_dict().items()}, str(own))
    assert published_size(published) == "base" and published_size(own) is None
    recipe = resolve_recipe("tiny", "finetune_vggsound")
    implied = resolve_checkpoint_recipe(recipe, published, {}, "--init")
    assert (implied.arch.input_doubling, implied.arch.block_norm_eps) == (True, 1e-5)
    assert implied.arch.audio_pos_init == recipe.arch.audio_pos_init  # only what the weights need
    assert resolve_checkpoint_recipe(recipe, own, {}, "--init") == recipe
    agreeing = explicit_settings(["arch.input_doubling=true"], "published")
    assert resolve_checkpoint_recipe(recipe, published, agreeing, "--init").arch.block_norm_eps == 1e-5
    with pytest.raises(ConfigError, match=r"--init .*published.pth: a published AVSiam checkpoint, trained with "
                                          r"arch.input_doubling=True; arch.input_doubling=False contradicts it"):
        resolve_checkpoint_recipe(recipe, published, explicit_settings(["arch.input_doubling=false"]), "--init")


def test_the_load_report_counts_tensors_by_group() -> None:
    report = LoadReport("w.pth", loaded=["encoder.a", "encoder.b", "heads.audio.0.weight"], missing=["heads.visual.1.bias"],
                        dropped=["module.mask_token", "module.decoder_embed.weight"])
    assert report.by_group()["loaded"] == {"encoder": 2, "heads": 1}
    tags = report.tags()
    assert tags["avsiam.init"] == "w.pth" and tags["avsiam.init.loaded"] == "encoder 2, heads 1"
    assert tags["avsiam.init.dropped"] == "decoder_embed 1, mask_token 1" and tags["avsiam.init.unexpected"] == "none"


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="neither"):
        load_pretrained(build_finetune_model(tiny_arch(), NUM_CLASSES), {"blocks.0.attn.qkv.weight": torch.zeros(1)})
