"""The synthetic dataset: official layouts, deterministic bytes, and classes present in both modalities."""

import csv
import hashlib
import re
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from avsiam.data import formats
from avsiam.synthetic.dataset import (
    CLIP_SECONDS,
    FRAME_HEIGHT,
    FRAME_WIDTH,
    HIGHEST_FUNDAMENTAL_HZ,
    LOWEST_FUNDAMENTAL_HZ,
    SAMPLE_RATE,
    design_classes,
    generate_synthetic_dataset,
    plan_clips,
    select_h264_encoder,
)

YOUTUBE_ID = r"[A-Za-z0-9_-]{11}"
VGGSOUND_FILENAME = re.compile(rf"^{YOUTUBE_ID}_\d{{6}}\.mp4$")
AUDIOSET_FILENAME = re.compile(rf"^{YOUTUBE_ID}_\d+\.\d{{3}}\.mp4$")
AUDIOSET_ROW = re.compile(rf'^({YOUTUBE_ID}), (\d+\.\d{{3}}), (\d+\.\d{{3}}), "(/m/syn\d+(?:,/m/syn\d+)*)"$')
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def single_label(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("single"), NUM_CLASSES, 16, seed=0, progress=False)


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory):
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("multi"), NUM_CLASSES, 8, multi_label=True, seed=1, progress=False
    )


def decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mono audio samples and every 10th RGB frame of a clip."""
    with av.open(str(path)) as container:
        audio = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)])
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i % 10 == 0]
    return audio, np.stack(frames)


@pytest.fixture(scope="module")
def single_label_signals(single_label):
    return [decode(single_label.videos_dir / clip.filename) for clip in single_label.clips]


@pytest.fixture(scope="module")
def multi_label_signals(multi_label):
    return [decode(multi_label.videos_dir / clip.filename) for clip in multi_label.clips]


def file_digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------------------- determinism


def test_same_seed_gives_same_bytes_whatever_the_worker_count(tmp_path):
    one = generate_synthetic_dataset(tmp_path / "one", 2, 3, seed=7, progress=False)
    two = generate_synthetic_dataset(tmp_path / "two", 2, 3, seed=7, workers=2, progress=False)
    other = generate_synthetic_dataset(tmp_path / "other", 2, 3, seed=8, progress=False)
    reference = file_digests(one.root)
    assert len(reference) == 4  # three clips and labels.csv
    assert file_digests(two.root) == reference
    other_digests = file_digests(other.root)
    assert other_digests.keys() != reference.keys()  # different ids
    assert not set(other_digests.values()) & set(reference.values())


# ---------------------------------------------------------------------------- layout and label files


def test_files_are_named_like_the_real_datasets(single_label, multi_label):
    for dataset, pattern in ((single_label, VGGSOUND_FILENAME), (multi_label, AUDIOSET_FILENAME)):
        names = sorted(p.name for p in dataset.videos_dir.iterdir())
        assert names == sorted(clip.filename for clip in dataset.clips)  # nothing else, no .partial left
        assert all(pattern.match(name) for name in names), names
    assert sorted(p.name for p in single_label.root.iterdir()) == ["labels.csv", "videos"]
    assert sorted(p.name for p in multi_label.root.iterdir()) == [
        "class_labels_indices.csv", "eval_segments.csv", "train_segments.csv", "videos"
    ]


def test_vggsound_csv_has_no_header_and_four_fields(single_label):
    names = {cls.name for cls in single_label.classes}
    with single_label.labels_csv.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == single_label.num_clips
    for youtube_id, start, label, split in rows:
        assert re.fullmatch(YOUTUBE_ID, youtube_id) and start.isdigit()
        assert label in names and split in ("train", "test")
        assert (single_label.videos_dir / f"{youtube_id}_{int(start):06d}.mp4").is_file()


def test_audioset_segments_csv_has_comment_lines_and_quoted_labels(multi_label):
    mids = {cls.mid for cls in multi_label.classes}
    listed = []
    for path, split in ((multi_label.train_segments_csv, "train"), (multi_label.eval_segments_csv, "test")):
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# Segments csv created")
        assert lines[2] == "# YTID, start_seconds, end_seconds, positive_labels"
        rows = [AUDIOSET_ROW.match(line) for line in lines[3:]]
        assert all(rows), lines[3:]
        labels = [row[4].split(",") for row in rows]
        unique_labels = {mid for row_labels in labels for mid in row_labels}
        assert lines[1] == (
            f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={len(unique_labels)}, "
            f"num_positive_labels={sum(map(len, labels))}"
        )
        for row, row_labels in zip(rows, labels):
            assert float(row[3]) == float(row[2]) + CLIP_SECONDS
            assert 1 <= len(row_labels) <= 3 and set(row_labels) <= mids
            assert (multi_label.videos_dir / f"{row[1]}_{row[2]}.mp4").is_file()
        listed += [(row[1], split) for row in rows]
    assert sorted(listed) == sorted((clip.youtube_id, clip.split) for clip in multi_label.clips)


def test_class_labels_indices_quotes_display_names_like_audioset(multi_label):
    lines = multi_label.class_labels_indices_csv.read_text().splitlines()
    assert lines[0] == "index,mid,display_name"
    assert lines[1:] == [f'{cls.index},{cls.mid},"{cls.name}"' for cls in multi_label.classes]


def test_the_project_readers_accept_the_label_files(single_label, multi_label):
    segments = formats.read_vggsound_csv(single_label.labels_csv)
    assert all((single_label.videos_dir / s.vggsound_filename()).is_file() for s in segments)
    class_index = formats.read_class_labels(multi_label.class_labels_indices_csv)
    assert class_index.names == tuple(cls.name for cls in multi_label.classes)
    for path in (multi_label.train_segments_csv, multi_label.eval_segments_csv):
        for segment in formats.read_audioset_segments(path):
            assert (multi_label.videos_dir / segment.audioset_filename()).is_file()
            class_index.indices(segment.labels, str(path))
        assert formats.sniff_label_format(path) == "audioset"
    assert formats.sniff_label_format(single_label.labels_csv) == "vggsound"


# ---------------------------------------------------------------------------- split


def test_every_class_is_in_both_splits(single_label, multi_label):
    for dataset in (single_label, multi_label):
        for split in ("train", "test"):
            present = {c for clip in dataset.clips if clip.split == split for c in clip.class_indices}
            assert present == set(range(NUM_CLASSES)), split
    assert single_label.num_test == NUM_CLASSES and single_label.num_train == 12  # 1 of each class's 4


@given(
    num_classes=st.integers(2, 12),
    clips_per_class=st.integers(2, 12),
    multi_label=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_split_is_stratified_and_about_80_20(num_classes, clips_per_class, multi_label, seed):
    clips = plan_clips(num_classes, num_classes * clips_per_class, multi_label, seed)
    for split in ("train", "test"):
        present = {c for clip in clips if clip.split == split for c in clip.class_indices}
        assert present == set(range(num_classes)), split
    if not multi_label:  # single-label clips are dealt out evenly
        assert np.bincount([clip.class_indices[0] for clip in clips]).tolist() == [clips_per_class] * num_classes
    test_fraction = sum(clip.split == "test" for clip in clips) / len(clips)
    assert 0.15 <= test_fraction <= 0.25 if clips_per_class >= 10 else 0.1 <= test_fraction <= 0.5
    assert len({clip.youtube_id for clip in clips}) == len(clips)
    assert all(1 <= len(clip.class_indices) <= (3 if multi_label else 1) for clip in clips)


# ---------------------------------------------------------------------------- clips


def test_clips_are_ten_seconds_of_h264_video_and_aac_audio(single_label, multi_label):
    for dataset in (single_label, multi_label):
        for clip in dataset.clips:
            with av.open(str(dataset.videos_dir / clip.filename)) as container:
                video, audio = container.streams.video[0], container.streams.audio[0]
                assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
                assert (video.codec_context.width, video.codec_context.height) == (FRAME_WIDTH, FRAME_HEIGHT)
                assert audio.codec_context.sample_rate == SAMPLE_RATE
                assert float(video.duration * video.time_base) == pytest.approx(CLIP_SECONDS)
                assert float(audio.duration * audio.time_base) == pytest.approx(CLIP_SECONDS, abs=0.1)
                assert container.metadata.get("creation_time") is None


def test_a_missing_h264_encoder_is_a_clear_error():
    assert select_h264_encoder() in ("libx264", "libopenh264")
    with pytest.raises(RuntimeError, match="no H.264 encoder .*tried no_such_encoder"):
        select_h264_encoder(("no_such_encoder",))


# ---------------------------------------------------------------------------- the class is in the signals


def log_spectrum(audio: np.ndarray, n_fft: int) -> np.ndarray:
    """Mean power spectrum over Hann-windowed frames, in dB."""
    frames = audio[: len(audio) // n_fft * n_fft].reshape(-1, n_fft) * np.hanning(n_fft)
    return 10 * np.log10(np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0) + 1e-12)


def log_band_levels(audio: np.ndarray, num_bands: int = 48, n_fft: int = 4096) -> np.ndarray:
    """Mel-like features: dB levels in log-spaced bands from 100 Hz to Nyquist, relative to the
    clip's median band (loudness and noise level vary at random per clip)."""
    power = 10 ** (log_spectrum(audio, n_fft) / 10)
    band = np.digitize(np.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE), np.geomspace(100, SAMPLE_RATE / 2, num_bands + 1)) - 1
    levels = 10 * np.log10([power[band == b].mean() for b in range(num_bands)])
    return levels - np.median(levels)


