"""``avsiam stage``: turn downloaded clips and their label file into a staged dataset.

Input is a folder of clips plus one or more label files in an official layout (VGGSound csv,
AudioSet segments csv with ``class_labels_indices.csv``, or a CAV-MAE datafile pointing at
already extracted wavs and frames). Every clip becomes a 16 kHz mono wav and its 10 frames
(shorter side 224, centre crop), decoded in parallel worker processes. A clip that is missing
or does not decode is quarantined with its reason in ``quarantine.csv``; the stage fails only
when the bad fraction exceeds ``max_bad_fraction``. Re-staging into the same folder reuses
every clip whose source bytes did not change, so new clips cost only their own decoding.

Label files are read and checked completely (unknown label ids, duplicates, bad rows) before
any clip is decoded.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from avsiam.data.audio import DecodeError, load_waveform, write_wav
from avsiam.data.formats import (
    ClassIndex,
    FormatError,
    read_audioset_segments,
    read_cavmae_datafile,
    read_class_labels,
    read_vggsound_csv,
    sniff_label_format,
    write_class_labels,
)
from avsiam.data.manifest import CLASSES_NAME, MANIFEST_NAME, ClipRecord, Manifest, file_digest, load_manifest
from avsiam.data.sampler import mix_seed
from avsiam.data.video import NUM_FRAMES, extract_frames, load_frame, resize_and_crop, save_frame

QUARANTINE_NAME = "quarantine.csv"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


class StagingError(RuntimeError):
    """The stage cannot produce a usable dataset (e.g. too many bad clips)."""


@dataclass(frozen=True)
class PlannedClip:
    """A clip to stage: its id, split, labels and where its audio and frames come from."""

    id: str
    split: str
    labels: tuple[str, ...]
    video: str | None = None  # an mp4 holding both audio and video
    wav: str | None = None  # CAV-MAE: an extracted audio file ...
    frames: tuple[str, ...] = ()  # ... and its extracted frames

    @property
    def sources(self) -> list[Path]:
        return [Path(self.video)] if self.video else [Path(self.wav), *map(Path, self.frames)]


@dataclass
class StagingResult:
    manifest_path: Path | None
    staged: int
    reused: int
    quarantined: list[tuple[str, str, str]] = field(default_factory=list)  # (id, source, reason)

    @property
    def total(self) -> int:
        return self.staged + self.reused + len(self.quarantined)


def infer_split(label_file: Path) -> str:
    stem = label_file.stem.lower()
    if "eval" in stem or "test" in stem:
        return "test"
    if "val" in stem:
        return "val"
    return "train"


def plan_clips(
    videos_dir: Path | None,
    label_files: Sequence[Path],
    classes_csv: Path | None = None,
    split: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[ClassIndex, bool, list[PlannedClip]]:
    """Read every label file and return (classes, multi_label, clips) without decoding anything."""
    if not label_files:
        raise FormatError("no label file given (--labels)")
    formats = {sniff_label_format(f) for f in label_files}
    if len(formats) > 1:
        raise FormatError(f"label files mix formats ({', '.join(sorted(formats))}); stage them separately")
    fmt = formats.pop()
    if fmt in ("vggsound", "audioset") and videos_dir is None:
        raise FormatError(f"--videos is required for a {fmt} label file")
    if videos_dir is not None and not videos_dir.is_dir():
        raise FormatError(f"--videos {videos_dir}: not a directory")
    classes = read_class_labels(classes_csv) if classes_csv else None
    planned: list[PlannedClip] = []
    if fmt == "vggsound":
        segments = [(f, s) for f in label_files for s in read_vggsound_csv(f)]
        if classes is None:
            # VGGSound's class list is its sorted label names; the name is the label id.
            names = tuple(sorted({s.labels[0] for _, s in segments}))
            classes = ClassIndex(names, names)
        by_name = {n: m for m, n in zip(classes.mids, classes.names)}
        for f, s in segments:
            label = s.labels[0] if s.labels[0] in classes.index_of else by_name.get(s.labels[0], s.labels[0])
            classes.indices([label], f"{f}: line {s.line}")
            clip_id = Path(s.vggsound_filename()).stem
            planned.append(PlannedClip(clip_id, split or s.split or "train", (label,), video=str(videos_dir / s.vggsound_filename())))
        multi_label = False
    elif fmt == "audioset":
        if classes is None:
            raise FormatError("--classes class_labels_indices.csv is required with an AudioSet segments csv")
        for f in label_files:
            for s in read_audioset_segments(f):
                classes.indices(s.labels, f"{f}: line {s.line}")
                clip_id = Path(s.audioset_filename()).stem
                planned.append(PlannedClip(clip_id, split or infer_split(f), s.labels, video=str(videos_dir / s.audioset_filename())))
        multi_label = True
    else:
        if classes is None:
            raise FormatError("--classes class_labels_indices.csv is required with a CAV-MAE datafile")
        for f in label_files:
            for i, e in enumerate(read_cavmae_datafile(f)):
                classes.indices(e.labels, f"{f}: data[{i}] (video_id {e.video_id!r})")
                frames = tuple(str(p) for p in e.frame_paths(NUM_FRAMES))
                planned.append(PlannedClip(e.video_id, split or infer_split(f), e.labels, wav=e.wav, frames=frames))
        multi_label = True
    _check_ids(planned)
    if val_fraction > 0:
        planned = [_carve_val(c, val_fraction, seed) for c in planned]
    return classes, multi_label, planned


def _check_ids(planned: Sequence[PlannedClip]) -> None:
    seen: set[str] = set()
    for clip in planned:
        if not _SAFE_ID.match(clip.id):
            raise FormatError(f"clip id {clip.id!r}: only letters, digits, '_', '-' and '.' are allowed (it names files)")
        if clip.id in seen:
            raise FormatError(f"clip id {clip.id!r} is listed twice across the label files")
        seen.add(clip.id)


def _carve_val(clip: PlannedClip, fraction: float, seed: int) -> PlannedClip:
    """Move a deterministic ``fraction`` of train clips to ``val`` (model selection split)."""
    if clip.split != "train":
        return clip
    h = mix_seed(seed, int.from_bytes(hashlib.sha256(clip.id.encode()).digest()[:8], "little"))
    if h % 1_000_000 < fraction * 1_000_000:
        return PlannedClip(clip.id, "val", clip.labels, clip.video, clip.wav, clip.frames)
    return clip


def _shard(clip_id: str) -> str:
    """Two-hex-digit subfolder, so millions of clips never sit in one directory."""
    return hashlib.sha1(clip_id.encode()).hexdigest()[:2]


def stage_one(clip: PlannedClip, out_dir: str, previous: ClipRecord | None) -> tuple[str, ClipRecord | str]:
    """Worker: stage one clip. Returns ("staged"|"reused", record) or ("bad", reason)."""
    out = Path(out_dir)
    missing = [str(p) for p in clip.sources if not p.is_file()]
    if missing:
        return "bad", f"missing file {missing[0]}"
    source_digest = file_digest(clip.sources)
    shard = _shard(clip.id)
    audio_rel = f"audio/{shard}/{clip.id}.wav"
    frame_rels = tuple(f"frames/{shard}/{clip.id}/{i}.jpg" for i in range(NUM_FRAMES))
    if (
        previous is not None
        and previous.source_digest == source_digest
        and all((out / rel).is_file() for rel in [previous.audio, *previous.frames])
    ):
        return "reused", ClipRecord(clip.id, clip.split, previous.audio, previous.frames, clip.labels, previous.digest, source_digest)
    try:
        if clip.video:
            waveform = load_waveform(clip.video)
            frames = extract_frames(clip.video, num_frames=NUM_FRAMES)
        else:
            waveform = load_waveform(clip.wav)
            frames = [resize_and_crop(load_frame(p)) for p in clip.frames]
    except (DecodeError, OSError, ValueError) as exc:
        return "bad", str(exc)
    if waveform.numel() < 400:  # shorter than one 25 ms analysis window at 16 kHz
        return "bad", f"audio too short ({waveform.numel()} samples at 16 kHz)"
    (out / audio_rel).parent.mkdir(parents=True, exist_ok=True)
    (out / frame_rels[0]).parent.mkdir(parents=True, exist_ok=True)
    write_wav(out / audio_rel, waveform)
    for frame, rel in zip(frames, frame_rels):
        save_frame(frame, out / rel)
    digest = file_digest([out / audio_rel, *(out / rel for rel in frame_rels)])
    return "staged", ClipRecord(clip.id, clip.split, audio_rel, frame_rels, clip.labels, digest, source_digest)


def stage_dataset(
    label_files: Sequence[str | Path],
    out_dir: str | Path,
    videos_dir: str | Path | None = None,
    classes_csv: str | Path | None = None,
    split: str | None = None,
    val_fraction: float = 0.1,
    max_bad_fraction: float = 0.2,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> StagingResult:
    """Stage a dataset into ``out_dir`` (see the module docstring)."""
    out = Path(out_dir)
    classes, multi_label, planned = plan_clips(
        Path(videos_dir) if videos_dir else None,
        [Path(f) for f in label_files],
        Path(classes_csv) if classes_csv else None,
        split,
        val_fraction,
        seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_records(out)
    records: dict[str, ClipRecord] = {}
    quarantined: list[tuple[str, str, str]] = []
    counts = {"staged": 0, "reused": 0}
    bar = tqdm(total=len(planned), desc="staging clips", unit="clip", disable=not progress)
    for clip, (status, value) in _stage_all(planned, out, previous, workers):
        if status == "bad":
            quarantined.append((clip.id, str(clip.sources[0]), str(value)))
        else:
            counts[status] += 1
            records[clip.id] = value
        bar.update()
    bar.close()
    _write_quarantine(out / QUARANTINE_NAME, sorted(quarantined))
    bad_fraction = len(quarantined) / len(planned)
    if bad_fraction > max_bad_fraction:
        raise StagingError(
            f"{len(quarantined)} of {len(planned)} clips are bad ({bad_fraction:.1%} > max_bad_fraction "
            f"{max_bad_fraction:.1%}); see {out / QUARANTINE_NAME}"
        )
    if not records:
        raise StagingError(f"no clip could be staged; see {out / QUARANTINE_NAME}")
    clips = [records[c.id] for c in planned if c.id in records]
    write_class_labels(out / CLASSES_NAME, classes)
    sources = ", ".join(str(Path(f).resolve()) for f in label_files)
    manifest = Manifest(out, classes, multi_label, clips, source=sources)
    manifest.validate(check_files=True)
    return StagingResult(manifest.save(out / MANIFEST_NAME), counts["staged"], counts["reused"], sorted(quarantined))


def _stage_all(planned: Sequence[PlannedClip], out: Path, previous: dict[str, ClipRecord], workers: int):
    """Yield (clip, result) as clips finish: in worker processes, or in this one for workers=1."""
    if workers <= 1:
        for clip in planned:
            yield clip, stage_one(clip, str(out), previous.get(clip.id))
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads, which do not survive a fork.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(stage_one, c, str(out), previous.get(c.id)): c for c in planned}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _previous_records(out: Path) -> dict[str, ClipRecord]:
    if not (out / MANIFEST_NAME).is_file():
        return {}
    try:
        return {c.id: c for c in load_manifest(out, check_files=False).clips}
    except FormatError:
        return {}  # an unreadable old manifest only costs re-decoding


def _write_quarantine(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["clip_id", "source", "reason"])
        writer.writerows(rows)
