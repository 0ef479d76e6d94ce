"""The dataset index: what a staged dataset holds and where each clip's sample lives.

A staged dataset is a folder, on disk or under an ``s3://`` prefix::

    index.json                       classes, split counts, the shard list, the dataset digest
    clips-<digest>.arrow             the clip table: one row per clip (Arrow IPC file)
    shards/<split>-<n>-<key>.tar     WebDataset shards (avsiam.data.shards)
    shards/<split>-<n>-<key>.json    each shard's staging record (avsiam.data.staging)
    class_labels_indices.csv         the class list, for people and other tools
    quarantine.csv                   every clip that could not be staged (or was staged with a warning), and why

The clip table holds what training needs per clip, as columns: ``id``, ``split``, ``labels``
(class indices), ``shard`` (its number in the shard list), ``offset`` and ``size`` (the
sample's byte range in the shard), about 55 bytes a clip (~110 MB at AudioSet-2M). It is an
uncompressed Arrow IPC file (pandas, polars and DuckDB read it), memory-mapped when loaded: no
Python object per clip, no decoding, and the ranks and DataLoader workers of a node share one
copy in the page cache. Content digests per clip stay in the shards' JSON members.

The **dataset digest** hashes the class list and every shard's name and sha256, so it changes
when any clip, label or split changes (training stages cache on it). Shards and clip tables
are immutable: their names carry their content key, so a re-staged shard is a new file, a
reader of the previous index keeps working, and a node-local cache of S3 objects is never
stale. ``index.json`` is the only file that is replaced, atomically, and last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from avsiam.data.formats import SPLITS, ClassIndex, FormatError
from avsiam.data.shards import Sample, ShardError, ShardReader, parse_sample
from avsiam.storage.digest import data_digest, file_digest
from avsiam.storage.store import MissingFileError, Store, open_store

INDEX_FORMAT = "avsiam-dataset"
INDEX_VERSION = 1
INDEX_NAME = "index.json"
CLASSES_NAME = "class_labels_indices.csv"
QUARANTINE_NAME = "quarantine.csv"
SHARDS_DIR = "shards"
LEGACY_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name under shards/, e.g. train-000012-3f9a0c1d2e4b.tar
    split: str
    num_samples: int
    bytes: int
    sha256: str

    @property
    def path(self) -> str:
        return f"{SHARDS_DIR}/{self.name}"

    @property
    def slot(self) -> str:
        """The stable home of its clips (``train-000012``); the name adds the content key."""
        return self.name.rsplit("-", 1)[0]


@dataclass(frozen=True)
class ClipTable:
    """Per-clip columns; row ``r`` is one clip. Labels are CSR: ``label_values[label_offsets[r]:label_offsets[r + 1]]``."""

    ids: pa.StringArray
    split: np.ndarray  # int8 index into SPLITS
    shard: np.ndarray  # int32 index into the shard list
    offset: np.ndarray  # int64
    size: np.ndarray  # int32
    label_offsets: np.ndarray  # int32, len(rows) + 1
    label_values: np.ndarray  # int32 class indices

    def __len__(self) -> int:
        return len(self.split)

    def labels(self, row: int) -> np.ndarray:
        return self.label_values[self.label_offsets[row] : self.label_offsets[row + 1]]

    def to_arrow(self) -> pa.Table:
        labels = pa.ListArray.from_arrays(pa.array(self.label_offsets, pa.int32()), pa.array(self.label_values, pa.int32()))
        return pa.table({"id": self.ids, "split": pa.array(self.split, pa.int8()), "labels": labels,
                         "shard": pa.array(self.shard, pa.int32()), "offset": pa.array(self.offset, pa.int64()),
                         "size": pa.array(self.size, pa.int32())})

    @classmethod
    def from_arrow(cls, table: pa.Table, where: str) -> ClipTable:
        """Views of ``table``'s columns (no copy when each column is one chunk, as written)."""
        expected = {"id", "split", "labels", "shard", "offset", "size"}
        if set(table.column_names) != expected:
            raise FormatError(f"{where}: the clip table has columns {sorted(table.column_names)}, expected {sorted(expected)}")
        column = {name: _one_chunk(table.column(name)) for name in expected}
        labels = column["labels"]
        offsets = labels.offsets.to_numpy()
        return cls(
            ids=column["id"],
            split=column["split"].to_numpy(),
            shard=column["shard"].to_numpy(),
            offset=column["offset"].to_numpy(),
            size=column["size"].to_numpy(),
            label_offsets=offsets - offsets[0] if offsets[0] else offsets,
            label_values=labels.values.to_numpy()[offsets[0] : offsets[-1]],
        )

    def write(self) -> bytes:
        """The table as an uncompressed Arrow IPC file of one record batch (memory-mappable)."""
        sink = pa.BufferOutputStream()
        table = self.to_arrow()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, len(self)))
        return sink.getvalue().to_pybytes()

    @classmethod
    def read(cls, path: Path, where: str) -> ClipTable:
        """Memory-map an Arrow IPC clip table: the arrays read the file's pages in place."""
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise FormatError(f"{where}: cannot read the clip table ({exc})") from None
        return cls.from_arrow(table, where)


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    # combine_chunks copies even a single chunk; a clip table is written as one record batch.
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def dataset_digest(classes: ClassIndex, multi_label: bool, shards: tuple[ShardInfo, ...]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": INDEX_FORMAT, "version": INDEX_VERSION, "classes": list(classes.mids),
                         "multi_label": multi_label}).encode())
    for shard in sorted(shards, key=lambda s: s.name):
        h.update(f"\n{shard.name} {shard.sha256}".encode())
    return h.hexdigest()


