"""Staging: downloaded clips and their label files in, a sharded dataset out.

Input is a folder or ``s3://`` prefix of clips plus label files in an official layout
(VGGSound csv, AudioSet segments csv with ``class_labels_indices.csv``, or a CAV-MAE datafile
pointing at already extracted wavs and frames). Output is a staged dataset
(:mod:`avsiam.data.index`): WebDataset shards holding each clip's 16 kHz mono wav and 10
frames (shorter side 224, centre crop), and the index.

Staging is planned once and then runs as one independent task per shard, so an orchestrator
can spread the shards over a cluster (``flows/staging.py`` runs them as Prefect tasks on
Ray; :func:`stage_dataset` runs them in this process):

1. :func:`plan_staging` reads and checks every label file before anything is decoded, takes
   each source's identity from metadata alone (size and mtime on disk, the ETag and size of
   one S3 listing; never the bytes), and assigns clips to shard *slots*. The assignment is
   stable: a clip keeps the slot it had, new clips fill the split's last slot and then new
   ones, so a retrain with 1 % new clips decodes about 1 % of the data.
2. :func:`stage_shard` builds one shard. Its key digests its clips' ids, splits, labels and
   source identities (and :data:`STAGING_FORMAT`, not the project version: a release must
   not re-decode 2 M clips). A shard whose key has a finished record beside it is reused as
   it is; otherwise unchanged clips are copied from the slot's previous shard and only new or
   changed sources are read (each from its own path or S3 object) and decoded. A missing or
   undecodable clip is quarantined with its reason, and so is a clip whose audio is silent
   (see :class:`AudioScreen`), unless the request stages those with a warning.
3. :func:`finalize_staging` checks ``max_bad_fraction`` over the whole dataset, writes
   ``quarantine.csv``, the class list and the index, and removes shards that neither the new
   nor the previous index lists (a training run on the previous index keeps its files).

A run killed mid-way keeps every shard it finished: run again, those are reused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from avsiam.data.audio import STAGED_AUDIO_SAMPLES, DecodeError, decode_wav, load_waveform, peak_dbfs
from avsiam.data.clips import media_members, staged_members
from avsiam.data.formats import (
    SPLITS,
    ClassIndex,
    FormatError,
    class_labels_csv,
    read_audioset_segments,
    read_cavmae_datafile,
    read_class_labels,
    read_vggsound_csv,
    sniff_label_format,
)
from avsiam.data.index import (
    CLASSES_NAME,
    INDEX_NAME,
    QUARANTINE_NAME,
    SHARDS_DIR,
    ClipTable,
    DatasetIndex,
    ShardInfo,
    load_index,
    write_index,
)
from avsiam.data.sampler import mix_seed
from avsiam.data.shards import MEDIA_MEMBERS, ShardError, parse_sample, write_shard
from avsiam.data.video import NUM_FRAMES, load_frame, resize_and_crop
from avsiam.storage import s3
from avsiam.storage.digest import data_digest
from avsiam.storage.store import MissingFileError, Store, open_store

log = logging.getLogger(__name__)

# Bump when the staged bytes of a clip change (decoders, frame size, JPEG quality): every
# shard's key changes with it, and shards of another format are never copied from, so the
# next staging decodes everything again. 2: audio cut to STAGED_AUDIO_SAMPLES.
STAGING_FORMAT = 2
DEFAULT_CLIPS_PER_SHARD = 1000  # ~0.5 GB at AudioSet's 0.5-0.6 MB per staged clip
DEFAULT_SILENCE_THRESHOLD_DBFS = -60.0
ASSIGNMENT_NAME = "assignment.parquet"
RECORD_FORMAT = "avsiam-shard-record"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
_STAT_THREADS = 32  # stat() calls in flight while planning: metadata latency dominates on NFS


class StagingError(RuntimeError):
    """The stage cannot produce a usable dataset (e.g. too many bad clips)."""


class StagingRequest(BaseModel):
    """What to stage and how: the one definition the CLI, the flows and the library share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[str]  # label files (local paths here; the flow and the CLI fetch s3:// ones first)
    out: str  # the dataset folder or s3:// prefix
    videos: str | None = None  # the clips' folder or s3:// prefix (csv label files name clips in it)
    classes_csv: str | None = None  # class_labels_indices.csv (AudioSet, CAV-MAE)
    split: Literal["train", "val", "test"] | None = None  # for every clip; default: from the csv or the file name
    val_fraction: float = Field(default=0.1, ge=0, lt=1)  # of train clips, held out as "val" for model selection
    max_bad_fraction: float = Field(default=0.2, ge=0, le=1)  # fail when more clips than this are bad
    seed: int = 0
    clips_per_shard: int = Field(default=DEFAULT_CLIPS_PER_SHARD, ge=1)
    # A clip whose staged audio never rises above this peak level is silent: a dead microphone,
    # a muted upload, or stereo channels that cancel when mixed to mono. Training on it would
    # feed a constant spectrogram. "quarantine" drops it; "warn" stages it and lists it in
    # quarantine.csv as staged with a warning.
    silence_threshold_dbfs: float = Field(default=DEFAULT_SILENCE_THRESHOLD_DBFS, le=0, allow_inf_nan=False)
    silent_audio: Literal["quarantine", "warn"] = "quarantine"

    @field_validator("labels", mode="before")
    @classmethod
    def _paths_as_text(cls, value: Any) -> Any:
        return [os.fspath(v) for v in value] if isinstance(value, (list, tuple)) else value

    @field_validator("out", "videos", "classes_csv", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value


@dataclass(frozen=True, slots=True)
class PlannedClip:
    """A clip to stage: its id, split, labels, where its media come from and their identity."""

    id: str
    split: str
    labels: tuple[str, ...]
    video: str | None = None  # an mp4 (local path or s3:// URI) holding both audio and video
    wav: str | None = None  # CAV-MAE: an extracted audio file ...
    frames: tuple[str, ...] = ()  # ... and its extracted frames
    identity: str | None = None  # size + mtime, or ETag + size; None: the source is missing

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.video,) if self.video else (self.wav, *self.frames)

    @property
    def source_name(self) -> str:
        """The source's file name: recorded in the sample, independent of where the raw data lives."""
        return PurePosixPath(self.sources[0]).name


