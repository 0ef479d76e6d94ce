"""Staging: official layouts in, WebDataset shards + index out; bad clips quarantined; re-staging
decodes only what changed and keeps every clip's shard."""

import csv
import io
import json
import shutil
import wave

import numpy as np
import pytest
import torch
import webdataset
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from avsiam.data.audio import STAGED_AUDIO_FRAMES, STAGED_AUDIO_SAMPLES, load_waveform, waveform_to_fbank
from avsiam.data.formats import SPLITS, FormatError
from avsiam.data.index import load_index
from avsiam.data.shards import FRAME_MEMBERS
from avsiam.data.staging import PlannedClip, StagingError, StagingRequest, assign_slots, stage_dataset
from avsiam.data.video import decode_frame


def stage(labels, out, **options):
    return stage_dataset(StagingRequest(labels=labels, out=out, **options))


def test_vggsound_layout_stages_every_clip_into_webdataset_shards(staged_single, synthetic_single):
    index = load_index(staged_single)
    assert not index.multi_label and index.num_classes == 4
    assert len(index.clips) == synthetic_single.num_clips
    counts = index.split_counts()
    assert counts["test"] == synthetic_single.num_test and counts["train"] + counts["val"] == synthetic_single.num_train
    assert {s.split for s in index.shards} == {"train", "val", "test"} and max(s.num_samples for s in index.shards) <= 8
    # The oracle: webdataset itself reads the shards as WebDataset samples.
    shards = [str(staged_single / s.path) for s in index.shards]
    samples = list(webdataset.WebDataset(shards, shardshuffle=False))
    assert len(samples) == len(index.clips)
    sample = samples[0]
    assert set(sample) >= {"wav", "json", *FRAME_MEMBERS}
    meta = json.loads(sample["json"])
    assert meta["id"] == index.clip_id(0) and meta["split"] == SPLITS[index.clips.split[0]] and meta["source"].endswith(".mp4")
    assert decode_frame(sample["9.jpg"], "frame").shape == (3, 224, 224)
    with wave.open(io.BytesIO(sample["wav"])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2) and 9.5 < w.getnframes() / 16000 <= 10.1
    rows = list(csv.reader((staged_single / "quarantine.csv").open()))
    assert rows == [["clip_id", "shard", "source", "reason", "action"]]
    assert (staged_single / "class_labels_indices.csv").read_text().startswith("index,mid,display_name")
    assert json.loads((staged_single / "index.json").read_text())["dataset_digest"] == index.dataset_digest


def test_audioset_layout_is_multi_label_with_eval_as_test(staged_multi, synthetic_multi):
    index = load_index(staged_multi)
    assert index.multi_label and index.num_classes == 5
    assert index.split_counts()["test"] == synthetic_multi.num_test
    assert max(len(index.clips.labels(r)) for r in range(len(index.clips))) > 1


def test_staging_is_deterministic_whatever_the_folder(synthetic_single, staged_single, tmp_path):
    again = stage([synthetic_single.labels_csv], tmp_path / "elsewhere", videos=synthetic_single.videos_dir, clips_per_shard=8)
    assert again.index.dataset_digest == load_index(staged_single).dataset_digest


