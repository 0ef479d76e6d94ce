"""The staged-dataset manifest: what staging writes and what training reads.

A staged dataset is a folder with ``manifest.json``, ``class_labels_indices.csv``, one 16 kHz
mono wav per clip and its 10 frames. The manifest lists, per clip, its id, split, the audio
file, the frame files, the labels (class ids as in the class csv) and a content digest of the
staged files; the **dataset digest** hashes the class list and every clip's id, split, labels
and digest, so it changes when any clip or label changes (stage caching keys on it).
Paths in the manifest are relative to its folder, so a staged dataset can be moved or synced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from avsiam.data.formats import SPLITS, ClassIndex, FormatError

MANIFEST_FORMAT = "avsiam-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
CLASSES_NAME = "class_labels_indices.csv"


@dataclass(frozen=True)
class ClipRecord:
    id: str
    split: str
    audio: str  # relative path of the 16 kHz mono wav
    frames: tuple[str, ...]  # relative paths of the frames, in time order
    labels: tuple[str, ...]  # class ids (mids)
    digest: str  # sha256 of the staged audio and frame files
    source_digest: str = ""  # sha256 of the source file(s), for incremental re-staging


@dataclass
class Manifest:
    root: Path
    classes: ClassIndex
    multi_label: bool
    clips: list[ClipRecord]
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dataset_digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"classes": list(self.classes.mids), "multi_label": self.multi_label}).encode())
        for clip in sorted(self.clips, key=lambda c: c.id):
            h.update(json.dumps([clip.id, clip.split, list(clip.labels), clip.digest]).encode())
        return h.hexdigest()

    def split(self, name: str) -> list[ClipRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return [c for c in self.clips if c.split == name]

    def split_counts(self) -> dict[str, int]:
        return {s: sum(c.split == s for c in self.clips) for s in SPLITS}

    def label_indices(self, clip: ClipRecord) -> list[int]:
        return self.classes.indices(clip.labels, f"{self.root / MANIFEST_NAME}: clip {clip.id!r}")

    def path(self, relative: str) -> Path:
        return self.root / relative

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "dataset_digest": self.dataset_digest,
            "multi_label": self.multi_label,
            "num_classes": self.num_classes,
            "classes_csv": CLASSES_NAME,
            "classes": [{"index": i, "mid": m, "name": n} for i, (m, n) in enumerate(zip(self.classes.mids, self.classes.names))],
            "source": self.source,
            "splits": self.split_counts(),
            "extra": self.extra,
            "clips": [{**asdict(c), "frames": list(c.frames), "labels": list(c.labels)} for c in self.clips],
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write atomically (a reader never sees half a manifest)."""
        path = Path(path) if path else self.root / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def validate(self, check_files: bool = True) -> None:
        """Every problem is an error naming the manifest, the clip and what is wrong."""
        where = self.root / MANIFEST_NAME
        seen: set[str] = set()
        for clip in self.clips:
            entry = f"{where}: clip {clip.id!r}"
            if clip.id in seen:
                raise FormatError(f"{entry}: duplicate id")
            seen.add(clip.id)
            if clip.split not in SPLITS:
                raise FormatError(f"{entry}: split {clip.split!r} is not one of {', '.join(SPLITS)}")
            if not clip.labels:
                raise FormatError(f"{entry}: empty label list")
            if not self.multi_label and len(clip.labels) != 1:
                raise FormatError(f"{entry}: a single-label dataset needs exactly one label, got {len(clip.labels)}")
            self.classes.indices(clip.labels, entry)
            if check_files:
                for rel in [clip.audio, *clip.frames]:
                    if not (self.root / rel).is_file():
                        raise FormatError(f"{entry}: missing file {self.root / rel}")


def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Load and validate a manifest (``path`` is the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{path}: not an avsiam manifest (expected \"format\": \"{MANIFEST_FORMAT}\"); stage the dataset with `avsiam stage`")
    if doc.get("version") != MANIFEST_VERSION:
        raise FormatError(f"{path}: manifest version {doc.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
    try:
        classes = ClassIndex(tuple(c["mid"] for c in doc["classes"]), tuple(c["name"] for c in doc["classes"]))
        clips = [
            ClipRecord(
                id=c["id"], split=c["split"], audio=c["audio"], frames=tuple(c["frames"]),
                labels=tuple(c["labels"]), digest=c["digest"], source_digest=c.get("source_digest", ""),
            )
            for c in doc["clips"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: malformed manifest: {exc!r}") from exc
    manifest = Manifest(path.parent, classes, bool(doc["multi_label"]), clips, doc.get("source", ""), doc.get("extra", {}))
    manifest.validate(check_files=check_files)
    recorded = doc.get("dataset_digest")
    if recorded and recorded != manifest.dataset_digest:
        raise FormatError(f"{path}: dataset_digest does not match the clips it lists (edited by hand?); re-stage the dataset")
    return manifest


def file_digest(paths: Iterable[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the bytes of ``paths`` in order (content only; each length-prefixed)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()