@dataclass(frozen=True)
class AudioScreen:
    """The check every staged clip's audio passes: what training reads (the staged window, as
    16-bit PCM) must peak above ``silence_threshold_dbfs``."""

    silence_threshold_dbfs: float = DEFAULT_SILENCE_THRESHOLD_DBFS
    silent_audio: Literal["quarantine", "warn"] = "quarantine"

    def problem(self, wav: bytes, where: str) -> str | None:
        """Why the staged wav fails the screen, or None."""
        peak = peak_dbfs(decode_wav(wav, where))
        if peak > self.silence_threshold_dbfs:
            return None
        return (f"silent audio (peak {peak:.1f} dBFS of the 16 kHz mono mix, at or below "
                f"silence_threshold_dbfs {self.silence_threshold_dbfs:g}; stereo channels that cancel are silent too)")


@dataclass(frozen=True)
class ShardSpec:
    """One shard to build: everything its task needs, and nothing the task must look up."""

    out: str  # the dataset folder or s3:// prefix
    slot: str  # e.g. "train-000003": the clips' stable home
    clips: tuple[PlannedClip, ...]
    previous: str | None = None  # the slot's shard in the previous index (copy source)
    screen: AudioScreen = AudioScreen()

    @cached_property
    def key(self) -> str:
        clips = [[c.id, c.split, list(c.labels), c.identity] for c in self.clips]
        doc = {"format": STAGING_FORMAT, "screen": [self.screen.silence_threshold_dbfs, self.screen.silent_audio],
               "clips": clips}
        return data_digest(json.dumps(doc))

    @property
    def name(self) -> str:
        return f"{self.slot}-{self.key[:12]}"

    @property
    def split(self) -> str:
        return self.slot.rsplit("-", 1)[0]


