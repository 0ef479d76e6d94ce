"""A synthetic audio-visual dataset written in the official VGGSound / AudioSet layouts.

``generate_synthetic_dataset`` writes real files that the real-data path reads unchanged:

* ``videos/*.mp4``: 10 s clips, H.264 video + AAC audio, named like the real datasets' clips
  (VGGSound ``KlsG1EnBEjc_000361.mp4``, AudioSet ``00W1lcxW-WU_40.000.mp4``).
* single-label: ``labels.csv``, the official VGGSound csv (no header,
  ``youtube_id,start_seconds,label,split``).
* multi-label: ``train_segments.csv`` / ``eval_segments.csv``, the official AudioSet segments
  csv (AudioSet has no split column, so one file per split, like its own downloads), plus
  ``class_labels_indices.csv``.

Every class is present in both modalities and each modality alone identifies it: the audio is
a class-specific tone (pitch on a log scale, harmonic mix, tremolo rate) and the video a
class-specific shape and colour moving in a class-specific direction. Per-clip randomness
(phase, loudness, pitch jitter, noise, background, position, size, speed) keeps the task from
being a constant lookup.

Same seed, same bytes: each clip's randomness comes from ``(seed, clip index)`` only, and the
encoders run single-threaded with bitexact flags and no timestamps, so the output does not
depend on the worker count or the wall clock (on one platform and PyAV/FFmpeg build).
"""

from __future__ import annotations

import colorsys
import csv
import io
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.codec.codec import UnknownCodecError
from tqdm import tqdm

CLIP_SECONDS = 10
# 16 kHz mono is what the model consumes (the 128-bin fbank is computed at 16 kHz), so storing
# that rate skips a resample per clip and keeps files small; the real-data path still has to
# resample AudioSet's 44.1 kHz stereo, which the loaders test on their own.
SAMPLE_RATE = 16_000
AUDIO_BIT_RATE = 32_000  # FFmpeg's AAC keeps up to 4 kHz + bit_rate / 8 = the full 8 kHz band
# 256x144 is YouTube's 144p rendition, about the size of a real AudioSet clip; 10 fps and a
# keyframe every 2 s keep encoding and random-access decoding cheap.
FRAME_WIDTH, FRAME_HEIGHT = 256, 144
FRAMES_PER_SECOND = 10
KEYFRAME_INTERVAL = 2 * FRAMES_PER_SECOND
FALLBACK_VIDEO_BIT_RATE = 150_000  # for encoders without a constant-quality mode
# FFmpeg's AVColorRange / AVColorSpace values (PyAV's reformatter enums use swscale's numbering).
AVCOL_RANGE_MPEG = 1
AVCOL_SPC_SMPTE170M = 6

H264_ENCODER_CANDIDATES = ("libx264", "libopenh264", "h264")
# Constant quality for x264: every clip keeps the same fidelity of edges and colours, and the
# mostly static scenes come out small; scenecut=0 keeps the keyframe interval fixed.
ENCODER_TUNING = {
    "libx264": {"preset": "veryfast", "crf": "28", "x264-params": f"scenecut=0:min-keyint={KEYFRAME_INTERVAL}"},
}

YOUTUBE_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
YOUTUBE_ID_LENGTH = 11
MAX_VGGSOUND_START_SECONDS = 600
MAX_AUDIOSET_START_SECONDS = 290
TEST_FRACTION = 0.2
MAX_LABELS_PER_CLIP = 3

# Fundamentals stay where a 128-bin log-mel at 16 kHz resolves them and their first harmonics
# stay below the 8 kHz Nyquist limit.
LOWEST_FUNDAMENTAL_HZ = 150.0
HIGHEST_FUNDAMENTAL_HZ = 3000.0
HIGHEST_HARMONIC_HZ = 7000.0
MAX_PITCH_JITTER = 0.02  # relative; shrinks further when classes sit closer than 8 % apart
# Hue jitter shrinks with the class count so that classes of the same shape keep apart: their
# hues are at least ~0.9 / num_classes apart on the golden-ratio sequence.
MAX_HUE_JITTER = 0.01
HUE_JITTER_PER_CLASS_GAP = 0.2