def test_bad_clips_are_quarantined_with_reasons(synthetic_single, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(synthetic_single.videos_dir, videos)
    names = sorted(p.name for p in videos.iterdir())
    (videos / names[0]).write_bytes(b"\x00not an mp4" * 100)
    (videos / names[1]).unlink()
    result = stage([synthetic_single.labels_csv], tmp_path / "staged", videos=videos, clips_per_shard=8)
    reasons = {clip_id: reason for clip_id, _shard, _source, reason in result.quarantined}
    assert set(reasons) == {names[0][:-4], names[1][:-4]}
    assert "missing file" in reasons[names[1][:-4]]
    assert names[0] in reasons[names[0][:-4]]  # the decode error names the file
    assert len(result.index.clips) == len(names) - 2
    rows = list(csv.DictReader((tmp_path / "staged" / "quarantine.csv").open()))
    assert {r["clip_id"] for r in rows} == set(reasons) and all(r["shard"].split("-")[0] in ("train", "val", "test") for r in rows)
    with pytest.raises(StagingError, match="2 of 40 clips are bad .* > max_bad_fraction 1.0%"):
        stage([synthetic_single.labels_csv], tmp_path / "strict", videos=videos, max_bad_fraction=0.01)


def test_restaging_decodes_only_new_or_changed_clips(synthetic_single, tmp_path):
    lines = synthetic_single.labels_csv.read_text().splitlines()
    first = tmp_path / "first.csv"
    first.write_text("\n".join(lines[:30]) + "\n")
    out = tmp_path / "staged"
    r1 = stage([first], out, videos=synthetic_single.videos_dir, clips_per_shard=8)
    assert (r1.decoded, r1.copied, r1.shards_reused) == (30, 0, 0)
    slot_of = {r1.index.clip_id(r): r1.index.shards[r1.index.clips.shard[r]].slot for r in range(len(r1.index.clips))}

    r2 = stage([synthetic_single.labels_csv], out, videos=synthetic_single.videos_dir, clips_per_shard=8)
    assert r2.decoded == 10  # only the new clips; the rest are reused shards or copied samples
    assert r2.copied + 10 + sum(s.num_samples for s in r1.index.shards if s.name in {x.name for x in r2.index.shards}) == 40
    assert r2.index.dataset_digest != r1.index.dataset_digest
    for r in range(len(r2.index.clips)):  # every clip staged before kept its shard slot
        clip_id = r2.index.clip_id(r)
        if clip_id in slot_of:
            assert r2.index.shards[r2.index.clips.shard[r]].slot == slot_of[clip_id]

    relabelled = tmp_path / "relabelled.csv"
    row = lines[0].split(",")
    other = next(line.split(",")[2] for line in lines if line.split(",")[2] != row[2])
    relabelled.write_text("\n".join([",".join(row[:2] + [other] + row[3:])] + lines[1:]) + "\n")
    r3 = stage([relabelled], out, videos=synthetic_single.videos_dir, clips_per_shard=8)
    assert r3.decoded == 0 and r3.shards_built == 1 and r3.copied <= 8  # a label change rewrites one shard, decoding nothing ...
    assert r3.index.dataset_digest != r2.index.dataset_digest  # ... and changes the digest
    row_of = {r3.index.clip_id(r): r for r in range(len(r3.index.clips))}
    changed = row_of[row[0] + "_" + row[1].zfill(6)]
    assert r3.index.classes.mids[r3.index.clips.labels(changed)[0]] == other
    # Nothing the new or the previous index uses was removed; everything else was.
    kept = {p.name for p in (out / "shards").glob("*.tar")}
    assert kept == {s.name for s in r3.index.shards} | {s.name for s in r2.index.shards}


def test_label_problems_fail_before_any_decoding(synthetic_multi, tmp_path):
    bad = tmp_path / "train_segments.csv"
    text = synthetic_multi.train_segments_csv.read_text().replace("/m/syn01", "/m/nope", 1)
    bad.write_text(text)
    with pytest.raises(FormatError, match=r"train_segments.csv: line \d+: unknown label id '/m/nope'"):
        stage([bad], tmp_path / "out", videos=synthetic_multi.videos_dir, classes_csv=synthetic_multi.class_labels_indices_csv)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FormatError, match="--classes .* is required with an AudioSet segments csv"):
        stage([synthetic_multi.train_segments_csv], tmp_path / "out", videos=synthetic_multi.videos_dir)


def _clips(n, split="train", start=0):
    return [PlannedClip(f"c{i:04d}", split, ("a",)) for i in range(start, start + n)]