def hsv(frames: np.ndarray) -> np.ndarray:
    """Frames as HSV floats in 0..1."""
    return np.stack([np.asarray(Image.fromarray(f).convert("HSV")) for f in frames]).astype(np.float32) / 255


def colourful_pixels(frames: np.ndarray) -> np.ndarray:
    """Saturated, bright pixels: the objects, not the dull background."""
    hsv_frames = hsv(frames)
    return (hsv_frames[..., 1] > 0.6) & (hsv_frames[..., 2] > 0.5)


def mean_object_colour(frames: np.ndarray) -> np.ndarray:
    return frames[colourful_pixels(frames)].mean(axis=0)


def leave_one_out_nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    correct = 0
    for held_out in range(len(labels)):
        rest = np.arange(len(labels)) != held_out
        classes = np.unique(labels[rest])
        centroids = np.stack([features[rest & (labels == c)].mean(axis=0) for c in classes])
        correct += classes[np.argmin(np.linalg.norm(centroids - features[held_out], axis=1))] == labels[held_out]
    return correct / len(labels)


def test_each_modality_alone_identifies_the_class(single_label, single_label_signals):
    labels = np.array([clip.class_indices[0] for clip in single_label.clips])
    audio_features = np.stack([log_band_levels(audio) for audio, _ in single_label_signals])
    video_features = np.stack([mean_object_colour(frames) for _, frames in single_label_signals])
    # Chance is 1 / NUM_CLASSES = 0.25.
    assert leave_one_out_nearest_centroid_accuracy(audio_features, labels) >= 0.9
    assert leave_one_out_nearest_centroid_accuracy(video_features, labels) >= 0.9


