"""The finetuning classifier: modes, heads computed on demand, 10-frame evaluation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from avsiam.config import ArchConfig, resolve_recipe
from avsiam.model import (
    build_finetune_model,
    build_finetune_model_from_recipe,
    draw_training_head,
    frame_averaged_probabilities,
)

NUM_CLASSES = 5


def tiny_arch(**overrides) -> ArchConfig:
    fields = dict(
        embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, audio_frames=64, mel_bins=16,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    )
    return ArchConfig(**{**fields, **overrides})


def inputs(arch: ArchConfig, batch: int, frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, arch.audio_frames, arch.mel_bins, generator=g)
    frame = (3, arch.img_size, arch.img_size)
    shape = (batch, *frame) if frames is None else (batch, frames, *frame)
    return audio, torch.randn(*shape, generator=g)


@pytest.mark.parametrize(
    ("mode", "heads"),
    [
        ("mixed", {"multimodal", "audio", "visual"}),
        ("multimodal", {"multimodal"}),
        ("audio", {"audio"}),
        ("visual", {"visual"}),
    ],
)
def test_each_mode_holds_only_its_heads(mode: str, heads: set[str]) -> None:
    model = build_finetune_model(tiny_arch(), NUM_CLASSES, mode=mode)
    assert set(model.heads) == heads
    assert (model.fusion is not None) == ("multimodal" in heads)
    out = model(*inputs(tiny_arch(), 3))
    assert set(out) == heads and all(v.shape == (3, NUM_CLASSES) for v in out.values())


def test_training_shapes_and_multimodal_head_width() -> None:
    arch = tiny_arch()
    model = build_finetune_model(arch, NUM_CLASSES)
    assert model.heads["multimodal"][1].in_features == 2 * arch.embed_dim
    assert model.heads["multimodal"][0].normalized_shape == (2 * arch.embed_dim,)


def test_only_requested_heads_run_and_only_their_inputs_are_needed() -> None:
    arch = tiny_arch()
    model = build_finetune_model(arch, NUM_CLASSES)
    audio, frames = inputs(arch, 2)
    assert set(model(audio=audio, heads="audio")) == {"audio"}
    assert set(model(frames=frames, heads=["visual"])) == {"visual"}
    out = model(audio, frames, heads="multimodal")
    out["multimodal"].sum().backward()
    # the unused heads get no gradient: their work was never done
    assert model.heads["audio"][1].weight.grad is None and model.heads["visual"][1].weight.grad is None
    with pytest.raises(ValueError, match="not in mode"):
        build_finetune_model(arch, NUM_CLASSES, mode="audio")(audio, heads="visual")


def test_ten_frame_evaluation_fuses_every_frame_with_the_audio() -> None:
    arch = tiny_arch()
    model = build_finetune_model(arch, NUM_CLASSES).eval()
    audio, frames = inputs(arch, 2, frames=10)
    with torch.no_grad():
        out = model(audio, frames)
        assert out["audio"].shape == (2, NUM_CLASSES)
        assert out["visual"].shape == out["multimodal"].shape == (2, 10, NUM_CLASSES)
        for t in (0, 7):
            single = model(audio, frames[:, t])
            torch.testing.assert_close(out["multimodal"][:, t], single["multimodal"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["visual"][:, t], single["visual"], atol=1e-5, rtol=1e-5)


def test_frame_averaged_probabilities() -> None:
    logits = torch.randn(2, 10, NUM_CLASSES)
    torch.testing.assert_close(frame_averaged_probabilities(logits, multi_label=True), logits.sigmoid().mean(dim=1))
    single = frame_averaged_probabilities(logits, multi_label=False)
    torch.testing.assert_close(single, logits.softmax(dim=-1).mean(dim=1))
    torch.testing.assert_close(single.sum(dim=-1), torch.ones(2))
    torch.testing.assert_close(frame_averaged_probabilities(logits[:, 0], True), logits[:, 0].sigmoid())


def test_mixed_head_draw_is_seeded_and_has_the_published_frequencies() -> None:
    draws = [draw_training_head("mixed", torch.Generator().manual_seed(step)) for step in range(2000)]
    again = [draw_training_head("mixed", torch.Generator().manual_seed(step)) for step in range(50)]
    assert draws[:50] == again  # same seed on every rank -> same head
    counts = Counter(draws)
    assert counts["multimodal"] / 2000 == pytest.approx(0.5, abs=0.05)
    assert counts["audio"] / 2000 == pytest.approx(0.25, abs=0.05)
    assert counts["visual"] / 2000 == pytest.approx(0.25, abs=0.05)
    assert draw_training_head("audio") == "audio"


def test_build_from_recipe_uses_its_mode() -> None:
    recipe = resolve_recipe("tiny", "finetune_as20k", ["finetune_mode=visual"])
    model = build_finetune_model_from_recipe(recipe, num_classes=3)
    assert model.mode == "visual" and model.fusion is None
