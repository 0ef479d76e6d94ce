"""Readers for the label and datafile formats users actually download.

* ``class_labels_indices.csv`` (``index,mid,display_name``; AudioSet's 527 classes).
* The CAV-MAE datafile: ``{"data": [{"video_id", "wav", "video_path", "labels"}]}``.
* The official VGGSound csv: ``youtube_id,start_seconds,label,split`` (no header).
* The official AudioSet segments csv: ``# ...`` comment lines, then
  ``YTID, start_seconds, end_seconds, "mid1,mid2"``.

Every reader validates while it reads and raises :class:`FormatError` naming the file, the
entry (row number or id) and what is wrong, so a broken download fails before any decoding.
Files are read as UTF-8 with an optional byte-order mark (Excel writes one when it saves a csv
as "CSV UTF-8"), and a VGGSound csv may start with a header line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

CLASSES_HEADER = ["index", "mid", "display_name"]
SPLITS = ("train", "val", "test")


class FormatError(ValueError):
    """Malformed input: the message names the file, the entry and what is wrong."""


@dataclass(frozen=True)
class ClassIndex:
    """The label vocabulary: ``mids[i]`` is the label id of class ``i``."""

    mids: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.mids) != len(self.names):
            raise ValueError("mids and names differ in length")
        seen: set[str] = set()
        for mid in self.mids:
            if mid in seen:
                raise ValueError(f"duplicate class id {mid!r}")
            seen.add(mid)

    def __len__(self) -> int:
        return len(self.mids)

    @cached_property
    def index_of(self) -> dict[str, int]:
        return {mid: i for i, mid in enumerate(self.mids)}

    def indices(self, labels: Iterable[str], where: str) -> list[int]:
        """Class indices of ``labels``; an unknown label id is an error naming ``where``."""
        lookup = self.index_of
        out = []
        for label in labels:
            if label not in lookup:
                close = [m for m in self.mids if m.lower() == label.lower()]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise FormatError(f"{where}: unknown label id {label!r}{hint}; the class list has {len(self)} classes")
            out.append(lookup[label])
        return out


def read_class_labels(path: str | Path) -> ClassIndex:
    """Read ``class_labels_indices.csv``; indices must be 0..C-1 in order and mids unique."""
    path = Path(path)
    rows = _read_csv_rows(path)
    if not rows or [c.strip() for c in rows[0]] != CLASSES_HEADER:
        got = rows[0] if rows else "an empty file"
        raise FormatError(f"{path}: expected the header {','.join(CLASSES_HEADER)}, got {got}")
    mids, names, seen = [], [], {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 3:
            raise FormatError(f"{path}: line {line_no}: expected 3 fields (index,mid,display_name), got {len(row)}: {row}")
        index, mid, name = (field.strip() for field in row)
        if not index.isdigit() or int(index) != len(mids):
            raise FormatError(f"{path}: line {line_no}: index {index!r} should be {len(mids)} (indices are 0..C-1 in order)")
        if not mid:
            raise FormatError(f"{path}: line {line_no}: empty mid")
        if mid in seen:
            raise FormatError(f"{path}: line {line_no}: duplicate mid {mid!r} (first on line {seen[mid]})")
        seen[mid] = line_no
        mids.append(mid)
        names.append(name)
    if not mids:
        raise FormatError(f"{path}: no classes")
    return ClassIndex(tuple(mids), tuple(names))


def class_labels_csv(classes: ClassIndex) -> str:
    """The text of ``class_labels_indices.csv`` for ``classes`` (what :func:`read_class_labels` reads)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CLASSES_HEADER)
    for i, (mid, name) in enumerate(zip(classes.mids, classes.names)):
        writer.writerow([i, mid, name])
    return buf.getvalue()


@dataclass(frozen=True)
class DatafileEntry:
    """One clip of a CAV-MAE datafile."""

    video_id: str
    wav: str
    video_path: str  # the root folder holding frame_0 ... frame_9/<video_id>.jpg
    labels: tuple[str, ...]

    def frame_paths(self, num_frames: int = 10) -> list[Path]:
        return [Path(self.video_path) / f"frame_{i}" / f"{self.video_id}.jpg" for i in range(num_frames)]


def read_cavmae_datafile(path: str | Path, check_files: bool = False, num_frames: int = 10) -> list[DatafileEntry]:
    """Read a CAV-MAE datafile; with ``check_files`` every wav and frame must exist."""
    path = Path(path)
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise FormatError(f'{path}: expected an object {{"data": [...]}} (the CAV-MAE datafile format)')
    entries, first_seen = [], {}
    for i, item in enumerate(doc["data"]):
        where = f"{path}: data[{i}]"
        if not isinstance(item, dict):
            raise FormatError(f"{where}: expected an object, got {type(item).__name__}")
        missing = [k for k in ("video_id", "wav", "video_path", "labels") if k not in item]
        if missing:
            raise FormatError(f"{where}: missing field(s) {', '.join(missing)}")
        bad = [k for k in ("video_id", "wav", "video_path", "labels") if not isinstance(item[k], str)]
        if bad:
            raise FormatError(f"{where}: field(s) {', '.join(bad)} must be strings")
        video_id = item["video_id"].strip()
        where = f"{path}: data[{i}] (video_id {video_id!r})"
        if not video_id:
            raise FormatError(f"{path}: data[{i}]: empty video_id")
        if video_id in first_seen:
            raise FormatError(f"{where}: duplicate video_id (first at data[{first_seen[video_id]}])")
        first_seen[video_id] = i
        labels = split_label_list(item["labels"])
        if not labels:
            raise FormatError(f"{where}: empty label list")
        entry = DatafileEntry(video_id, item["wav"], item["video_path"], labels)
        if check_files:
            for file in [Path(entry.wav), *entry.frame_paths(num_frames)]:
                if not file.is_file():
                    raise FormatError(f"{where}: missing file {file}")
        entries.append(entry)
    if not entries:
        raise FormatError(f"{path}: the datafile lists no clips")
    return entries