@dataclass(frozen=True)
class ShardResult:
    """What a shard task returns; also its record, written beside the shard once it is complete."""

    name: str
    key: str
    split: str
    samples: tuple[tuple[str, int, int, str], ...]  # (clip id, offset, size, source identity)
    bytes: int
    sha256: str
    quarantined: tuple[tuple[str, str, str], ...]  # (clip id, source, reason)
    warnings: tuple[tuple[str, str, str], ...] = ()  # staged clips with a problem: (clip id, source, reason)
    staging_format: int = STAGING_FORMAT
    reused: bool = False
    decoded: int = 0
    copied: int = 0
    fetched_objects: int = 0
    fetched_bytes: int = 0
    cpu_seconds: float = 0.0  # of the task's process while it built the shard

    def record(self) -> bytes:
        doc = {"format": RECORD_FORMAT, "staging_format": self.staging_format, "name": self.name, "key": self.key,
               "split": self.split, "bytes": self.bytes, "sha256": self.sha256, "samples": self.samples,
               "quarantined": self.quarantined, "warnings": self.warnings}
        return json.dumps(doc).encode()

    @classmethod
    def from_record(cls, data: bytes) -> ShardResult:
        doc = json.loads(data)
        if doc.get("format") != RECORD_FORMAT:
            raise ValueError("not a shard record")
        return cls(doc["name"], doc["key"], doc["split"], tuple(map(tuple, doc["samples"])), int(doc["bytes"]),
                   doc["sha256"], tuple(map(tuple, doc["quarantined"])), tuple(map(tuple, doc.get("warnings", ()))),
                   int(doc.get("staging_format", 1)), reused=True)


@dataclass
class StagingPlan:
    request: StagingRequest
    store: Store
    classes: ClassIndex
    multi_label: bool
    shards: list[ShardSpec]
    previous: DatasetIndex | None
    source: str

    @property
    def num_clips(self) -> int:
        return sum(len(s.clips) for s in self.shards)


@dataclass
class StagingResult:
    index: DatasetIndex
    shards_built: int
    shards_reused: int
    decoded: int  # clips read from their source and decoded
    copied: int  # clips copied unchanged from a previous shard
    quarantined: list[tuple[str, str, str, str]] = field(default_factory=list)  # (clip id, shard slot, source, reason)
    warnings: list[tuple[str, str, str, str]] = field(default_factory=list)  # staged with a warning, same fields
    fetched_objects: int = 0  # source objects read from S3
    fetched_bytes: int = 0
    cpu_seconds: float = 0.0  # summed over the shard tasks
    example_video: str | None = None  # the video of one staged clip (a test clip if any): a model's input example

    @property
    def num_clips(self) -> int:
        return len(self.index.clips)


# -- planning ---------------------------------------------------------------------------------


def infer_split(label_file: Path) -> str:
    stem = label_file.stem.lower()
    if "eval" in stem or "test" in stem:
        return "test"
    if "val" in stem:
        return "val"
    return "train"


def _join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or an s3:// prefix (strings: millions of clips)."""
    return f"{folder.rstrip('/')}/{name}"