TIMBRES = (  # (name word, relative amplitudes of harmonics 1, 2, 3, ...)
    ("hum", (1.0, 0.2)),
    ("reed", (1.0, 0.0, 0.55, 0.0, 0.35, 0.0, 0.2)),
    ("buzz", (1.0, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15)),
    ("chime", (1.0, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0, 0.45)),
)
TREMOLOS = (("slow", 1.5), ("pulsing", 4.0), ("fluttering", 9.0))  # (name word, rate in Hz)
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "mint",
             "cyan", "azure", "blue", "violet", "magenta", "pink")  # 30-degree hue sectors
# Low-discrepancy sequences spread hues and motion directions evenly whatever the class count.
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
PLASTIC_RATIO_CONJUGATE = 0.7548776662466927

_PLAN_STREAM, _RENDER_STREAM = 0, 1  # independent RNG streams derived from the user's seed


@dataclass(frozen=True)
class SyntheticClass:
    """One class's design: how it sounds and how it looks."""

    index: int
    name: str  # human-readable, describes the class: "<colour> <shape> <tremolo> <timbre>"
    mid: str  # AudioSet-style label id, e.g. "/m/syn03"
    fundamental_hz: float
    pitch_jitter: float  # each clip's pitch is off by at most this relative amount
    harmonic_amplitudes: tuple[float, ...]
    tremolo_hz: float  # amplitude-modulation rate
    shape: str
    hue: float  # 0..1; drawn saturated and bright so it stands out of the dull background
    hue_jitter: float  # each clip's hue is off by at most this much
    motion_angle: float  # radians, direction of travel in image coordinates (y down)


@dataclass(frozen=True)
class ClipPlan:
    """One clip as the label files list it."""

    index: int
    youtube_id: str
    start_seconds: int
    class_indices: tuple[int, ...]  # sorted; the first class of a single-label clip is its label
    split: str  # "train" or "test"
    filename: str


@dataclass(frozen=True)
class SyntheticDataset:
    """What ``generate_synthetic_dataset`` wrote; paths that a layout does not have are None."""

    root: Path
    videos_dir: Path
    multi_label: bool
    classes: tuple[SyntheticClass, ...]
    clips: tuple[ClipPlan, ...]
    labels_csv: Path | None  # single-label: VGGSound csv with a split column
    train_segments_csv: Path | None  # multi-label: AudioSet segments csv of the train split
    eval_segments_csv: Path | None  # multi-label: AudioSet segments csv of the test split
    class_labels_indices_csv: Path | None  # multi-label: AudioSet class list

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_clips(self) -> int:
        return len(self.clips)

    @property
    def num_train(self) -> int:
        return sum(clip.split == "train" for clip in self.clips)

    @property
    def num_test(self) -> int:
        return sum(clip.split == "test" for clip in self.clips)

    @property
    def label_files(self) -> tuple[Path, ...]:
        candidates = (self.labels_csv, self.train_segments_csv, self.eval_segments_csv, self.class_labels_indices_csv)
        return tuple(path for path in candidates if path is not None)


@dataclass(frozen=True)
class _RenderTask:
    """Everything a worker process needs to write one clip."""

    path: Path
    plan: ClipPlan
    classes: tuple[SyntheticClass, ...]  # the clip's classes only
    seed: int
    encoder: str


