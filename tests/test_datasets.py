"""Datasets over a staged dataset: shapes, determinism per key, augmentations, no silent fallbacks;
samples read from shards equal the staged media; a corrupt shard is an error naming it."""

import pytest
import torch

from avsiam.config import resolve_recipe
from avsiam.data.datasets import EvalClips, FinetuneClips, PretrainClips
from avsiam.data.index import load_index
from avsiam.data.shards import ShardError


@pytest.fixture(scope="module")
def manifest(staged_single):
    return load_index(staged_single)


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
    label = ds.labels(0)[0]
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


def test_exact_targets_of_a_split_equal_each_clips_target(staged_multi):
    index = load_index(staged_multi)
    ds = EvalClips(index, "test", resolve_recipe("tiny", "finetune_as20k"))
    expected = torch.stack([ds.exact_target(i) for i in range(len(ds))]).numpy()
    assert (ds.exact_targets() == expected).all() and expected.sum(axis=1).max() > 1


def _corrupt_copy(index, tmp_path, damage):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(index.location, root)
    copy = load_index(root)
    row = copy.split_rows("train")[0]
    shard = root / copy.shards[copy.clips.shard[row]].path
    data = bytearray(shard.read_bytes())
    damage(data, int(copy.clips.offset[row]), int(copy.clips.size[row]))
    shard.write_bytes(bytes(data))
    return copy, shard, copy.clip_id(row)


@pytest.mark.parametrize("damage", [
    # one byte of the audio flipped: decodes fine, only the CRC-32 tells
    lambda data, offset, size: data.__setitem__(offset + size - 600, data[offset + size - 600] ^ 0xFF),
    # a tar header overwritten
    lambda data, offset, size: data.__setitem__(slice(offset, offset + 512), bytes(range(256)) * 2),
])
def test_a_corrupt_shard_raises_naming_the_shard_and_the_clip(manifest, tmp_path, damage):
    copy, shard, clip_id = _corrupt_copy(manifest, tmp_path, damage)
    ds = PretrainClips(copy, "train", resolve_recipe("tiny", "pretrain_as2m"))
    with pytest.raises(ShardError, match=f"{shard.name}.*clip {clip_id}|{shard.name}.*bad tar header"):
        ds[(0, 1)]


def test_a_truncated_or_missing_shard_raises_naming_it(manifest, tmp_path):
    copy, shard, _ = _corrupt_copy(manifest, tmp_path, lambda data, offset, size: data.__delitem__(slice(offset, None)))
    ds = PretrainClips(copy, "train", resolve_recipe("tiny", "pretrain_as2m"))
    with pytest.raises(ShardError, match=f"{shard.name}: holds .* bytes where the index expects .*truncated"):
        ds[(0, 1)]
    shard.unlink()
    with pytest.raises(ShardError, match=f"{shard.name}: the shard is missing"):
        PretrainClips(copy, "train", resolve_recipe("tiny", "pretrain_as2m"))[(0, 1)]


def test_an_empty_split_is_an_error_naming_the_split(synthetic_single, tmp_path):
    from avsiam.data.staging import StagingRequest, stage_dataset

    only_train = stage_dataset(StagingRequest(labels=[synthetic_single.labels_csv], out=tmp_path / "train_only",
                                              videos=synthetic_single.videos_dir, split="train", val_fraction=0)).index
    with pytest.raises(ValueError, match="split 'test' has no clips"):
        EvalClips(only_train, "test", resolve_recipe("tiny", "finetune_vggsound"))


def test_persistent_loader_workers_follow_the_sampler_across_epochs_and_resumption(manifest):
    """The trainer keeps one DataLoader for the whole run: after an epoch cut short (max_steps)
    and a mid-epoch start (resumption), its persistent workers give exactly what fresh loaders give."""
    from torch.utils.data import DataLoader

    from avsiam.data.sampler import DistributedClipSampler

    ds = PretrainClips(manifest, "train", resolve_recipe("tiny", "pretrain_as2m"))

    def batches(loader, count=None):
        out = []
        for batch in loader:
            out.append((batch["index"].tolist(), batch["audio"]))
            if count is not None and len(out) == count:
                break
        return out

    def fresh(epoch, start=0):
        sampler = DistributedClipSampler(len(ds), seed=3)
        sampler.set_epoch(epoch, start=start)
        return batches(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=0, drop_last=True))

    sampler = DistributedClipSampler(len(ds), seed=3)
    persistent = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, drop_last=True, persistent_workers=True)
    sampler.set_epoch(1)
    first = batches(persistent, count=2)  # stopped inside the epoch, with batches still prefetched
    sampler.set_epoch(2, start=8)
    resumed = batches(persistent)
    sampler.set_epoch(3)
    third = batches(persistent)
    for got, expected in ((first, fresh(1)[:2]), (resumed, fresh(2, start=8)), (third, fresh(3))):
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))