def plan_clips(
    videos: str | Path | None,
    label_files: Sequence[Path],
    classes_csv: Path | None = None,
    split: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[ClassIndex, bool, list[PlannedClip]]:
    """Read every label file and return (classes, multi_label, clips) without touching a clip.

    ``videos``: the folder or ``s3://`` prefix of the clips the csv label files name.
    """
    if not label_files:
        raise FormatError("no label file given (--labels)")
    formats = {sniff_label_format(f) for f in label_files}
    if len(formats) > 1:
        raise FormatError(f"label files mix formats ({', '.join(sorted(formats))}); stage them separately")
    fmt = formats.pop()
    if fmt in ("vggsound", "audioset") and videos is None:
        raise FormatError(f"--videos is required for a {fmt} label file")
    videos = None if videos is None else str(videos)
    if videos is not None and not videos.startswith("s3://") and not Path(videos).is_dir():
        raise FormatError(f"--videos {videos}: not a directory")
    classes = read_class_labels(classes_csv) if classes_csv else None
    planned: list[PlannedClip] = []
    if fmt == "vggsound":
        segments = [(f, s) for f in label_files for s in read_vggsound_csv(f)]
        if classes is None:
            # VGGSound's class list is its sorted label names; the name is the label id.
            names = tuple(sorted({s.labels[0] for _, s in segments}))
            classes = ClassIndex(names, names)
        by_name = {n: m for m, n in zip(classes.mids, classes.names)}
        lookup = classes.index_of
        for f, s in segments:
            label = s.labels[0] if s.labels[0] in lookup else by_name.get(s.labels[0], s.labels[0])
            if label not in lookup:
                classes.indices([label], f"{f}: line {s.line}")
            name = s.vggsound_filename()
            planned.append(PlannedClip(name[:-4], split or s.split or "train", (label,), video=_join(videos, name)))
        multi_label = False
    elif fmt == "audioset":
        if classes is None:
            raise FormatError("--classes class_labels_indices.csv is required with an AudioSet segments csv")
        lookup = classes.index_of
        for f in label_files:
            file_split = split or infer_split(f)
            for s in read_audioset_segments(f):
                if any(label not in lookup for label in s.labels):
                    classes.indices(s.labels, f"{f}: line {s.line}")
                name = s.audioset_filename()
                planned.append(PlannedClip(name[:-4], file_split, s.labels, video=_join(videos, name)))
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
        return replace(clip, split="val")
    return clip


def with_identities(planned: Sequence[PlannedClip], videos: str | Path | None) -> list[PlannedClip]:
    """The clips with their source identity, from metadata only: one listing of an S3 prefix,
    or a stat() per local file (from parallel threads: metadata latency dominates on NFS)."""
    if videos is not None and str(videos).startswith("s3://"):
        listing = {PurePosixPath(o.key).name: o for o in s3.list_objects(str(videos))}

        def identity(clip: PlannedClip) -> str | None:
            obj = listing.get(clip.source_name)
            return None if obj is None else f"etag:{obj.etag}:{obj.size}"

        return [replace(c, identity=identity(c)) for c in planned]
    # Chunks, not one future per clip: submitting millions of futures costs more than the stats.
    chunk = max(1, -(-len(planned) // _STAT_THREADS))
    with ThreadPoolExecutor(_STAT_THREADS) as pool:
        parts = pool.map(_stat_identities, [planned[i : i + chunk] for i in range(0, len(planned), chunk)])
        return [clip for part in parts for clip in part]


def _stat_identities(clips: Sequence[PlannedClip]) -> list[PlannedClip]:
    out = []
    for clip in clips:
        parts: list[str] | None = []
        for source in clip.sources:
            try:
                st = os.stat(source)
            except OSError:
                parts = None
                break
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        out.append(replace(clip, identity=None if parts is None else "stat:" + ",".join(parts)))
    return out


def assign_slots(planned: Sequence[PlannedClip], previous: dict[str, str], clips_per_shard: int) -> dict[str, list[PlannedClip]]:
    """Clips by slot: a clip keeps its previous slot (of its split); new clips fill the split's
    last slot up to ``clips_per_shard`` and then open new slots, in label-file order."""
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be at least 1, got {clips_per_shard}")
    slots: dict[str, list[PlannedClip]] = {}
    new: dict[str, list[PlannedClip]] = {s: [] for s in SPLITS}
    for clip in planned:
        slot = previous.get(clip.id)
        if slot is not None and slot.rsplit("-", 1)[0] == clip.split:
            slots.setdefault(slot, []).append(clip)
        else:
            new[clip.split].append(clip)
    used = {s: [int(slot.rsplit("-", 1)[1]) for slot in previous.values() if slot.rsplit("-", 1)[0] == s] for s in SPLITS}
    for split, clips in new.items():
        if not clips:
            continue
        numbers = used[split]
        last = f"{split}-{max(numbers):06d}" if numbers else None
        if last is not None and last in slots and len(slots[last]) < clips_per_shard:
            room = clips_per_shard - len(slots[last])
            slots[last].extend(clips[:room])
            clips = clips[room:]
        number = max(numbers) + 1 if numbers else 0
        for start in range(0, len(clips), clips_per_shard):
            slots[f"{split}-{number:06d}"] = list(clips[start : start + clips_per_shard])
            number += 1
    return dict(sorted(slots.items()))


def plan_staging(request: StagingRequest, description: str | None = None) -> StagingPlan:
    """Plan ``request`` (see the module docstring); decodes nothing. ``description`` names the
    source in the index (default: the label files)."""
    store = open_store(request.out)
    classes, multi_label, planned = plan_clips(
        request.videos, [Path(f) for f in request.labels], Path(request.classes_csv) if request.classes_csv else None,
        request.split, request.val_fraction, request.seed,
    )
    planned = with_identities(planned, request.videos)
    previous = _previous_index(store)
    slots = assign_slots(planned, _read_assignment(store), request.clips_per_shard)
    _write_assignment(store, slots)
    previous_names = {s.slot: s.name.removesuffix(".tar") for s in previous.shards} if previous else {}
    screen = AudioScreen(request.silence_threshold_dbfs, request.silent_audio)
    specs = [ShardSpec(store.location, slot, tuple(clips), previous_names.get(slot), screen) for slot, clips in slots.items()]
    source = description or ", ".join(str(Path(f).resolve()) for f in request.labels)
    return StagingPlan(request, store, classes, multi_label, specs, previous, source)


def _previous_index(store: Store) -> DatasetIndex | None:
    if not store.exists(INDEX_NAME):
        return None
    try:
        return load_index(store.location)
    except FormatError as exc:  # an unusable old index only costs decoding again
        log.warning("%s: the previous index cannot be used (%s); every clip is decoded again", store.location, exc)
        return None


def _read_assignment(store: Store) -> dict[str, str]:
    """``{clip id: slot}`` of the last plan of this folder, finished or not."""
    try:
        table = pq.read_table(io.BytesIO(store.read_bytes(ASSIGNMENT_NAME)))
    except MissingFileError:
        return {}
    return dict(zip(table.column("id").to_pylist(), table.column("slot").to_pylist()))


def _write_assignment(store: Store, slots: dict[str, list[PlannedClip]]) -> None:
    ids = [c.id for clips in slots.values() for c in clips]
    names = [slot for slot, clips in slots.items() for _ in clips]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "slot": pa.array(names, pa.string())}), buffer)
    store.write_bytes(ASSIGNMENT_NAME, buffer.getvalue())