def generate_synthetic_dataset(
    out_dir: str | Path,
    num_classes: int,
    num_clips: int,
    multi_label: bool = False,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> SyntheticDataset:
    """Write a synthetic dataset to ``out_dir`` (new or empty) and describe what was written.

    ``num_clips`` clips of ``num_classes`` classes; ``multi_label`` switches from the VGGSound
    layout (one class per clip) to the AudioSet layout (one to three classes per clip).
    ``workers`` > 1 renders clips in that many processes with byte-identical results.
    """
    _validate_arguments(num_classes, num_clips, seed, workers)
    root = Path(out_dir)
    _require_empty_directory(root)
    encoder = select_h264_encoder()
    classes = design_classes(num_classes)
    clips = plan_clips(num_classes, num_clips, multi_label, seed)
    videos_dir = root / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        _RenderTask(videos_dir / clip.filename, clip, tuple(classes[i] for i in clip.class_indices), seed, encoder)
        for clip in clips
    ]
    _render_all(tasks, workers, progress)
    # Label files last: a directory with label files holds every clip they list.
    if multi_label:
        return _write_audioset_layout(root, classes, clips, seed)
    labels_csv = root / "labels.csv"
    _write_text(labels_csv, vggsound_csv(clips, classes))
    return SyntheticDataset(root, videos_dir, False, classes, clips, labels_csv, None, None, None)


def _write_audioset_layout(
    root: Path, classes: tuple[SyntheticClass, ...], clips: tuple[ClipPlan, ...], seed: int
) -> SyntheticDataset:
    train_csv, eval_csv = root / "train_segments.csv", root / "eval_segments.csv"
    classes_csv = root / "class_labels_indices.csv"
    _write_text(train_csv, audioset_segments_csv([c for c in clips if c.split == "train"], classes, seed))
    _write_text(eval_csv, audioset_segments_csv([c for c in clips if c.split == "test"], classes, seed))
    _write_text(classes_csv, class_labels_indices_csv(classes))
    return SyntheticDataset(root, root / "videos", True, classes, clips, None, train_csv, eval_csv, classes_csv)