@given(old=st.integers(0, 40), added=st.integers(0, 40), removed=st.integers(0, 40), size=st.integers(1, 9))
def test_slot_assignment_is_stable_when_clips_come_and_go(old, added, removed, size):
    before = assign_slots(_clips(old), {}, size)
    previous = {c.id: slot for slot, clips in before.items() for c in clips}
    kept = _clips(old)[min(removed, old):]
    after = assign_slots(kept + _clips(added, start=old), previous, size)
    placed = {c.id: slot for slot, clips in after.items() for c in clips}
    assert all(placed[c.id] == previous[c.id] for c in kept)  # nobody moves
    assert all(len(clips) <= size for clips in after.values())
    new_slots = set(after) - set(before)
    # New clips only top up the last old slot, then open new slots.
    assert all(placed[c.id] in new_slots or placed[c.id] == max(before) for c in _clips(added, start=old))
    assert len(new_slots) <= -(-added // size)


def test_real_clips_and_a_cavmae_datafile(real_data, tmp_path):
    """The real 720p VGGSound-style clip stages from a VGGSound csv; its staged wav and frames
    then stage again from a CAV-MAE datafile (frame_{i}/<id>.jpg layout)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(real_data / "KlsG1EnBEjc_000361.mp4", videos)
    labels = tmp_path / "vggsound.csv"
    labels.write_text("KlsG1EnBEjc,361,dog barking,train\n")
    index = stage([labels], tmp_path / "staged", videos=videos, val_fraction=0).index
    sample = index.read_sample(index.reader(), 0)
    frames_root = tmp_path / "cavmae_frames"
    for i, member in enumerate(FRAME_MEMBERS):
        (frames_root / f"frame_{i}").mkdir(parents=True)
        (frames_root / f"frame_{i}" / "KlsG1EnBEjc.jpg").write_bytes(sample.media(member))
    (tmp_path / "KlsG1EnBEjc.wav").write_bytes(sample.media("wav"))
    datafile = tmp_path / "eval_data.json"
    datafile.write_text(json.dumps({"data": [{"video_id": "KlsG1EnBEjc", "wav": str(tmp_path / "KlsG1EnBEjc.wav"),
                                              "video_path": str(frames_root), "labels": "/m/0bt9lr"}]}))
    again = stage([datafile], tmp_path / "from_datafile", classes_csv=real_data / "class_labels_indices_as.csv").index
    assert again.split_counts()["test"] == 1 and again.num_classes == 527
    assert again.classes.mids[again.clips.labels(0)[0]] == "/m/0bt9lr"
    restaged = again.read_sample(again.reader(), 0)
    assert restaged.media("wav") == sample.media("wav")  # the staged audio survives a second staging bit for bit


def _write_wav(path, channels, rate=16000):
    """A 16-bit wav of ``channels`` (float arrays in [-1, 1])."""
    pcm = (np.stack(channels, axis=1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(len(channels))
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


@pytest.fixture
def odd_audio_datafile(tmp_path):
    """A CAV-MAE datafile of four clips made here: a 10 s tone, digital silence, a stereo track
    whose channels cancel when mixed to mono, and a 60 s tone."""
    frame = Image.fromarray(np.full((144, 256, 3), 90, np.uint8))
    root = tmp_path / "frames"
    t10, t60 = np.arange(160000) / 16000, np.arange(60 * 44100) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 440 * t10)
    wavs = {"tone": [tone], "silent": [np.zeros_like(t10)], "cancels": [tone, -tone], "long": [0.3 * np.sin(2 * np.pi * 330 * t60)]}
    entries = []
    for clip_id, channels in wavs.items():
        _write_wav(tmp_path / f"{clip_id}.wav", channels, rate=44100 if clip_id == "long" else 16000)
        for i in range(10):
            (root / f"frame_{i}").mkdir(parents=True, exist_ok=True)
            frame.save(root / f"frame_{i}" / f"{clip_id}.jpg")
        entries.append({"video_id": clip_id, "wav": str(tmp_path / f"{clip_id}.wav"), "video_path": str(root), "labels": "/m/a"})
    classes = tmp_path / "classes.csv"
    classes.write_text("index,mid,display_name\n0,/m/a,A\n")
    datafile = tmp_path / "train_data.json"
    datafile.write_text(json.dumps({"data": entries}))
    return datafile, classes


def test_silent_audio_is_quarantined_or_staged_with_a_warning(odd_audio_datafile, tmp_path):
    datafile, classes = odd_audio_datafile
    result = stage([datafile], tmp_path / "strict", classes_csv=classes, val_fraction=0, max_bad_fraction=0.5)
    reasons = {clip_id: reason for clip_id, _shard, _source, reason in result.quarantined}
    assert set(reasons) == {"silent", "cancels"}
    assert "silent audio (peak -inf dBFS" in reasons["cancels"] and "silence_threshold_dbfs -60" in reasons["silent"]
    assert sorted(result.index.clip_id(r) for r in range(len(result.index.clips))) == ["long", "tone"]

    kept = stage([datafile], tmp_path / "lenient", classes_csv=classes, val_fraction=0, silent_audio="warn")
    assert not kept.quarantined and len(kept.index.clips) == 4
    rows = list(csv.DictReader((tmp_path / "lenient" / "quarantine.csv").open()))
    assert {(r["clip_id"], r["action"]) for r in rows} == {("silent", "staged with warning"), ("cancels", "staged with warning")}
    assert all("silent audio" in r["reason"] for r in rows)
    # A threshold above the tone's peak (0.3: -10.5 dBFS) makes it silent too.
    loud = stage([datafile], tmp_path / "loud", classes_csv=classes, val_fraction=0, silence_threshold_dbfs=-6.0,
                 silent_audio="warn")
    assert len(loud.warnings) == 4


def test_only_the_window_training_reads_is_staged(odd_audio_datafile, tmp_path):
    datafile, classes = odd_audio_datafile
    index = stage([datafile], tmp_path / "staged", classes_csv=classes, val_fraction=0, max_bad_fraction=0.5).index
    row = next(r for r in range(len(index.clips)) if index.clip_id(r) == "long")
    with wave.open(io.BytesIO(index.read_sample(index.reader(), row).media("wav"))) as w:
        assert w.getnframes() == STAGED_AUDIO_SAMPLES  # 10.255 s of the 60 s, resampled to 16 kHz
    # ... which is exactly what the fbank of the whole clip reads: its 1024 frames are equal.
    whole = waveform_to_fbank(load_waveform(tmp_path / "long.wav"))
    staged = waveform_to_fbank(load_waveform(tmp_path / "long.wav")[:STAGED_AUDIO_SAMPLES])
    assert whole.shape == staged.shape == (STAGED_AUDIO_FRAMES, 128)
    assert torch.allclose(whole, staged, atol=2e-3)  # only the DC offset removed before the fbank differs
    assert json.loads((tmp_path / "staged" / "index.json").read_text())["extra"]["audio_samples"] == STAGED_AUDIO_SAMPLES
