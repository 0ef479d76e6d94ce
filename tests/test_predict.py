"""``avsiam predict`` and the pyfunc model: a clip labelled from its video file gets exactly the
probabilities evaluation gives the same clip staged; the real clips label; a broken file in a
folder gets an error line naming it while the other clips go on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import avsiam
from safetensors.torch import save_file

from avsiam.config import resolve_recipe
from avsiam.data.datasets import EvalClips
from avsiam.data.formats import class_labels_csv
from avsiam.data.index import CLASSES_NAME, load_index
from avsiam.eval.predict import eval_loader, predict_probabilities
from avsiam.launch.distributed import DistEnv
from avsiam.model import build_finetune_model_from_recipe

ARCH = ["arch.depth=2", "num_workers=0"]


def finetune_run_folder(root: Path, classes, recipe_name: str = "finetune_vggsound") -> Path:
    """What a finetuning run leaves: random weights of the tiny model, config.yaml, the class list."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = resolve_recipe("tiny", recipe_name, ARCH)
    (root / "config.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    (root / CLASSES_NAME).write_text(class_labels_csv(classes))
    torch.manual_seed(0)
    save_file(build_finetune_model_from_recipe(recipe, len(classes.mids)).state_dict(), str(root / "weights.safetensors"))
    return root / "weights.safetensors"


def records(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def staged_run(staged_single, tmp_path_factory):
    index = load_index(staged_single)
    return index, finetune_run_folder(tmp_path_factory.mktemp("run"), index.classes)


def test_predict_gives_the_probabilities_evaluation_gives_the_staged_clip(staged_run, synthetic_single):
    index, weights = staged_run
    recipe = resolve_recipe("tiny", "finetune_vggsound", ARCH)
    model = build_finetune_model_from_recipe(recipe, index.num_classes)
    from avsiam.eval.evaluate import load_weights

    load_weights(model, weights)
    dataset = EvalClips(index, "test", recipe)
    expected = predict_probabilities(model, eval_loader(dataset, DistEnv(0, 1, 0), 4, 0), multi_label=False)
    reader = index.reader()
    rows = dataset.rows[:3]
    videos = [synthetic_single.videos_dir / index.read_sample(reader, row).meta["source"] for row in rows]
    proc = avsiam("predict", "--model", weights, *videos, "--json", "--top-k", index.num_classes)
    got = records(proc)
    assert [r["file"] for r in got] == [str(v) for v in videos]
    assert [r["clip"] for r in got] == [v.stem for v in videos]
    mids = list(index.classes.mids)
    for i, record in enumerate(got):
        for head, key in (("multimodal", "top"), ("audio", "audio_only"), ("visual", "visual_only")):
            probabilities = np.zeros(index.num_classes)
            for entry in record[key]:
                probabilities[mids.index(entry["mid"])] = entry["probability"]
            np.testing.assert_allclose(probabilities, expected[head][i], atol=2e-6)
            assert [e["probability"] for e in record[key]] == sorted((e["probability"] for e in record[key]), reverse=True)


def test_predict_labels_the_real_clips_and_reports_a_broken_file_by_name(staged_run, real_data, tmp_path):
    _, weights = staged_run
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("00W1lcxW-WU_40.000.mp4", "KlsG1EnBEjc_000361.mp4"):
        (folder / name).symlink_to(real_data / name)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    proc = avsiam("predict", "--model", weights, folder, "--json", "--top-k", "2", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    by_clip = {r["clip"]: r for r in records(proc)}
    assert set(by_clip) == {"00W1lcxW-WU_40.000", "KlsG1EnBEjc_000361", "broken"}
    assert "broken.mp4" in by_clip["broken"]["error"] and "top" not in by_clip["broken"]
    for clip in ("00W1lcxW-WU_40.000", "KlsG1EnBEjc_000361"):
        assert len(by_clip[clip]["top"]) == 2 and len(by_clip[clip]["audio_only"]) == 2 and "error" not in by_clip[clip]
    assert "1 of 3 clips could not be labelled" in proc.stderr
    # Without --json: the classes per clip, the error on stderr naming the file.
    text = avsiam("predict", "--model", weights, real_data / "KlsG1EnBEjc_000361.mp4", folder / "broken.mp4", check=False)
    assert text.returncode == 1
    assert text.stdout.startswith("KlsG1EnBEjc_000361  (") and "audio-only:" in text.stdout
    assert f"error: {folder / 'broken.mp4'}" in text.stderr
    assert avsiam("predict", "--model", weights, real_data / "00W1lcxW-WU_40.000.mp4").returncode == 0


def test_predict_refuses_weights_without_their_run_files(tmp_path, staged_run):
    _, weights = staged_run
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes(weights.read_bytes())
    proc = avsiam("predict", "--model", lone, "clip.mp4", check=False)
    assert proc.returncode == 2 and "config.yaml and class_labels_indices.csv not beside it" in proc.stderr


def test_the_pyfunc_model_answers_paths_and_base64_bytes_with_the_records_of_predict(staged_run, real_data, tmp_path):
    import base64

    import mlflow.pyfunc
    import pandas as pd

    from avsiam.eval.serving import save_clip_model

    _, weights = staged_run
    clip = real_data / "00W1lcxW-WU_40.000.mp4"
    model_dir = save_clip_model(weights.parent, tmp_path / "model", str(clip))
    assert not list(model_dir.rglob("*.pkl"))  # models from code: nothing unpickled at load time
    model = mlflow.pyfunc.load_model(str(model_dir))
    rows = pd.DataFrame({"video": [str(clip), None, None, str(tmp_path / "missing.mp4")],
                         "video_bytes": [None, base64.b64encode(clip.read_bytes()).decode(), "not base64!", None]})
    served = model.predict(rows, params={"top_k": 3})
    cli = records(avsiam("predict", "--model", model_dir, clip, "--json", "--top-k", "3"))
    assert served[0] == cli[0]
    assert served[1]["clip"] == "video_bytes[1]" and served[1]["top"] == cli[0]["top"]
    assert "not base64" in served[2]["error"] and "missing.mp4: no such file" in served[3]["error"]


def test_predict_labels_with_a_published_checkpoint_as_with_the_model_it_converts_to(staged_run, real_data, tmp_path):
    from helpers import published_checkpoint

    index, _ = staged_run
    recipe = resolve_recipe("tiny", "finetune_vggsound", ["num_workers=0"], variant="published")  # the preset, as --recipe gives
    torch.manual_seed(5)
    model = build_finetune_model_from_recipe(recipe, index.num_classes)
    torch.save(published_checkpoint(model), tmp_path / "published.pth")
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "weights.safetensors"))
    (run / "config.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    (run / CLASSES_NAME).write_text(class_labels_csv(index.classes))
    clip = real_data / "00W1lcxW-WU_40.000.mp4"
    own = records(avsiam("predict", "--model", run / "weights.safetensors", clip, "--json"))
    # tiny is not a published size: --size names it (a published Base checkpoint needs no --size)
    published = records(avsiam("predict", "--model", tmp_path / "published.pth", "--recipe", "finetune_vggsound", "--classes",
                               run / CLASSES_NAME, "--size", "tiny", clip, "--json"))
    assert published == own
    half = avsiam("predict", "--model", tmp_path / "published.pth", "--recipe", "finetune_vggsound", clip, check=False)
    assert half.returncode == 2 and "needs both --recipe and --classes" in half.stderr
    sized = avsiam("predict", "--model", run / "weights.safetensors", "--size", "tiny", clip, check=False)
    assert sized.returncode == 2 and "--size is for a published checkpoint" in sized.stderr