@dataclass
class DatasetIndex:
    """A loaded staged dataset: classes, shards and the clip table (see the module docstring)."""

    store: Store
    classes: ClassIndex
    multi_label: bool
    shards: tuple[ShardInfo, ...]
    clips: ClipTable
    extra: dict[str, Any]

    def __post_init__(self) -> None:
        self.dataset_digest = dataset_digest(self.classes, self.multi_label, self.shards)

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def where(self) -> str:
        return self.store.uri(INDEX_NAME)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_rows(self, name: str) -> np.ndarray:
        """Row numbers of the clips of split ``name``, in staging order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return np.flatnonzero(self.clips.split == SPLITS.index(name))

    def split_counts(self) -> dict[str, int]:
        counts = np.bincount(self.clips.split, minlength=len(SPLITS))
        return {name: int(counts[i]) for i, name in enumerate(SPLITS)}

    def clip_id(self, row: int) -> str:
        return self.clips.ids[int(row)].as_py()

    def shard_file(self, shard: int) -> tuple[Path, str]:
        """The local file of shard number ``shard`` (fetched into the node cache for S3) and its name."""
        info = self.shards[shard]
        try:
            return self.store.local_path(info.path), self.store.uri(info.path)
        except MissingFileError:
            raise ShardError(self.store.uri(info.path), "the shard is missing; stage the dataset again") from None

    def reader(self) -> ShardReader:
        return ShardReader(self.shard_file)

    def read_sample(self, reader: ShardReader, row: int) -> Sample:
        row = int(row)
        data, name = reader.read(int(self.clips.shard[row]), int(self.clips.offset[row]), int(self.clips.size[row]))
        return parse_sample(data, name, self.clip_id(row))

    def check_shards(self) -> None:
        """Every shard exists with the size the index records: one listing, nothing per clip."""
        sizes = self.store.sizes(SHARDS_DIR)
        for shard in self.shards:
            size = sizes.get(shard.path)
            if size is None:
                raise FormatError(f"{self.where}: shard {self.store.uri(shard.path)} is missing; stage the dataset again")
            if size != shard.bytes:
                raise FormatError(f"{self.where}: shard {self.store.uri(shard.path)} has {size} bytes, the index records "
                                  f"{shard.bytes}: it is truncated or was replaced; stage the dataset again")

    def to_json(self, clips_table: str, clips_sha256: str) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "dataset_digest": self.dataset_digest,
            "multi_label": self.multi_label, "num_classes": self.num_classes, "num_clips": len(self.clips),
            "splits": self.split_counts(),
            "classes": [{"index": i, "mid": m, "name": n} for i, (m, n) in enumerate(zip(self.classes.mids, self.classes.names))],
            "clips_table": clips_table, "clips_sha256": clips_sha256,
            "shards": [vars(s) for s in self.shards], "extra": self.extra,
        }


def write_index(store: Store, classes: ClassIndex, multi_label: bool, shards: tuple[ShardInfo, ...], clips: ClipTable,
                extra: dict[str, Any]) -> DatasetIndex:
    """Validate, then write the clip table and (last, atomically) ``index.json``."""
    index = DatasetIndex(store, classes, multi_label, shards, clips, extra)
    validate(index)
    table_bytes = clips.write()
    table_name = f"clips-{index.dataset_digest[:16]}.arrow"
    store.write_bytes(table_name, table_bytes)
    document = index.to_json(table_name, data_digest(table_bytes))
    store.write_bytes(INDEX_NAME, (json.dumps(document, indent=1) + "\n").encode())
    return index


def dataset_store(location: str | Path) -> Store:
    """The store of a dataset given as its folder, its ``index.json``, or either in S3."""
    text = str(location).rstrip("/")
    if text.endswith(f"/{INDEX_NAME}") or text == INDEX_NAME:
        text = text[: -len(INDEX_NAME)].rstrip("/") or "."
    return open_store(text)


def load_index(location: str | Path) -> DatasetIndex:
    """Load and validate a staged dataset (``location``: its folder or ``index.json``, local or S3)."""
    store = dataset_store(location)
    where = store.uri(INDEX_NAME)
    try:
        raw = store.read_bytes(INDEX_NAME)
    except MissingFileError:
        if store.exists(LEGACY_MANIFEST):
            raise FormatError(f"{store.location} holds a dataset staged in the old one-file-per-clip layout "
                              f"({LEGACY_MANIFEST}); stage it again with `avsiam stage`, which writes shards") from None
        raise FormatError(f"{where} does not exist: stage the dataset with `avsiam stage` (or give the folder it wrote)") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise FormatError(f"{where}: not an avsiam dataset index (expected \"format\": \"{INDEX_FORMAT}\")")
    if doc.get("version") != INDEX_VERSION:
        raise FormatError(f"{where}: index version {doc.get('version')!r} is not supported (expected {INDEX_VERSION}); stage again")
    try:
        classes = ClassIndex(tuple(c["mid"] for c in doc["classes"]), tuple(c["name"] for c in doc["classes"]))
        shards = tuple(ShardInfo(s["name"], s["split"], int(s["num_samples"]), int(s["bytes"]), s["sha256"]) for s in doc["shards"])
        table_name, table_sha256, multi_label = doc["clips_table"], doc["clips_sha256"], bool(doc["multi_label"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{where}: malformed index: {exc!r}") from None
    try:
        table_path = store.local_path(table_name)
        table_digest = file_digest(table_path)
    except (MissingFileError, FileNotFoundError):
        raise FormatError(f"{where}: its clip table {store.uri(table_name)} is missing; stage the dataset again") from None
    if table_digest != table_sha256:
        raise FormatError(f"{where}: the clip table {store.uri(table_name)} does not match its recorded sha256; stage again")
    index = DatasetIndex(store, classes, multi_label, shards, ClipTable.read(table_path, store.uri(table_name)), doc.get("extra", {}))
    # Ids were checked unique when staging wrote the table, and the recorded sha256 proves this
    # is that table; the other checks are cheap.
    validate(index, unique_ids=False)
    if doc.get("dataset_digest") != index.dataset_digest:
        raise FormatError(f"{where}: dataset_digest does not match the shards it lists (edited by hand?); stage the dataset again")
    return index


def validate(index: DatasetIndex, unique_ids: bool = True) -> None:
    """Check the clip table against the classes and shards, vectorised; errors name the clip.
    ``unique_ids``: also check no id repeats (a hash of every id: 1 s at 2 M clips)."""
    clips, where = index.clips, index.where
    n = len(clips)

    def fail(rows: np.ndarray, problem: str) -> None:
        if len(rows):
            raise FormatError(f"{where}: clip {index.clip_id(rows[0])!r}: {problem}"
                              + (f" (and {len(rows) - 1} more clips)" if len(rows) > 1 else ""))

    for name in ("split", "shard", "offset", "size"):
        if len(getattr(clips, name)) != n:
            raise FormatError(f"{where}: the clip table's {name} column has {len(getattr(clips, name))} rows, not {n}")
    if len(clips.ids) != n or len(clips.label_offsets) != n + 1 or clips.label_offsets[-1] != len(clips.label_values):
        raise FormatError(f"{where}: the clip table's id or labels column does not have {n} rows")
    if unique_ids and pc.count_distinct(clips.ids).as_py() != n:
        counts = pc.value_counts(clips.ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise FormatError(f"{where}: clip {duplicate!r}: duplicate id")
    fail(np.flatnonzero((clips.split < 0) | (clips.split >= len(SPLITS))), "split code is not one of train, val, test")
    fail(np.flatnonzero((clips.shard < 0) | (clips.shard >= len(index.shards))), "names a shard the index does not list")
    per_row = np.diff(clips.label_offsets)
    fail(np.flatnonzero(per_row == 0), "empty label list")
    if not index.multi_label:
        fail(np.flatnonzero(per_row != 1), "a single-label dataset needs exactly one label per clip")
    bad_labels = (clips.label_values < 0) | (clips.label_values >= index.num_classes)
    if bad_labels.any():
        rows = np.searchsorted(clips.label_offsets, np.flatnonzero(bad_labels), side="right") - 1
        fail(rows, f"label index out of range (the class list has {index.num_classes} classes)")
    counts = np.bincount(clips.shard, minlength=len(index.shards)) if n else np.zeros(len(index.shards), int)
    for i, shard in enumerate(index.shards):
        if counts[i] != shard.num_samples:
            raise FormatError(f"{where}: shard {shard.name} holds {shard.num_samples} samples, the clip table puts {counts[i]} in it")
