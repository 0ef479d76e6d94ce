"""Evidence of learning: the tiny recipes, as the demo runs them, learn the synthetic task.

Pretraining on 2 CPU ranks from scratch, then finetuning from its consolidated weights on the
single-label (VGGSound layout) and the multi-label (AudioSet layout) synthetic datasets of the
demo's size; every score is measured on the held-out test split with ``avsiam evaluate``.
The thresholds are the training-engine issue's; the measured values they guard are in
README.md (the recipes themselves are avsiam/config/presets/tiny.yaml).
"""

import json

import pytest
from helpers import avsiam, stage_synthetic

from avsiam.synthetic import generate_synthetic_dataset

pytestmark = pytest.mark.slow

CLASSES, CLIPS = 10, 300  # the demo profile's synthetic dataset (flows/profiles.yaml)


def evaluate(recipe, weights, data, out):
    avsiam("evaluate", "--model", "tiny", "--recipe", recipe, "--weights", weights, "--data", data, "--output", out)
    return json.loads((out / "results.json").read_text())


def staged(root, multi_label):
    ds = generate_synthetic_dataset(root / "raw", CLASSES, CLIPS, multi_label=multi_label, seed=0, workers=2, progress=False)
    return stage_synthetic(ds, root / "staged", clips_per_shard=32, workers=2)  # the demo's shards


@pytest.fixture(scope="module")
def single_label(tmp_path_factory):
    return staged(tmp_path_factory.mktemp("single"), multi_label=False)


@pytest.fixture(scope="module")
def pretrained(single_label, tmp_path_factory):
    """The tiny pretraining recipe unchanged, on 2 ranks: consolidated weights."""
    out = tmp_path_factory.mktemp("pretrain")
    avsiam("train", "pretrain", "--model", "tiny", "--data", single_label, "--output", out, "--nproc", 2)
    return out / "weights.safetensors"


def finetune_and_evaluate(recipe, init, data, out):
    avsiam("train", "finetune", "--model", "tiny", "--recipe", recipe, "--init", init, "--data", data,
           "--output", out / "run", "--nproc", 2)
    return evaluate(recipe, out / "run" / "weights.safetensors", data, out / "eval")


def test_pretraining_aligns_audio_and_video_of_held_out_clips(pretrained, single_label, tmp_path):
    results = evaluate("pretrain_as2m", pretrained, single_label, tmp_path)
    assert results["split"] == "test" and results["num_clips"] == CLIPS // 5
    chance = 1 / results["num_clips"]
    assert results["a2v_R1"] >= 5 * chance, results
    assert results["v2a_R1"] >= 5 * chance, results


def test_finetuning_reaches_high_accuracy_on_single_label_clips(pretrained, single_label, tmp_path):
    results = finetune_and_evaluate("finetune_vggsound", pretrained, single_label, tmp_path)
    assert results["metric"] == "accuracy" and results["split"] == "test"
    assert results["accuracy"] >= 0.9, results


def test_finetuning_reaches_high_map_on_multi_label_clips(pretrained, tmp_path):
    data = staged(tmp_path, multi_label=True)
    results = finetune_and_evaluate("finetune_as20k", pretrained, data, tmp_path)
    assert results["metric"] == "mAP" and results["split"] == "test"
    assert results["mAP"] >= 0.8, results