def test_multi_label_clips_sound_and_show_exactly_their_classes(multi_label, multi_label_signals):
    classes = multi_label.classes
    frequencies = np.fft.rfftfreq(4096, 1 / SAMPLE_RATE)  # 4 Hz bins resolve +-3 % at 150 Hz
    for clip, (audio, frames) in zip(multi_label.clips, multi_label_signals):
        spectrum = log_spectrum(audio, 4096)
        hue = hsv(frames)[..., 0]
        colourful = colourful_pixels(frames)
        # Another labelled class's harmonic may land on an absent class's fundamental; those
        # absent classes say nothing about leakage, so only the others must be silent.
        harmonics = [h * classes[c].fundamental_hz for c in clip.class_indices for h in range(1, 9)]
        for cls in classes:
            near_fundamental = np.abs(np.log(np.maximum(frequencies, 1) / cls.fundamental_hz)) <= np.log(1.03)
            loudness_db = spectrum[near_fundamental].max() - np.median(spectrum)
            hue_distance = np.abs((hue - cls.hue + 0.5) % 1.0 - 0.5)
            coverage = np.mean(colourful & (hue_distance < 0.04))
            if cls.index in clip.class_indices:
                assert loudness_db > 25 and coverage > 0.005, (clip.filename, cls.name, loudness_db, coverage)
            else:
                assert coverage < 0.002, (clip.filename, cls.name, coverage)
                if all(abs(np.log(h / cls.fundamental_hz)) > np.log(1.1) for h in harmonics):
                    assert loudness_db < 15, (clip.filename, cls.name, loudness_db)


# ---------------------------------------------------------------------------- class design and arguments


def test_class_design_spreads_pitch_and_keeps_names_unique():
    for num_classes in (2, 4, 309, 527):
        classes = design_classes(num_classes)
        fundamentals = np.array([cls.fundamental_hz for cls in classes])
        assert fundamentals[0] == pytest.approx(LOWEST_FUNDAMENTAL_HZ)
        assert fundamentals[-1] == pytest.approx(HIGHEST_FUNDAMENTAL_HZ)
        ratios = fundamentals[1:] / fundamentals[:-1]
        assert np.allclose(ratios, ratios[0])  # log-spaced
        # Jittered pitches of neighbouring classes never overlap.
        assert all((1 + cls.pitch_jitter) ** 2 < ratios[0] for cls in classes)
        assert len({cls.name for cls in classes}) == num_classes
        assert len({cls.mid for cls in classes}) == num_classes
        for shape in {cls.shape for cls in classes}:  # same-shape classes differ in colour
            hues = np.sort([cls.hue for cls in classes if cls.shape == shape])
            gaps = np.diff(np.r_[hues, hues[0] + 1.0])
            assert gaps.min() > 2 * max(cls.hue_jitter for cls in classes)
        neighbours = zip(classes, classes[1:])
        assert all(a.harmonic_amplitudes != b.harmonic_amplitudes and a.shape != b.shape for a, b in neighbours)
    assert design_classes(4)[0].name == "red circle slow hum"


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"num_classes": 1, "num_clips": 4}, ValueError, "num_classes must be at least 2"),
        ({"num_classes": 5, "num_clips": 4}, ValueError, r"num_clips \(4\) must be at least num_classes \(5\)"),
        ({"num_classes": 2, "num_clips": 4, "seed": -1}, ValueError, "seed must be non-negative"),
        ({"num_classes": 2, "num_clips": 4, "workers": 0}, ValueError, "workers must be at least 1"),
        ({"num_classes": 2.0, "num_clips": 4}, TypeError, "num_classes must be an integer"),
        ({"num_classes": 2, "num_clips": True}, TypeError, "num_clips must be an integer"),
    ],
)
def test_invalid_arguments_are_named(tmp_path, arguments, error, message):
    with pytest.raises(error, match=message):
        generate_synthetic_dataset(tmp_path / "out", progress=False, **arguments)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_refused(tmp_path):
    (tmp_path / "stale.mp4").write_bytes(b"")
    with pytest.raises(FileExistsError, match=f"{re.escape(str(tmp_path))} is not empty"):
        generate_synthetic_dataset(tmp_path, 2, 2, progress=False)