# -- one shard --------------------------------------------------------------------------------


def stage_shard(spec: ShardSpec) -> ShardResult:
    """Build (or reuse) the shard of ``spec``: the body of one staging task."""
    store = open_store(spec.out)
    done = _finished_record(store, spec.name, spec.key)
    if done is not None:
        return done
    cpu_start = time.process_time()
    previous = _finished_record(store, spec.previous, None) if spec.previous and spec.previous != spec.name else None
    if previous is not None and previous.staging_format != STAGING_FORMAT:
        previous = None  # staged differently: its samples are not what this format stages
    counts = {"decoded": 0, "copied": 0, "fetched_objects": 0, "fetched_bytes": 0}
    quarantined: list[tuple[str, str, str]] = []
    warnings: list[tuple[str, str, str]] = []
    kept: list[PlannedClip] = []
    with tempfile.TemporaryDirectory(prefix=f"avsiam-{spec.slot}-") as tmp, _CopySource(store, previous, Path(tmp)) as copies:
        work = Path(tmp)

        def samples() -> Iterator[tuple[dict[str, bytes], dict[str, Any]]]:
            for clip in spec.clips:
                media = copies.media(clip)
                if media is not None:
                    counts["copied"] += 1
                else:
                    try:
                        media = _decode_clip(clip, work, counts)
                    except DecodeError as exc:
                        quarantined.append((clip.id, clip.sources[0], str(exc)))
                        continue
                    counts["decoded"] += 1
                if problem := spec.screen.problem(media["wav"], f"clip {clip.id}"):
                    if spec.screen.silent_audio == "quarantine":
                        quarantined.append((clip.id, clip.sources[0], problem))
                        continue
                    warnings.append((clip.id, clip.sources[0], problem))
                kept.append(clip)
                yield media, {"id": clip.id, "split": clip.split, "labels": list(clip.labels),
                              "source": clip.source_name, "identity": clip.identity}

        tar_path = work / f"{spec.name}.tar"
        written = write_shard(tar_path, samples())
        size, sha256 = (written.bytes, written.sha256) if written.ranges else (0, "")
        result = ShardResult(
            spec.name, spec.key, spec.split,
            tuple((c.id, offset, length, c.identity) for c, (offset, length) in zip(kept, written.ranges)),
            size, sha256, tuple(quarantined), tuple(warnings), reused=False, **counts,
            cpu_seconds=time.process_time() - cpu_start,
        )
        if written.ranges:
            store.put_file(f"{SHARDS_DIR}/{spec.name}.tar", tar_path)
    # The record goes last: its presence means the shard is complete.
    store.write_bytes(f"{SHARDS_DIR}/{spec.name}.json", result.record())
    log.info("%s: %d clips (%d decoded, %d copied), %d quarantined, %d staged with a warning", spec.name,
             len(result.samples), result.decoded, result.copied, len(quarantined), len(warnings))
    return result


