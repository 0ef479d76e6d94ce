"""A published AVSiam checkpoint computes what the published code computes.

The reference below is written from the description of the published finetuning model
(GenjiB/AVSiam's ``CAVMAEFT_BASE``; the published code itself has no licence and is not
copied): a timm-style ViT ``vit_base`` whose custom pre-LN blocks hold three LayerNorm pairs
(generic, ``_a``, ``_v``; torch's ``nn.LayerNorm``, eps 1e-5), final norms ``norm`` / ``norm_a``
(timm's, eps 1e-6), every token doubled before block 1 (``x + norm_pre(x)``), two fusion blocks
``mm_layer_1/2`` always run with their audio norms, and LayerNorm + Linear heads. Its random
weights, saved under the published names, are loaded into avsiam's model, whose logits must
match the reference's to 1e-6 in fp32: multimodal, audio-only, visual-only, one frame and the
10-frame evaluation path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avsiam.config import ArchConfig
from avsiam.model import build_finetune_model, load_pretrained
from avsiam.model.finetune import frame_averaged_probabilities

DIM, DEPTH, HEADS, PATCH, IMG, FRAMES, MELS, CLASSES = 32, 2, 2, 8, 32, 64, 16, 5


class ReferenceAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / (DIM // HEADS) ** 0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, DIM))


class ReferenceMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReferenceBlock(nn.Module):
    """The published block: shared attention and MLP, a LayerNorm pair per modality (and a generic one)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("norm1", "norm2", "norm1_a", "norm2_a", "norm1_v", "norm2_v"):
            setattr(self, name, nn.LayerNorm(DIM))  # torch's default eps, 1e-5
        self.attn, self.mlp = ReferenceAttention(), ReferenceMlp()

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        suffix = {"a": "_a", "v": "_v"}[modality]
        x = x + self.attn(getattr(self, f"norm1{suffix}")(x))
        return x + self.mlp(getattr(self, f"norm2{suffix}")(x))


class ReferenceViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed, self.patch_embed_a = nn.Module(), nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.patch_embed_a.proj = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))  # saved, never used
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (IMG // PATCH) ** 2, DIM))  # with the cls slot
        self.pos_embed_a = nn.Parameter(torch.zeros(1, (MELS // PATCH) * (FRAMES // PATCH), DIM))
        self.blocks = nn.ModuleList(ReferenceBlock() for _ in range(DEPTH))
        self.norm, self.norm_a = nn.LayerNorm(DIM, eps=1e-6), nn.LayerNorm(DIM, eps=1e-6)  # timm's final norms


class ReferenceClassifier(nn.Module):
    """The published finetuning model (``CAVMAEFT_BASE``, from its description)."""

    def __init__(self) -> None:
        super().__init__()
        self.vit_base = ReferenceViT()
        self.mm_layer_1, self.mm_layer_2 = ReferenceBlock(), ReferenceBlock()
        self.mlp_head = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, CLASSES))
        self.mlp_head_a = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, CLASSES))
        self.mlp_head_mm = nn.Sequential(nn.LayerNorm(2 * DIM), nn.Linear(2 * DIM, CLASSES))

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        vit = self.vit_base
        x = fbank.unsqueeze(1).transpose(2, 3)  # [B, 1, mel, time]
        x = vit.patch_embed_a.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed_a
        x = x + x  # x + norm_pre(x), norm_pre an Identity
        for block in vit.blocks:
            x = block(x, "a")
        return vit.norm_a(x)

    def encode_visual(self, frames: torch.Tensor) -> torch.Tensor:
        vit = self.vit_base
        x = vit.patch_embed.proj(frames).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
        x = x + x
        for block in vit.blocks:
            x = block(x, "v")
        return vit.norm(x)

    def forward(self, fbank: torch.Tensor, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames [B, T, 3, H, W] -> audio-only [B, C], visual-only and multimodal [B, T, C]."""
        batch, steps = frames.shape[:2]
        audio = self.encode_audio(fbank)
        visual = self.encode_visual(frames.flatten(0, 1))
        fused = torch.cat([audio.repeat_interleave(steps, dim=0), visual], dim=1)
        for layer in (self.mm_layer_1, self.mm_layer_2):
            fused = layer(fused, "a")
        pooled = torch.cat([fused[:, : audio.shape[1]].mean(dim=1), fused[:, audio.shape[1]:].mean(dim=1)], dim=-1)
        return {
            "audio": self.mlp_head_a(audio.mean(dim=1)),
            "visual": self.mlp_head(visual.mean(dim=1)).unflatten(0, (batch, steps)),
            "multimodal": self.mlp_head_mm(pooled).unflatten(0, (batch, steps)),
        }


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    reference = ReferenceClassifier()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            is_norm_weight = name.endswith("weight") and p.dim() == 1
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm_weight else 0.1 * torch.randn_like(p))
    checkpoint = {f"module.{k}": v.clone() for k, v in reference.state_dict().items()}
    arch = ArchConfig(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, img_size=IMG, audio_frames=FRAMES,
                      mel_bins=MELS, input_doubling=True, block_norm_eps=1e-5)
    model = build_finetune_model(arch, CLASSES)
    report = load_pretrained(model, checkpoint)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(model.state_dict())
    return reference.eval(), model.eval()


@pytest.mark.parametrize("frames", [1, 10], ids=["one frame", "10-frame evaluation"])
def test_published_weights_give_the_published_logits(models, frames: int) -> None:
    reference, model = models
    torch.manual_seed(frames)
    fbank, clip = torch.randn(3, FRAMES, MELS), torch.randn(3, frames, 3, IMG, IMG)
    with torch.no_grad():
        expected = reference(fbank, clip)
        ours = model(audio=fbank, frames=clip)
        single = model(audio=fbank, frames=clip[:, 0])  # [B, 3, H, W]: the training path
    for head in ("multimodal", "audio", "visual"):
        torch.testing.assert_close(ours[head], expected[head], atol=1e-6, rtol=1e-6, msg=head)
        assert expected[head].abs().max() > 0.5  # the logits are not trivially small
    torch.testing.assert_close(single["multimodal"], expected["multimodal"][:, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(single["visual"], expected["visual"][:, 0], atol=1e-6, rtol=1e-6)
    # The evaluation's frame-averaged probabilities (sigmoid for AudioSet, softmax for VGGSound).
    for multi_label in (True, False):
        torch.testing.assert_close(frame_averaged_probabilities(ours["multimodal"], multi_label),
                                   frame_averaged_probabilities(expected["multimodal"], multi_label), atol=1e-6, rtol=1e-6)


def test_without_the_published_doubling_and_eps_the_logits_differ(models) -> None:
    """The two details matter: the same weights in a model built without them give other logits
    (eps matters little on these unit-variance random tokens, more on trained ones)."""
    reference, _ = models
    checkpoint = {f"module.{k}": v for k, v in reference.state_dict().items()}
    for wrong in ({"input_doubling": False}, {"block_norm_eps": 1e-6}):
        arch = ArchConfig(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, img_size=IMG, audio_frames=FRAMES,
                          mel_bins=MELS, **{"input_doubling": True, "block_norm_eps": 1e-5, **wrong})
        model = build_finetune_model(arch, CLASSES)
        with pytest.raises(ValueError, match="a published AVSiam checkpoint, trained with"):
            load_pretrained(model, checkpoint)
        # Loaded anyway (bypassing the check), it computes something else.
        published = build_finetune_model(arch.model_copy(update={"input_doubling": True, "block_norm_eps": 1e-5}), CLASSES)
        load_pretrained(published, checkpoint)
        model.load_state_dict(published.state_dict())
        fbank, clip = torch.randn(2, FRAMES, MELS), torch.randn(2, 1, 3, IMG, IMG)
        with torch.no_grad():
            gap = (model(audio=fbank, frames=clip)["audio"] - reference(fbank, clip)["audio"]).abs().max()
        assert gap > 10 * 1e-6, wrong  # well beyond the 1e-6 the published architecture agrees to


def test_evaluate_scores_a_published_checkpoint_as_the_model_it_converts_to(staged_single, tmp_path) -> None:
    """`avsiam evaluate --weights published.pth` builds the published architecture by itself and
    scores what this project's safetensors of the same model score; a contradicting option is refused."""
    import json

    import yaml
    from helpers import avsiam, published_checkpoint
    from safetensors.torch import save_file

    from avsiam.config import resolve_recipe
    from avsiam.data.index import load_index
    from avsiam.model import build_finetune_model_from_recipe

    fast = ["arch.depth=2", "num_workers=0"]
    recipe = resolve_recipe("tiny", "finetune_vggsound", fast, variant="published")
    torch.manual_seed(3)
    model = build_finetune_model_from_recipe(recipe, load_index(staged_single).num_classes)
    torch.save(published_checkpoint(model), tmp_path / "published.pth")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "own.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    common = ["--data", staged_single]
    published = avsiam("evaluate", "--model", "tiny", "--recipe", "finetune_vggsound", "--weights", tmp_path / "published.pth",
                       *common, "--output", tmp_path / "a", *fast)
    assert "a published AVSiam checkpoint: building the model with arch.input_doubling=True arch.block_norm_eps=1e-05" in published.stderr
    assert "published.pth: loaded" in published.stderr  # the load report
    avsiam("evaluate", "--config", tmp_path / "config.yaml", "--weights", tmp_path / "own.safetensors", *common, "--output", tmp_path / "b")
    assert json.loads((tmp_path / "a" / "results.json").read_text()) == json.loads((tmp_path / "b" / "results.json").read_text())
    refused = avsiam("evaluate", "--model", "tiny", "--recipe", "finetune_vggsound", "--weights", tmp_path / "published.pth",
                     *common, "--output", tmp_path / "c", *fast, "arch.block_norm_eps=1e-6", check=False)
    assert refused.returncode == 2 and "arch.block_norm_eps=1e-06 contradicts it" in refused.stderr
    avsiam("evaluate", "--model", "tiny", "--recipe", "finetune_vggsound", "--weights", tmp_path / "published.pth",
           *common, "--output", tmp_path / "d", *fast, "arch.block_norm_eps=1e-5")
    assert json.loads((tmp_path / "d" / "results.json").read_text()) == json.loads((tmp_path / "b" / "results.json").read_text())