def _validate_arguments(num_classes: int, num_clips: int, seed: int, workers: int) -> None:
    for name, value in (("num_classes", num_classes), ("num_clips", num_clips), ("seed", seed), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (a classifier needs two classes), got {num_classes}")
    if num_clips < num_classes:
        raise ValueError(
            f"num_clips ({num_clips}) must be at least num_classes ({num_classes}) so every class has a clip"
        )
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def _require_empty_directory(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"output directory {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"output directory {root} is not empty; choose a new directory or empty it first")


def select_h264_encoder(candidates: Sequence[str] = H264_ENCODER_CANDIDATES) -> str:
    """The first H.264 encoder in ``candidates`` that this PyAV build's FFmpeg has."""
    for name in candidates:
        try:
            codec = av.Codec(name, "w")
        except UnknownCodecError:
            continue
        return codec.name  # "h264" resolves to the concrete encoder, e.g. "libx264"
    raise RuntimeError(
        f"no H.264 encoder in PyAV's FFmpeg (tried {', '.join(candidates)}); "
        "install a PyAV wheel whose FFmpeg has libx264 or libopenh264"
    )


# ---------------------------------------------------------------------------- class design


def design_classes(num_classes: int) -> tuple[SyntheticClass, ...]:
    """The class designs; a pure function of the class count, so names do not depend on the seed.

    Neighbouring pitches belong to classes with different timbres (and shapes), so classes stay
    apart in the spectrogram even when many classes crowd the pitch range. In video, colour
    alone separates a few dozen classes; beyond that the shape x colour x direction
    combination does.
    """
    spacing = (HIGHEST_FUNDAMENTAL_HZ / LOWEST_FUNDAMENTAL_HZ) ** (1 / (num_classes - 1))
    pitch_jitter = min(MAX_PITCH_JITTER, (spacing - 1) / 4)
    hue_jitter = min(MAX_HUE_JITTER, HUE_JITTER_PER_CLASS_GAP / num_classes)
    classes, name_counts = [], {}
    for k in range(num_classes):
        timbre_word, harmonics = TIMBRES[k % len(TIMBRES)]
        tremolo_word, tremolo_hz = TREMOLOS[(k // len(TIMBRES)) % len(TREMOLOS)]
        shape = SHAPES[k % len(SHAPES)]
        hue = (k * GOLDEN_RATIO_CONJUGATE) % 1.0
        base_name = f"{_hue_name(hue)} {shape} {tremolo_word} {timbre_word}"
        name_counts[base_name] = name_counts.get(base_name, 0) + 1
        name = base_name if name_counts[base_name] == 1 else f"{base_name} {name_counts[base_name]}"
        classes.append(SyntheticClass(
            index=k,
            name=name,
            mid=f"/m/syn{k:02d}",
            fundamental_hz=LOWEST_FUNDAMENTAL_HZ * spacing**k,
            pitch_jitter=pitch_jitter,
            harmonic_amplitudes=harmonics,
            tremolo_hz=tremolo_hz,
            shape=shape,
            hue=hue,
            hue_jitter=hue_jitter,
            motion_angle=2 * math.pi * ((k * PLASTIC_RATIO_CONJUGATE) % 1.0),
        ))
    return tuple(classes)


def _hue_name(hue: float) -> str:
    return HUE_NAMES[int((hue * len(HUE_NAMES) + 0.5) % len(HUE_NAMES))]


# ---------------------------------------------------------------------------- clip plan


def plan_clips(num_classes: int, num_clips: int, multi_label: bool, seed: int) -> tuple[ClipPlan, ...]:
    """Ids, start times, labels and the split of every clip, from one seeded RNG stream.

    Every clip has a primary class dealt out evenly, which also stratifies the split; a
    multi-label clip adds up to two more distinct classes.
    """
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    ids = draw_youtube_ids(rng, num_clips)
    primaries = rng.permutation(np.arange(num_clips) % num_classes)
    is_test = stratified_test_mask(primaries, rng)
    max_start = MAX_AUDIOSET_START_SECONDS if multi_label else MAX_VGGSOUND_START_SECONDS
    starts = rng.integers(0, max_start + 1, size=num_clips)
    clips = []
    for i in range(num_clips):
        primary = int(primaries[i])
        if multi_label:
            num_labels = int(rng.integers(1, min(MAX_LABELS_PER_CLIP, num_classes) + 1))
            others = [c for c in range(num_classes) if c != primary]
            extra = rng.choice(others, size=num_labels - 1, replace=False)
            class_indices = tuple(sorted([primary, *(int(c) for c in extra)]))
            filename = audioset_filename(ids[i], int(starts[i]))
        else:
            class_indices = (primary,)
            filename = vggsound_filename(ids[i], int(starts[i]))
        split = "test" if is_test[i] else "train"
        clips.append(ClipPlan(i, ids[i], int(starts[i]), class_indices, split, filename))
    return tuple(clips)


def draw_youtube_ids(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct 11-character ids over YouTube's alphabet."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        letters = rng.integers(0, len(YOUTUBE_ID_ALPHABET), size=YOUTUBE_ID_LENGTH)
        youtube_id = "".join(YOUTUBE_ID_ALPHABET[i] for i in letters)
        if youtube_id not in seen:
            seen.add(youtube_id)
            ids.append(youtube_id)
    return ids


def stratified_test_mask(class_of_clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mark about TEST_FRACTION of each class's clips as test, keeping at least one clip of a
    class in each split whenever the class has two or more clips."""
    is_test = np.zeros(len(class_of_clip), dtype=bool)
    for c in np.unique(class_of_clip):
        members = np.flatnonzero(class_of_clip == c)
        if len(members) < 2:
            continue
        num_test = min(max(int(TEST_FRACTION * len(members) + 0.5), 1), len(members) - 1)
        is_test[rng.choice(members, size=num_test, replace=False)] = True
    return is_test


def vggsound_filename(youtube_id: str, start_seconds: int) -> str:
    return f"{youtube_id}_{start_seconds:06d}.mp4"


def audioset_filename(youtube_id: str, start_seconds: int) -> str:
    return f"{youtube_id}_{start_seconds:.3f}.mp4"


# ---------------------------------------------------------------------------- label files


def vggsound_csv(clips: Iterable[ClipPlan], classes: Sequence[SyntheticClass]) -> str:
    """The official VGGSound csv: no header, ``youtube_id,start_seconds,label,split``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for clip in clips:
        writer.writerow([clip.youtube_id, clip.start_seconds, classes[clip.class_indices[0]].name, clip.split])
    return buffer.getvalue()


def audioset_segments_csv(clips: Sequence[ClipPlan], classes: Sequence[SyntheticClass], seed: int) -> str:
    """The official AudioSet segments csv: three ``#`` lines, then
    ``YTID, start_seconds, end_seconds, "mid1,mid2"`` rows (note the ", " separators)."""
    label_counts = [len(clip.class_indices) for clip in clips]
    unique_labels = {c for clip in clips for c in clip.class_indices}
    lines = [
        f"# Segments csv created by avsiam synth (seed={seed})",
        f"# num_ytids={len(clips)}, num_segs={len(clips)}, "
        f"num_unique_labels={len(unique_labels)}, num_positive_labels={sum(label_counts)}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    for clip in clips:
        mids = ",".join(classes[c].mid for c in clip.class_indices)
        start = clip.start_seconds
        lines.append(f'{clip.youtube_id}, {start:.3f}, {start + CLIP_SECONDS:.3f}, "{mids}"')
    return "\n".join(lines) + "\n"


def class_labels_indices_csv(classes: Sequence[SyntheticClass]) -> str:
    """AudioSet's ``class_labels_indices.csv``: ``index,mid,display_name``, names always quoted."""
    rows = [f"{cls.index},{cls.mid},{_quoted(cls.name)}" for cls in classes]
    return "\n".join(["index,mid,display_name", *rows]) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="")


# ---------------------------------------------------------------------------- rendering


@contextmanager
def _clip_mapper(workers: int, num_tasks: int) -> Iterator[Callable]:
    """An ordered ``map`` over clips: in this process, or in ``workers`` spawned processes
    (spawn, not fork: the caller may hold threads, e.g. torch's, that fork would copy locked)."""
    if workers == 1:
        yield map
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, num_tasks), mp_context=context) as pool:
        yield pool.map


def _render_all(tasks: Sequence[_RenderTask], workers: int, progress: bool) -> None:
    with _clip_mapper(workers, len(tasks)) as mapper, tqdm(
        total=len(tasks), desc="synth", unit="clip", disable=not progress
    ) as bar:
        for _ in mapper(_render_clip, tasks):
            bar.update()


def _render_clip(task: _RenderTask) -> None:
    """Synthesise and encode one clip."""
    clip_rng = np.random.default_rng([task.seed, _RENDER_STREAM, task.plan.index])
    # A clip-level latent seen in both modalities, as in real footage (a nearer source is louder
    # and larger): it gives each clip, not only each class, an audio-visual correspondence, so
    # retrieval can tell clips of one class apart.
    proximity = clip_rng.uniform()
    audio_rng, video_rng = clip_rng.spawn(2)
    audio = synthesize_audio(task.classes, audio_rng, proximity)
    frames = render_frames(task.classes, video_rng, proximity)
    # Write under a temporary name so an interrupted run never leaves a truncated .mp4 behind.
    partial = task.path.with_name(task.path.name + ".partial")
    encode_clip(partial, frames, audio, task.encoder)
    os.replace(partial, task.path)


def synthesize_audio(classes: Sequence[SyntheticClass], rng: np.random.Generator, proximity: float) -> np.ndarray:
    """Mono float32 audio: the sum of the classes' tones, white noise at 10-25 dB SNR, and a peak
    level from -26 dB (far, proximity 0) to -1 dB (near, proximity 1)."""
    t = np.arange(CLIP_SECONDS * SAMPLE_RATE) / SAMPLE_RATE
    mix = sum(class_tone(cls, t, rng) * rng.uniform(0.5, 1.0) for cls in classes)
    signal_rms = np.sqrt(np.mean(mix**2))
    snr_db = rng.uniform(10.0, 25.0)
    mix = mix + rng.normal(0.0, signal_rms / 10 ** (snr_db / 20), size=t.shape)
    mix *= 10 ** ((-26.0 + 25.0 * proximity) / 20) / np.max(np.abs(mix))
    return mix.astype(np.float32)


def class_tone(cls: SyntheticClass, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class's sound at unit RMS: harmonics of a jittered fundamental with random phases,
    under a tremolo of random depth and phase."""
    fundamental = cls.fundamental_hz * (1 + cls.pitch_jitter) ** rng.uniform(-1.0, 1.0)
    tone = np.zeros_like(t)
    for number, amplitude in enumerate(cls.harmonic_amplitudes, start=1):
        if amplitude > 0 and number * fundamental <= HIGHEST_HARMONIC_HZ:
            tone += amplitude * np.sin(2 * np.pi * number * fundamental * t + rng.uniform(0, 2 * np.pi))
    depth = rng.uniform(0.3, 0.7)
    tone *= 1 - depth * (0.5 + 0.5 * np.sin(2 * np.pi * cls.tremolo_hz * t + rng.uniform(0, 2 * np.pi)))
    return tone / np.sqrt(np.mean(tone**2))


@dataclass(frozen=True)
class _MovingObject:
    shape: str
    rgb: np.ndarray  # (3,) in 0..1
    radius: float  # pixels
    centres: np.ndarray  # (frames, 2) x, y in pixels


def render_frames(classes: Sequence[SyntheticClass], rng: np.random.Generator, proximity: float) -> Iterator[np.ndarray]:
    """The clip's RGB frames (float32 H x W x 3 in 0..1), one at a time: each class's object
    moving over a randomly coloured, blotchy background."""
    background = random_background(rng)
    # Several objects share the frame at a combined area of about one: full-size objects in the
    # central square would hide each other, and a hidden class cannot be learned from the frames.
    scale = 1 / math.sqrt(len(classes))
    objects = [plan_moving_object(cls, rng, proximity, scale) for cls in classes]
    for index in range(CLIP_SECONDS * FRAMES_PER_SECOND):
        frame = background.copy()
        for obj in objects:
            paint_object(frame, obj, index)
        yield frame


def random_background(rng: np.random.Generator) -> np.ndarray:
    """A dull random colour (low saturation, so class colours stand out) with smooth blotches."""
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.75)))
    coarse = rng.normal(0.0, 1.0, size=(FRAME_HEIGHT // 16 + 1, FRAME_WIDTH // 16 + 1))
    blotches = _upsample_rows(_upsample_rows(coarse, FRAME_HEIGHT).T, FRAME_WIDTH).T
    return np.clip(base + 0.08 * blotches[..., None], 0.0, 1.0).astype(np.float32)


def _upsample_rows(grid: np.ndarray, size: int) -> np.ndarray:
    """Linearly interpolate ``grid``'s rows onto ``size`` evenly spaced rows."""
    positions = np.linspace(0, grid.shape[0] - 1, size)
    return np.stack([np.interp(positions, np.arange(grid.shape[0]), column) for column in grid.T], axis=1)


def plan_moving_object(
    cls: SyntheticClass, rng: np.random.Generator, proximity: float, scale: float = 1.0
) -> _MovingObject:
    """The class's shape in its colour (slightly varied), ``scale`` times its usual size, moving
    along its direction at a random speed from a random start, bouncing off the frame edges."""
    radius = scale * FRAME_HEIGHT * (0.2 + 0.15 * proximity) * rng.uniform(0.95, 1.05)  # nearer is larger
    hue = (cls.hue + rng.uniform(-cls.hue_jitter, cls.hue_jitter)) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.85, 1.0), rng.uniform(0.8, 1.0)), dtype=np.float32)
    speed = rng.uniform(8.0, 20.0)  # pixels per second
    times = np.arange(CLIP_SECONDS * FRAMES_PER_SECOND) / FRAMES_PER_SECOND
    centres = []
    # Objects stay inside the central square: the model sees a centre crop of the shorter side,
    # and a class must be visible in the frames it is shown.
    margin = (FRAME_WIDTH - FRAME_HEIGHT) / 2
    for (lo, hi), velocity in (((margin, FRAME_WIDTH - margin), math.cos(cls.motion_angle)), ((0.0, FRAME_HEIGHT), math.sin(cls.motion_angle))):
        low, high = lo + radius, hi - radius
        centres.append(_bounce(rng.uniform(low, high) + speed * velocity * times, low, high))
    return _MovingObject(cls.shape, rgb, radius, np.stack(centres, axis=1))


def _bounce(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold an unbounded straight-line path into [low, high] as if reflecting off the ends."""
    span = high - low
    folded = np.mod(position - low, 2 * span)
    return low + span - np.abs(span - folded)


def paint_object(frame: np.ndarray, obj: _MovingObject, index: int) -> None:
    """Draw ``obj`` as it is at frame ``index``, touching only its bounding box."""
    cx, cy = obj.centres[index]
    x0, x1 = max(int(cx - obj.radius), 0), min(int(cx + obj.radius) + 2, FRAME_WIDTH)
    y0, y1 = max(int(cy - obj.radius), 0), min(int(cy + obj.radius) + 2, FRAME_HEIGHT)
    u = (np.arange(x0, x1)[None, :] + 0.5 - cx) / obj.radius
    v = (np.arange(y0, y1)[:, None] + 0.5 - cy) / obj.radius
    frame[y0:y1, x0:x1][shape_mask(obj.shape, u, v)] = obj.rgb


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside ``shape`` at coordinates (u, v) relative to its centre, in radii (y down)."""
    u, v = np.broadcast_arrays(u, v)
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":  # apex up, base at v = 0.8
        return (v >= -1.0) & (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "ring":
        return (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.3)
    if shape == "cross":
        return (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 1.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 in the planar layout ``VideoFrame.from_ndarray`` takes
    (H * 3/2 x W). Converting here rather than in swscale keeps the bytes independent of
    swscale's CPU-specific code paths."""
    r, g, b = frame[..., 0], frame[..., 1], frame[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b

    def subsample(plane: np.ndarray) -> np.ndarray:  # 2x2 box average; slicing is ~10x faster than mean()
        return (plane[0::2, 0::2] + plane[1::2, 0::2] + plane[0::2, 1::2] + plane[1::2, 1::2]) * 0.25

    height, width = frame.shape[:2]
    chroma = np.concatenate([subsample(cb), subsample(cr)]).reshape(height // 2, width)
    planes = np.concatenate([y, chroma])
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- encoding


def encode_clip(path: Path, frames: Iterable[np.ndarray], audio: np.ndarray, encoder: str) -> None:
    """Mux ``frames`` (H.264) and mono ``audio`` (AAC) into an mp4, interleaved per frame.

    Single-threaded, bitexact and without creation_time so the same input gives the same bytes.
    """
    with av.open(str(path), mode="w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        video = container.add_stream(encoder, rate=FRAMES_PER_SECOND)
        video.width, video.height, video.pix_fmt = FRAME_WIDTH, FRAME_HEIGHT, "yuv420p"
        video.codec_context.gop_size = KEYFRAME_INTERVAL
        video.codec_context.thread_count = 1
        video.codec_context.color_range = AVCOL_RANGE_MPEG  # tag what rgb_to_yuv420p writes:
        video.codec_context.colorspace = AVCOL_SPC_SMPTE170M  # limited-range BT.601
        if encoder not in ENCODER_TUNING:
            video.codec_context.bit_rate = FALLBACK_VIDEO_BIT_RATE
        video.codec_context.options = {"flags": "+bitexact", **ENCODER_TUNING.get(encoder, {})}
        sound = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        sound.codec_context.bit_rate = AUDIO_BIT_RATE
        sound.codec_context.thread_count = 1
        # The fast coder takes a third of the default (two-loop) coder's time; for tones in
        # noise the quality difference does not matter.
        sound.codec_context.options = {"flags": "+bitexact", "aac_coder": "fast"}
        samples_per_frame = SAMPLE_RATE // FRAMES_PER_SECOND
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            picture.pts = index
            container.mux(video.encode(picture))
            chunk = audio[index * samples_per_frame:(index + 1) * samples_per_frame]
            samples = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            samples.sample_rate, samples.pts = SAMPLE_RATE, index * samples_per_frame
            container.mux(sound.encode(samples))
        container.mux(video.encode(None))
        container.mux(sound.encode(None))