def _finished_record(store: Store, name: str | None, key: str | None) -> ShardResult | None:
    """The record of shard ``name`` if it is complete (and has ``key``, when given)."""
    if name is None:
        return None
    try:
        result = ShardResult.from_record(store.read_bytes(f"{SHARDS_DIR}/{name}.json"))
    except (MissingFileError, ValueError, KeyError):
        return None
    if key is not None and result.key != key:
        return None
    if result.samples and store.size(f"{SHARDS_DIR}/{name}.tar") != result.bytes:
        return None
    return result


class _CopySource:
    """Samples of the slot's previous shard whose source did not change, copied without decoding."""

    def __init__(self, store: Store, previous: ShardResult | None, work: Path) -> None:
        self.store, self.previous, self.work = store, previous, work
        self.ranges = {clip_id: (offset, size, identity) for clip_id, offset, size, identity in previous.samples} if previous else {}
        self._fd: int | None = None

    def __enter__(self) -> _CopySource:
        return self

    def __exit__(self, *_exc) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def media(self, clip: PlannedClip) -> dict[str, bytes] | None:
        found = self.ranges.get(clip.id)
        if found is None or found[2] != clip.identity:
            return None
        offset, size, _ = found
        try:
            sample = parse_sample(os.pread(self._open(), size, offset), self.previous.name, clip.id)
            return {name: sample.media(name) for name in MEDIA_MEMBERS}
        except (ShardError, MissingFileError) as exc:  # a damaged or vanished previous shard only costs decoding again
            log.warning("%s; decoding clip %s again", exc, clip.id)
            return None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.store.readable_copy(f"{SHARDS_DIR}/{self.previous.name}.tar", self.work), os.O_RDONLY)
        return self._fd


