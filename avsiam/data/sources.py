"""Dataset sources for staging: a local folder used in place, or an ``s3://bucket/prefix``
fetched into a work folder with only the clips its label files name.

A source holds the label files at the paths given (relative to it), the optional
``class_labels_indices.csv`` and, for csv label files, the clips under ``videos/``. The clips
are named as the official layouts name them: ``{ytid}_{start:06d}.mp4`` for VGGSound and
``{ytid}_{start:.3f}.mp4`` for AudioSet segments.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from avsiam.data.formats import sniff_label_format
from avsiam.storage.s3 import NoSuchObjectError, StorageError, download_object, download_tree, fingerprint

log = logging.getLogger(__name__)

VIDEOS = "videos"


class SourceError(ValueError):
    """The source lacks what staging needs. The message names the folder or URI and the file."""


@dataclass(frozen=True)
class LocalSource:
    root: Path
    videos_dir: Path | None  # None for CAV-MAE datafiles, which name their own wav and frame paths
    label_files: list[Path]
    classes_csv: Path | None


def materialize_source(
    source: str,
    workdir: Path,
    *,
    label_files: Sequence[str],
    classes_csv: str | None,
    workers: int = 8,
) -> LocalSource:
    """A local view of ``source`` for staging.

    A folder is checked and used in place, and ``workdir`` is not touched. An S3 prefix is
    downloaded into ``workdir``: the label files first, then only the clips they name, in
    parallel and resumable (see :mod:`avsiam.storage.s3`). A clip the labels name but the
    bucket lacks is left for staging to quarantine. A missing label file is an error.
    """
    if not label_files:
        raise SourceError(f"{source}: no label file given")
    if source.startswith("s3://"):
        return _fetch_s3_source(source.rstrip("/"), Path(workdir), label_files, classes_csv, workers)
    return _check_local_source(Path(source), label_files, classes_csv)


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


def _check_local_source(root: Path, label_files: Sequence[str], classes_csv: str | None) -> LocalSource:
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
    return LocalSource(root, videos, labels, classes)


def _fetch_s3_source(uri: str, workdir: Path, label_files: Sequence[str], classes_csv: str | None, workers: int) -> LocalSource:
    workdir.mkdir(parents=True, exist_ok=True)
    labels = [_fetch_named_file(uri, name, workdir, "label file") for name in label_files]
    classes = _fetch_named_file(uri, classes_csv, workdir, "classes csv") if classes_csv else None
    if not _names_clips(labels):
        raise SourceError(f"{uri}: CAV-MAE datafiles name local wav and frame paths and cannot be fetched from S3; "
                          "use VGGSound or AudioSet csv label files, or a local folder")
    # Imported here: staging loads torch and the decoders, which fingerprinting a source does not need.
    from avsiam.data.staging import plan_clips

    videos = workdir / VIDEOS
    videos.mkdir(exist_ok=True)
    # plan_clips reads and checks every label file, so a broken one fails before any clip moves.
    _, _, planned = plan_clips(videos, labels, classes)
    needed = {Path(clip.video).name for clip in planned}
    report = download_tree(f"{uri}/{VIDEOS}", videos, include=needed.__contains__, workers=workers)
    if report.failed:
        listed = "; ".join(f"{key}: {why}" for key, why in sorted(report.failed.items())[:5])
        raise StorageError(f"{len(report.failed)} clips failed to download from {uri}/{VIDEOS} (run again to resume): {listed}")
    absent = len(needed) - report.downloaded - report.skipped
    if absent:
        where = f"{uri}/{VIDEOS}"
        log.warning("%d of %d clips named by the labels are not under %s; staging quarantines them", absent, len(needed), where)
    return LocalSource(workdir.resolve(), videos.resolve(), labels, classes)


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