def split_label_list(text: str) -> tuple[str, ...]:
    return tuple(label.strip() for label in text.split(",") if label.strip())


@dataclass(frozen=True, slots=True)
class LabelledSegment:
    """A clip as a label csv lists it: YouTube id, start time, labels and (VGGSound) split."""

    youtube_id: str
    start_seconds: float
    labels: tuple[str, ...]
    split: str | None
    line: int

    def vggsound_filename(self) -> str:
        return f"{self.youtube_id}_{int(self.start_seconds):06d}.mp4"

    def audioset_filename(self) -> str:
        return f"{self.youtube_id}_{self.start_seconds:.3f}.mp4"


def read_vggsound_csv(path: str | Path) -> list[LabelledSegment]:
    """The official ``vggsound.csv``: ``youtube_id,start_seconds,label,split``; a header is optional."""
    path = Path(path)
    rows = _read_csv_rows(path)
    out = []
    for line_no, row in enumerate(rows, start=1):
        if not row or (line_no == 1 and _is_vggsound_header(row)):
            continue
        where = f"{path}: line {line_no}"
        if len(row) != 4:
            raise FormatError(f"{where}: expected 4 fields (youtube_id,start_seconds,label,split), got {len(row)}: {row}")
        ytid, start, label, split = (field.strip() for field in row)
        if not ytid:
            raise FormatError(f"{where}: empty youtube_id")
        if not label:
            raise FormatError(f"{where}: empty label")
        if split not in SPLITS:
            raise FormatError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        out.append(LabelledSegment(ytid, _seconds(start, where), (label,), split, line_no))
    _no_duplicates(path, out, "youtube_id,start_seconds")
    return out


def read_audioset_segments(path: str | Path) -> list[LabelledSegment]:
    """The official AudioSet segments csv (``balanced_train_segments.csv`` and friends)."""
    path = Path(path)
    out = []
    rows = csv.reader(io.StringIO(read_text(path)), skipinitialspace=True)
    for row in rows:
        if not row or row[0].lstrip().startswith("#"):
            continue
        line_no = rows.line_num
        where = f"{path}: line {line_no}"
        if len(row) != 4:
            raise FormatError(f'{where}: expected 4 fields (YTID, start_seconds, end_seconds, "labels"), got {len(row)}: {row}')
        ytid, start, end, labels = (field.strip() for field in row)
        if not ytid:
            raise FormatError(f"{where}: empty YTID")
        start_s, end_s = _seconds(start, where), _seconds(end, where)
        if end_s <= start_s:
            raise FormatError(f"{where}: end_seconds {end} is not after start_seconds {start}")
        label_list = split_label_list(labels)
        if not label_list:
            raise FormatError(f"{where}: empty label list")
        out.append(LabelledSegment(ytid, start_s, label_list, None, line_no))
    if not out:
        raise FormatError(f"{path}: no segments (expected AudioSet segments csv rows)")
    _no_duplicates(path, out, "YTID, start_seconds")
    return out


def sniff_label_format(path: str | Path) -> str:
    """'cavmae' (a JSON datafile), 'audioset' (segments csv) or 'vggsound' (4-column csv), from
    the first data rows: AudioSet's third field is a time, VGGSound's fourth a split. Comment
    and header lines are skipped, so either file may start with one."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return "cavmae"
    lines = [line for line in read_text(path).splitlines()[:50] if line.strip()]
    if not lines:
        raise FormatError(f"{path}: empty label file")
    for row in csv.reader(lines, skipinitialspace=True):
        if not row or row[0].lstrip().startswith("#"):
            continue
        if len(row) == 4 and row[3].strip() in SPLITS:
            return "vggsound"
        if len(row) == 4 and _is_number(row[1]) and _is_number(row[2]):
            return "audioset"
    return "audioset" if lines[0].lstrip().startswith("#") else "vggsound"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_text(path: Path) -> str:
    """The text of a label or datafile: UTF-8, a leading byte-order mark dropped; a byte that is
    not UTF-8 is an error naming its line (a file saved in a legacy code page)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FormatError(
            f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None


def _read_csv_rows(path: Path) -> list[list[str]]:
    try:
        return list(csv.reader(io.StringIO(read_text(path), newline="")))
    except csv.Error as exc:
        raise FormatError(f"{path}: not a readable CSV file: {exc}") from exc


# First-line cells that make a VGGSound csv's optional header (the official file has none;
# re-saved copies often carry youtube_id,start_seconds,label,split or similar).
_VGGSOUND_HEADER_IDS = {"youtube_id", "# youtube_id", "ytid", "# ytid", "id", "video_id"}


def _is_vggsound_header(row: list[str]) -> bool:
    cells = [cell.strip().lower() for cell in row]
    return cells[0] in _VGGSOUND_HEADER_IDS or (len(cells) == 4 and cells[3] == "split")


def _seconds(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FormatError(f"{where}: start/end seconds {text!r} is not a number") from None
    if value < 0:
        raise FormatError(f"{where}: negative time {text!r}")
    return value


def _no_duplicates(path: Path, segments: Sequence[LabelledSegment], what: str) -> None:
    seen: dict[tuple[str, float], int] = {}
    for seg in segments:
        key = (seg.youtube_id, seg.start_seconds)
        if key in seen:
            raise FormatError(f"{path}: line {seg.line}: duplicate clip ({what} = {seg.youtube_id}, {seg.start_seconds:g}), first on line {seen[key]}")
        seen[key] = seg.line
