"""Dataset sources for staging: a local folder, or an ``s3://bucket/prefix``, used in place.

A source holds the label files at the paths given (relative to it), the optional
``class_labels_indices.csv`` and, for csv label files, the clips under ``videos/``. The clips
are named as the official layouts name them: ``{ytid}_{start:06d}.mp4`` for VGGSound and
``{ytid}_{start:.3f}.mp4`` for AudioSet segments.

Only the label files (small) are fetched from S3 here; the clips stay where they are, and each
staging shard task reads its own clips from the prefix (:mod:`avsiam.data.staging`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from avsiam.data.formats import FormatError, sniff_label_format
from avsiam.storage.s3 import NoSuchObjectError, download_object, fingerprint

VIDEOS = "videos"


class SourceError(FormatError):
    """The source lacks what staging needs. The message names the folder or URI and the file."""


@dataclass(frozen=True)
class SourceLayout:
    videos: str | None  # the clips' folder or s3:// prefix; None for CAV-MAE datafiles (they name their own files)
    label_files: list[Path]  # local files (copies, for an S3 source)
    classes_csv: Path | None


def resolve_source(source: str, workdir: Path, *, label_files: Sequence[str], classes_csv: str | None) -> SourceLayout:
    """What staging needs of ``source``: a folder is checked and used in place (``workdir`` is
    not touched); for an S3 prefix the label files are fetched into ``workdir`` and the clips
    stay in S3. A missing label file is an error; a clip the labels name but the source lacks
    is left for staging to quarantine."""
    if not label_files:
        raise SourceError(f"{source}: no label file given")
    if source.startswith("s3://"):
        return _s3_source(source.rstrip("/"), Path(workdir), label_files, classes_csv)
    local = _check_local_source(Path(source), label_files, classes_csv)
    return SourceLayout(str(local.videos_dir) if local.videos_dir else None, local.label_files, local.classes_csv)


def local_copy(location: str | Path, workdir: Path) -> Path:
    """A local file with the content of ``location``: the path itself, or an S3 object fetched into ``workdir``."""
    text = str(location)
    if not text.startswith("s3://"):
        return Path(text)
    path = Path(workdir) / PurePosixPath(text).name
    try:
        download_object(text, path)
    except NoSuchObjectError:
        raise SourceError(f"{text} does not exist") from None
    return path


def source_fingerprint(source: str, label_files: Sequence[str], classes_csv: str | None) -> str:
    """A digest that changes when the source's label files or clips change.

    For a folder it covers the relative path, size and mtime_ns of the label files, the
    classes csv and every file under ``videos/``; nothing is read, only stat'ed. For S3 it
    covers the listing (keys, sizes, ETags) of the same files. A CAV-MAE datafile's wavs and
    frames live elsewhere and are not covered.
    """
    if source.startswith("s3://"):
        named = {str(PurePosixPath(name)) for name in [*label_files, *([classes_csv] if classes_csv else [])]}
        return fingerprint(source, include=lambda rel: rel in named or rel.startswith(f"{VIDEOS}/"))
    local = _check_local_source(Path(source), label_files, classes_csv)
    clips = sorted(p for p in local.videos_dir.rglob("*") if p.is_file()) if local.videos_dir else []
    digest = hashlib.sha256()
    for path in [*local.label_files, *([local.classes_csv] if local.classes_csv else []), *clips]:
        stat = path.stat()
        digest.update(json.dumps([path.relative_to(local.root).as_posix(), stat.st_size, stat.st_mtime_ns]).encode() + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class _LocalSource:
    root: Path
    videos_dir: Path | None
    label_files: list[Path]
    classes_csv: Path | None


def _check_local_source(root: Path, label_files: Sequence[str], classes_csv: str | None) -> _LocalSource:
    if not root.is_dir():
        raise SourceError(f"dataset folder {root} does not exist")
    root = root.resolve()
    labels = [root / name for name in label_files]
    classes = root / classes_csv if classes_csv else None
    for path in [*labels, *([classes] if classes else [])]:
        if not path.is_file():
            raise SourceError(f"dataset folder {root} has no {path.relative_to(root)}")
    videos = root / VIDEOS if _names_clips(labels) else None
    if videos and not videos.is_dir():
        raise SourceError(f"dataset folder {root}: csv label files name clips, which belong in {videos} (missing)")
    return _LocalSource(root, videos, labels, classes)


def _s3_source(uri: str, workdir: Path, label_files: Sequence[str], classes_csv: str | None) -> SourceLayout:
    workdir.mkdir(parents=True, exist_ok=True)
    labels = [_fetch_named_file(uri, name, workdir, "label file") for name in label_files]
    classes = _fetch_named_file(uri, classes_csv, workdir, "classes csv") if classes_csv else None
    if not _names_clips(labels):
        raise SourceError(f"{uri}: CAV-MAE datafiles name local wav and frame paths and cannot be read from S3; "
                          "use VGGSound or AudioSet csv label files, or a local folder")
    return SourceLayout(f"{uri}/{VIDEOS}", labels, classes)


def _fetch_named_file(uri: str, name: str, workdir: Path, what: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise SourceError(f"{what} {name!r}: must be a path relative to {uri}")
    path = workdir.joinpath(*rel.parts)
    try:
        download_object(f"{uri}/{rel}", path)
    except NoSuchObjectError:
        raise SourceError(f"{what} {uri}/{rel} does not exist") from None
    return path.resolve()


def _names_clips(label_files: Sequence[Path]) -> bool:
    """True for csv label files (VGGSound, AudioSet), which name clips under ``videos/``."""
    return any(sniff_label_format(path) != "cavmae" for path in label_files)
