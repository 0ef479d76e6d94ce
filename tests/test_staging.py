"""Staging: official layouts in, manifest + 16 kHz wavs + 10 frames out; bad clips quarantined."""

import csv
import json
import shutil
import wave

import pytest

from avsiam.data.formats import FormatError
from avsiam.data.manifest import load_manifest
from avsiam.data.staging import StagingError, stage_dataset
from avsiam.data.video import load_frame


def test_vggsound_layout_stages_every_clip(staged_single, synthetic_single):
    m = load_manifest(staged_single)
    assert not m.multi_label and m.num_classes == 4
    assert len(m.clips) == synthetic_single.num_clips
    counts = m.split_counts()
    assert counts["test"] == synthetic_single.num_test and counts["train"] + counts["val"] == synthetic_single.num_train
    clip = m.clips[0]
    assert len(clip.frames) == 10 and load_frame(m.path(clip.frames[9])).shape == (3, 224, 224)
    with wave.open(str(m.path(clip.audio))) as w:
        assert (w.getframerate(), w.getnchannels()) == (16000, 1) and 9.5 < w.getnframes() / 16000 <= 10.1
    rows = list(csv.reader((staged_single.parent / "quarantine.csv").open()))
    assert rows == [["clip_id", "source", "reason"]]
    assert (staged_single.parent / "class_labels_indices.csv").read_text().startswith("index,mid,display_name")
    assert json.loads(staged_single.read_text())["dataset_digest"] == m.dataset_digest


def test_audioset_layout_is_multi_label_with_eval_as_test(staged_multi, synthetic_multi):
    m = load_manifest(staged_multi)
    assert m.multi_label and m.num_classes == 5
    assert m.split_counts()["test"] == synthetic_multi.num_test
    assert any(len(c.labels) > 1 for c in m.clips)


def test_bad_clips_are_quarantined_with_reasons(synthetic_single, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(synthetic_single.videos_dir, videos)
    names = sorted(p.name for p in videos.iterdir())
    (videos / names[0]).write_bytes(b"\x00not an mp4" * 100)
    (videos / names[1]).unlink()
    result = stage_dataset([synthetic_single.labels_csv], tmp_path / "staged", videos_dir=videos, workers=1, progress=False)
    reasons = {clip_id: reason for clip_id, _, reason in result.quarantined}
    assert set(reasons) == {names[0][:-4], names[1][:-4]}
    assert "missing file" in reasons[names[1][:-4]]
    assert names[0] in reasons[names[0][:-4]]  # the decode error names the file
    assert len(load_manifest(result.manifest_path).clips) == len(names) - 2
    with pytest.raises(StagingError, match="2 of 40 clips are bad .* > max_bad_fraction 1.0%"):
        stage_dataset([synthetic_single.labels_csv], tmp_path / "strict", videos_dir=videos, max_bad_fraction=0.01, progress=False)


def test_restaging_processes_only_new_or_changed_clips(synthetic_single, tmp_path):
    lines = synthetic_single.labels_csv.read_text().splitlines()
    first = tmp_path / "first.csv"
    first.write_text("\n".join(lines[:30]) + "\n")
    out = tmp_path / "staged"
    r1 = stage_dataset([first], out, videos_dir=synthetic_single.videos_dir, workers=1, progress=False)
    assert (r1.staged, r1.reused) == (30, 0)
    digest1 = load_manifest(out).dataset_digest
    r2 = stage_dataset([synthetic_single.labels_csv], out, videos_dir=synthetic_single.videos_dir, workers=1, progress=False)
    assert (r2.staged, r2.reused) == (10, 30)
    digest2 = load_manifest(out).dataset_digest
    assert digest2 != digest1
    relabelled = tmp_path / "relabelled.csv"
    row = lines[0].split(",")
    other = next(line.split(",")[2] for line in lines if line.split(",")[2] != row[2])
    relabelled.write_text("\n".join([",".join(row[:2] + [other] + row[3:])] + lines[1:]) + "\n")
    r3 = stage_dataset([relabelled], out, videos_dir=synthetic_single.videos_dir, workers=1, progress=False)
    assert (r3.staged, r3.reused) == (0, 40)  # a label change needs no decoding ...
    m = load_manifest(out)
    assert m.dataset_digest != digest2  # ... but changes the digest
    assert next(c for c in m.clips if c.id.startswith(row[0])).labels == (other,)


def test_label_problems_fail_before_any_decoding(synthetic_multi, tmp_path):
    bad = tmp_path / "train_segments.csv"
    text = synthetic_multi.train_segments_csv.read_text().replace("/m/syn01", "/m/nope", 1)
    bad.write_text(text)
    with pytest.raises(FormatError, match=r"train_segments.csv: line \d+: unknown label id '/m/nope'"):
        stage_dataset([bad], tmp_path / "out", videos_dir=synthetic_multi.videos_dir, classes_csv=synthetic_multi.class_labels_indices_csv)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FormatError, match="--classes .* is required with an AudioSet segments csv"):
        stage_dataset([synthetic_multi.train_segments_csv], tmp_path / "out", videos_dir=synthetic_multi.videos_dir)


def test_real_clips_and_a_cavmae_datafile(real_data, tmp_path):
    """The real 720p VGGSound-style clip stages from a VGGSound csv; its extracted wav and frames
    then stage again from a CAV-MAE datafile (frame_{i}/<id>.jpg layout)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(real_data / "KlsG1EnBEjc_000361.mp4", videos)
    labels = tmp_path / "vggsound.csv"
    labels.write_text("KlsG1EnBEjc,361,dog barking,train\n")
    result = stage_dataset([labels], tmp_path / "staged", videos_dir=videos, val_fraction=0, progress=False)
    m = load_manifest(result.manifest_path)
    clip = m.clips[0]
    frames_root = tmp_path / "cavmae_frames"
    for i, rel in enumerate(clip.frames):
        (frames_root / f"frame_{i}").mkdir(parents=True)
        shutil.copy(m.path(rel), frames_root / f"frame_{i}" / "KlsG1EnBEjc.jpg")
    datafile = tmp_path / "eval_data.json"
    datafile.write_text(json.dumps({"data": [{"video_id": "KlsG1EnBEjc", "wav": str(m.path(clip.audio)),
                                              "video_path": str(frames_root), "labels": "/m/0bt9lr"}]}))
    r2 = stage_dataset([datafile], tmp_path / "from_datafile", classes_csv=real_data / "class_labels_indices_as.csv", progress=False)
    m2 = load_manifest(r2.manifest_path)
    assert m2.clips[0].split == "test" and m2.clips[0].labels == ("/m/0bt9lr",) and m2.num_classes == 527
