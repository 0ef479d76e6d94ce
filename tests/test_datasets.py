"""Datasets over a staged dataset: shapes, determinism per key, augmentations, no silent fallbacks."""

import pytest
import torch

from avsiam.config import resolve_recipe
from avsiam.data.datasets import EvalClips, FinetuneClips, PretrainClips
from avsiam.data.errors import DecodeError
from avsiam.data.manifest import load_manifest


@pytest.fixture(scope="module")
def manifest(staged_single):
    return load_manifest(staged_single)


def test_pretrain_items_are_one_fbank_and_one_frame_deterministic_per_key(manifest):
    ds = PretrainClips(manifest, "train", resolve_recipe("tiny", "pretrain_as2m"))
    item = ds[(3, 1234)]
    assert item["audio"].shape == (1024, 128) and item["frame"].shape == (3, 224, 224)
    assert item["audio"].dtype == torch.float32 and item["index"] == 3
    again = ds[(3, 1234)]
    assert torch.equal(item["audio"], again["audio"]) and torch.equal(item["frame"], again["frame"])
    other = ds[(3, 99)]
    assert not torch.equal(item["audio"], other["audio"])  # noise and time shift come from the key's seed


def test_finetune_targets_follow_label_smoothing_and_mixup(manifest):
    recipe = resolve_recipe("tiny", "finetune_vggsound", ["mixup_rate=0.0", "freqm=0", "timem=0"])
    ds = FinetuneClips(manifest, "train", recipe)
    target = ds[(0, 7)]["target"]
    eps, c = recipe.label_smoothing, manifest.num_classes
    label = ds.label_indices[0][0]
    assert target[label] == pytest.approx(1 - eps) and target.sum() == pytest.approx(1 - eps + (c - 1) * eps / c)
    mixed = FinetuneClips(manifest, "train", resolve_recipe("tiny", "finetune_vggsound", ["mixup=true", "mixup_rate=1.0"]))
    targets = torch.stack([mixed[(i, 11)]["target"] for i in range(8)])
    assert (targets > eps / c + 1e-6).sum(dim=1).max() == 2  # some clip was mixed with another class
    assert torch.allclose(targets.sum(dim=1), torch.full((8,), 1 - eps + eps))


def test_eval_items_are_deterministic_with_all_frames_and_exact_targets(manifest):
    ds = EvalClips(manifest, "test", resolve_recipe("tiny", "finetune_vggsound"))
    a, b = ds[2], ds[(2, 555)]
    assert a["frames"].shape == (10, 3, 224, 224)
    assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["frames"], b["frames"])
    assert a["target"].sum() == 1 and a["target"].max() == 1


def test_a_broken_staged_clip_raises_naming_the_file(manifest, tmp_path):
    import shutil

    from avsiam.data.manifest import Manifest

    root = tmp_path / "copy"
    shutil.copytree(manifest.root, root)
    broken = Manifest(root, manifest.classes, manifest.multi_label, manifest.clips)
    clip = broken.split("train")[0]
    (root / clip.audio).write_bytes(b"RIFF garbage")
    ds = PretrainClips(broken, "train", resolve_recipe("tiny", "pretrain_as2m"))
    with pytest.raises(DecodeError, match=clip.id):
        ds[0]


def test_an_empty_split_is_an_error_naming_the_split(manifest):
    from avsiam.data.manifest import Manifest

    only_train = Manifest(manifest.root, manifest.classes, manifest.multi_label, manifest.split("train"))
    with pytest.raises(ValueError, match="split 'test' has no clips"):
        EvalClips(only_train, "test", resolve_recipe("tiny", "finetune_vggsound"))
