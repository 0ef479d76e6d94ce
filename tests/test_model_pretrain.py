"""The pretraining model: losses, gradient flow (stop-gradient), buckets, determinism, CAV."""

from __future__ import annotations

import pytest
import torch

from avsiam.config import ArchConfig, resolve_recipe
from avsiam.model import build_pretrain_model, build_pretrain_model_from_recipe


def tiny_arch(**overrides) -> ArchConfig:
    fields = dict(
        embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, audio_frames=64, mel_bins=16,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    )
    return ArchConfig(**{**fields, **overrides})


def inputs(arch: ArchConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, arch.audio_frames, arch.mel_bins, generator=g)
    frames = torch.randn(batch, 3, arch.img_size, arch.img_size, generator=g)
    return audio, frames


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_forward_returns_the_summed_loss_and_detached_parts() -> None:
    arch = tiny_arch()
    torch.manual_seed(0)
    out = build_pretrain_model(arch)(*inputs(arch, 6))
    assert set(out) == {"loss", "loss_contrastive", "contrastive_acc", "loss_mae", "loss_mae_audio", "loss_mae_visual"}
    torch.testing.assert_close(out["loss"].detach(), out["loss_contrastive"] + out["loss_mae"])
    assert out["loss"].requires_grad and not out["loss_mae"].requires_grad
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_mae_loss_reaches_the_encoder_only_without_stop_gradient(stop_gradient: bool) -> None:
    arch = tiny_arch()
    model = build_pretrain_model(arch, stop_gradient_before_fusion=stop_gradient)
    audio, frames = inputs(arch, 4)
    a_tokens, v_tokens = model.encoder.embed(audio, "audio"), model.encoder.embed(frames, "visual")
    mae_audio, mae_visual = model.mae_loss(audio, frames, a_tokens, v_tokens)
    (mae_audio + mae_visual).backward()
    encoder_grads = grads(model.encoder)
    if stop_gradient:
        assert all(g is None or not g.any() for g in encoder_grads)
    else:
        assert any(g is not None and g.any() for g in encoder_grads)
    for module in (model.fusion, model.decoder):
        assert all(g is not None and g.any() for g in grads(module))


def test_contrastive_loss_trains_the_encoder_not_the_mae_branch() -> None:
    arch = tiny_arch()
    model = build_pretrain_model(arch)
    audio, frames = inputs(arch, 6)
    loss, _ = model.contrastive_loss(model.encoder.embed(audio, "audio"), model.encoder.embed(frames, "visual"))
    loss.backward()
    assert all(g is not None and g.any() for g in grads(model.encoder.blocks))
    assert all(model.encoder.patch_embed[m].proj.weight.grad.any() for m in ("audio", "visual"))
    assert all(g is None for g in grads(model.decoder))


def test_buckets_are_encoded_in_one_call_each_and_returned_in_clip_order(monkeypatch) -> None:
    arch = tiny_arch()
    model = build_pretrain_model(arch, contrastive_mask_ratios=[0.0, 0.0, 0.0])
    frames = inputs(arch, 7)[1]
    tokens = model.encoder.embed(frames, "visual")
    calls = []
    encode = model.encoder.encode
    monkeypatch.setattr(model.encoder, "encode", lambda x, m: calls.append(x.shape[0]) or encode(x, m))
    with torch.no_grad():
        pooled = model.pooled_multi_ratio(tokens, "visual")
    assert sorted(calls) == [2, 2, 3]  # one batched call per bucket
    with torch.no_grad():
        torch.testing.assert_close(pooled, encode(tokens, "visual").mean(dim=1), atol=1e-5, rtol=1e-5)


def test_masked_buckets_keep_the_expected_token_counts(monkeypatch) -> None:
    arch = tiny_arch()  # 16 audio and 16 visual tokens
    model = build_pretrain_model(arch, use_mae=False)
    seen = []
    encode = model.encoder.encode
    monkeypatch.setattr(model.encoder, "encode", lambda x, m: seen.append((m, x.shape[1])) or encode(x, m))
    torch.manual_seed(0)
    with torch.no_grad():
        model(*inputs(arch, 10))
    expected = sorted([(m, int(16 * (1 - r))) for m in ("audio", "visual") for r in (0.0, 0.2, 0.4, 0.6, 0.8)])
    assert sorted(seen) == expected


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_batches_smaller_than_or_not_divisible_by_the_ratios_work(batch: int) -> None:
    arch = tiny_arch()
    out = build_pretrain_model(arch)(*inputs(arch, batch))
    assert torch.isfinite(out["loss"])


def test_forward_is_deterministic_under_a_seed_and_a_generator() -> None:
    arch = tiny_arch()
    model = build_pretrain_model(arch)
    audio, frames = inputs(arch, 6)
    torch.manual_seed(11)
    first = model(audio, frames)["loss"]
    torch.manual_seed(11)
    torch.testing.assert_close(model(audio, frames)["loss"], first)
    g = model(audio, frames, generator=torch.Generator().manual_seed(2))["loss"]
    torch.testing.assert_close(model(audio, frames, generator=torch.Generator().manual_seed(2))["loss"], g)
    assert not torch.equal(g, first)


def test_table_3_cav_configurations() -> None:
    arch = tiny_arch(encoder="separate")
    audio, frames = inputs(arch, 4)
    cav = build_pretrain_model(
        arch, use_mae=False, contrastive_mask_ratios=[0.75], audio_contrastive_masking="unstructured"
    )
    assert cav.fusion is None and cav.decoder is None
    assert "loss_mae" not in cav(audio, frames)
    cav_mae = build_pretrain_model(
        arch, contrastive_mask_ratios=[0.75], audio_contrastive_masking="unstructured", contrastive_weight=0.01
    )
    out = cav_mae(audio, frames)
    torch.testing.assert_close(out["loss"].detach(), 0.01 * out["loss_contrastive"] + out["loss_mae"])
    multi_ratio = build_pretrain_model(arch)
    assert multi_ratio.contrastive_mask_ratios == (0.0, 0.2, 0.4, 0.6, 0.8)
    out["loss"].backward()


def test_build_from_recipe_uses_its_objective_settings() -> None:
    recipe = resolve_recipe("tiny", "pretrain_as2m", ["contrastive_mask_ratios=[0.1,0.5]", "temperature=0.07"])
    model = build_pretrain_model_from_recipe(recipe)
    assert model.contrastive_mask_ratios == (0.1, 0.5) and model.temperature == 0.07
    assert model.stop_gradient_before_fusion is recipe.stop_gradient_before_fusion


def test_patch_size_that_does_not_divide_the_inputs() -> None:
    """Huge's patch 14 drops the last mel bins and frames; the MAE targets drop the same."""
    arch = tiny_arch(patch_size=7, img_size=28)  # audio 16 x 64 -> a 2 x 9 grid
    model = build_pretrain_model(arch)
    assert model.encoder.grid("audio") == (2, 9)
    out = model(*inputs(arch, 3))
    assert torch.isfinite(out["loss"])