def _decode_clip(clip: PlannedClip, work: Path, counts: dict[str, int]) -> dict[str, bytes]:
    """The staged media of one clip, read from its own source; raises :class:`DecodeError`."""
    if clip.identity is None:
        raise DecodeError(clip.sources[0], "missing file")
    if clip.video:
        path = _local_source(clip.video, work, counts)
        try:
            return staged_members(path)
        finally:
            if path.parent == work:
                path.unlink(missing_ok=True)
    return media_members(load_waveform(clip.wav), [resize_and_crop(load_frame(p)) for p in clip.frames], clip.sources[0])


def _local_source(location: str, work: Path, counts: dict[str, int]) -> Path:
    if not location.startswith("s3://"):
        return Path(location)
    path = work / PurePosixPath(location).name
    try:
        s3.download_object(location, path)
    except s3.NoSuchObjectError:
        raise DecodeError(location, "missing file") from None
    counts["fetched_objects"] += 1
    counts["fetched_bytes"] += path.stat().st_size
    return path


# -- the dataset --------------------------------------------------------------------------------


def finalize_staging(plan: StagingPlan, results: Iterable[ShardResult]) -> StagingResult:
    """Write the index of a staging whose shard tasks all finished (see the module docstring)."""
    by_name = {r.name: r for r in results}
    specs = {s.name: s for s in plan.shards}
    if set(by_name) != set(specs):
        missing = sorted(set(specs) - set(by_name))
        raise StagingError(f"{plan.store.location}: {len(missing)} shards have no result (e.g. {missing[:3]})")
    store = plan.store
    quarantined = sorted((clip_id, specs[name].slot, source, reason)
                         for name, r in by_name.items() for clip_id, source, reason in r.quarantined)
    warnings = sorted((clip_id, specs[name].slot, source, reason)
                      for name, r in by_name.items() for clip_id, source, reason in r.warnings)
    _write_quarantine(store, quarantined, warnings)
    for clip_id, slot, source, reason in warnings[:5]:
        log.warning("staged %s (%s, shard %s) with a warning: %s", clip_id, source, slot, reason)
    if len(warnings) > 5:
        log.warning("... and %d more clips staged with a warning; see %s", len(warnings) - 5, store.uri(QUARANTINE_NAME))
    total = plan.num_clips
    bad_fraction = len(quarantined) / total if total else 1.0
    max_bad_fraction = plan.request.max_bad_fraction
    if bad_fraction > max_bad_fraction:
        raise StagingError(
            f"{len(quarantined)} of {total} clips are bad ({bad_fraction:.1%} > max_bad_fraction "
            f"{max_bad_fraction:.1%}); see {store.uri(QUARANTINE_NAME)}"
        )
    built = [by_name[s.name] for s in plan.shards if by_name[s.name].samples]
    if not built:
        raise StagingError(f"no clip could be staged; see {store.uri(QUARANTINE_NAME)}")
    shards = tuple(ShardInfo(f"{r.name}.tar", r.split, len(r.samples), r.bytes, r.sha256) for r in built)
    table = _clip_table(plan, built, specs)
    store.write_bytes(CLASSES_NAME, class_labels_csv(plan.classes).encode())
    extra = {"source": plan.source, "clips_per_shard": plan.request.clips_per_shard, "quarantined": len(quarantined),
             "staged_with_warning": len(warnings), "staging_format": STAGING_FORMAT,
             "audio_samples": STAGED_AUDIO_SAMPLES}
    index = write_index(store, plan.classes, plan.multi_label, shards, table, extra)
    _prune(store, index, plan.previous, set(by_name))
    results_list = list(by_name.values())
    return StagingResult(
        index=index,
        shards_built=sum(not r.reused for r in results_list),
        shards_reused=sum(r.reused for r in results_list),
        decoded=sum(r.decoded for r in results_list),
        copied=sum(r.copied for r in results_list),
        quarantined=quarantined,
        warnings=warnings,
        fetched_objects=sum(r.fetched_objects for r in results_list),
        fetched_bytes=sum(r.fetched_bytes for r in results_list),
        cpu_seconds=sum(r.cpu_seconds for r in results_list),
        example_video=_example_video(built, specs),
    )


def _example_video(built: list[ShardResult], specs: dict[str, ShardSpec]) -> str | None:
    """The source video (path or s3:// URI) of the first staged test clip, else of the first
    staged clip; None when the clips were staged from extracted wavs and frames."""
    for result in sorted(built, key=lambda r: r.split != "test"):
        planned = {c.id: c for c in specs[result.name].clips}
        for clip_id, *_ in result.samples:
            if planned[clip_id].video:
                return planned[clip_id].video
    return None


def _clip_table(plan: StagingPlan, built: list[ShardResult], specs: dict[str, ShardSpec]) -> ClipTable:
    lookup = plan.classes.index_of
    ids: list[str] = []
    split, shard, offset, size, label_counts, label_values = [], [], [], [], [], []
    for number, result in enumerate(built):
        planned = {c.id: c for c in specs[result.name].clips}
        for clip_id, start, length, _identity in result.samples:
            clip = planned[clip_id]
            ids.append(clip_id)
            split.append(SPLITS.index(clip.split))
            shard.append(number)
            offset.append(start)
            size.append(length)
            label_counts.append(len(clip.labels))
            label_values.extend(lookup[label] for label in clip.labels)
    return ClipTable(
        ids=pa.array(ids, pa.string()),
        split=np.asarray(split, np.int8),
        shard=np.asarray(shard, np.int32),
        offset=np.asarray(offset, np.int64),
        size=np.asarray(size, np.int32),
        label_offsets=np.concatenate([[0], np.cumsum(label_counts)]).astype(np.int32),
        label_values=np.asarray(label_values, np.int32),
    )


def _prune(store: Store, index: DatasetIndex, previous: DatasetIndex | None, current: set[str]) -> None:
    """Remove shard files and clip tables that neither this nor the previous index uses."""
    keep_shards = current | {s.name.removesuffix(".tar") for s in index.shards}
    if previous is not None:
        keep_shards |= {s.name.removesuffix(".tar") for s in previous.shards}
    stale = [rel for rel in store.sizes(SHARDS_DIR)
             if PurePosixPath(rel).name.split(".", 1)[0] not in keep_shards]
    keep_tables = {f"clips-{index.dataset_digest[:16]}.arrow"}
    if previous is not None:
        keep_tables.add(f"clips-{previous.dataset_digest[:16]}.arrow")
    stale += [rel for rel in store.sizes("") if re.fullmatch(r"clips-[0-9a-f]{16}\.arrow", rel) and rel not in keep_tables]
    if stale:
        log.info("%s: removing %d files no index uses", store.location, len(stale))
        store.delete(stale)


def _write_quarantine(store: Store, quarantined: Sequence[tuple[str, str, str, str]],
                      warnings: Sequence[tuple[str, str, str, str]]) -> None:
    """Every clip left out (``action`` quarantined) or staged despite a problem (``action``
    staged with warning), with its shard slot, source and reason."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["clip_id", "shard", "source", "reason", "action"])
    writer.writerows([*row, "quarantined"] for row in quarantined)
    writer.writerows([*row, "staged with warning"] for row in warnings)
    store.write_bytes(QUARANTINE_NAME, buffer.getvalue().encode())


def stage_dataset(
    request: StagingRequest,
    map_shards: Callable[[Callable[[ShardSpec], ShardResult], Sequence[ShardSpec]], Iterable[ShardResult]] = map,
) -> StagingResult:
    """Plan, build every shard with ``map_shards`` (default: one after another, in this
    process), and finalize. ``flows.staging`` maps the shards over a Ray cluster instead."""
    plan = plan_staging(request)
    return finalize_staging(plan, list(map_shards(stage_shard, plan.shards)))
