"""The dataset index at AudioSet-2M scale: load time and memory per rank, and the start-up check.

Writes a synthetic staged dataset of ``--clips`` clips (AudioSet-like ids, 1-5 of 527 labels
per clip, ``--clips-per-shard`` clips a shard; the shards are sparse files of ~0.5 GB each, so
they take no disk) and measures, each in a fresh process that has already imported torch as a
rank has:

* ``index``: :func:`avsiam.data.index.load_index`, the train split's dataset and its
  class-balanced sampling weights (what a rank builds before its first step);
* ``manifest.json`` (the baseline, the layout this replaced): the same clips as one JSON
  document with an object per clip (786 bytes a clip, as ``Manifest.save`` wrote it), parsed
  into one record per clip with its label lookup, as the previous loader did. The previous
  loader also rebuilt a 527-entry dict per clip; the baseline here does not, so it is faster
  than what it stands for.

and the start-up check: ``DatasetIndex.check_shards`` (one listing of the shard folder) next to
stat'ing 11 files per clip as the previous check did, timed on ``--stat-files`` real files and
scaled to the clip count (creating 22 M files is not a benchmark).

    .venv/bin/python benchmarks/bench_index.py [--clips 2000000] [--clips-per-shard 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from avsiam.data.formats import ClassIndex
from avsiam.data.index import ClipTable, ShardInfo, write_index
from avsiam.storage.store import LocalStore

NUM_CLASSES = 527
SHARD_BYTES = 520 * 1000 * 1000  # ~1,000 clips of 0.52 MB

LOAD_INDEX = """
import json, sys, time
import torch  # a rank has torch and the data modules loaded before it reads its data
from avsiam.config import resolve_recipe
from avsiam.data.datasets import FinetuneClips
from avsiam.data.index import load_index
from avsiam.data.sampler import class_balanced_weights
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
recipe = resolve_recipe("base", "finetune_as2m")
base, start, cpu = rss(), time.perf_counter(), time.process_time()
index = load_index(sys.argv[1])
train = FinetuneClips(index, "train", recipe)
weights = class_balanced_weights(*train.label_csr(), index.num_classes)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "rss_mb": (rss() - base) / 2**20, "clips": len(index.clips)}))
"""

LOAD_MANIFEST = """
import json, sys, time
from dataclasses import dataclass
import torch
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096

@dataclass(frozen=True)
class ClipRecord:
    id: str
    split: str
    audio: str
    frames: tuple
    labels: tuple
    digest: str
    source_digest: str = ""

base, start, cpu = rss(), time.perf_counter(), time.process_time()
doc = json.loads(open(sys.argv[1], encoding="utf-8").read())
lookup = {c["mid"]: c["index"] for c in doc["classes"]}
clips = [ClipRecord(c["id"], c["split"], c["audio"], tuple(c["frames"]), tuple(c["labels"]), c["digest"],
                    c.get("source_digest", "")) for c in doc["clips"]]
del doc
seen = set()
for clip in clips:
    assert clip.id not in seen and clip.split in ("train", "val", "test") and clip.labels
    seen.add(clip.id)
train = [c for c in clips if c.split == "train"]
label_indices = [[lookup[m] for m in c.labels] for c in train]
counts = [0] * len(lookup)
for labels in label_indices:
    for c in labels:
        counts[c] += 1
weights = [sum(1000 / (counts[c] + 0.01) for c in labels) for labels in label_indices]
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "rss_mb": (rss() - base) / 2**20, "clips": len(clips)}))
"""


def synthetic_clips(n: int, per_shard: int, rng: np.random.Generator) -> tuple[ClipTable, tuple[ShardInfo, ...], list[str]]:
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype="S1")
    ids = [f"{''.join(alphabet[rng.integers(0, 64, 11)].astype(str))}_{i % 1000 * 10}.000" for i in range(n)]
    counts = rng.integers(1, 6, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = rng.integers(0, NUM_CLASSES, offsets[-1]).astype(np.int32)
    shard = (np.arange(n) // per_shard).astype(np.int32)
    position = np.arange(n) % per_shard
    split = np.where(rng.random(n) < 0.9, 0, 1).astype(np.int8)
    num_shards = int(shard[-1]) + 1
    shards = tuple(ShardInfo(f"train-{i:06d}-{i:012x}.tar", "train", int((shard == i).sum()), SHARD_BYTES, f"{i:064x}")
                   for i in range(num_shards))
    table = ClipTable(pa.array(ids, pa.string()), split, shard, (position * 520_000).astype(np.int64),
                      np.full(n, 520_000, np.int32), offsets, values)
    return table, shards, ids


def write_manifest(path: Path, table: ClipTable, ids: list[str], classes: ClassIndex) -> None:
    """The same clips in the replaced one-file-per-clip manifest format (indent=1, as it was saved)."""
    splits = ("train", "val", "test")
    with path.open("w", encoding="utf-8") as fh:
        fh.write('{\n "format": "avsiam-manifest",\n "version": 1,\n "classes": ')
        fh.write(json.dumps([{"index": i, "mid": m, "name": n} for i, (m, n) in enumerate(zip(classes.mids, classes.names))]))
        fh.write(',\n "clips": [')
        for i, clip_id in enumerate(ids):
            shard = f"{i % 256:02x}"
            labels = [classes.mids[c] for c in table.labels(i)]
            record = {"id": clip_id, "split": splits[table.split[i]], "audio": f"audio/{shard}/{clip_id}.wav",
                      "frames": [f"frames/{shard}/{clip_id}/{k}.jpg" for k in range(10)], "labels": labels,
                      "digest": f"{i:064x}", "source_digest": f"{i + 1:064x}"}
            fh.write(("," if i else "") + "\n  " + json.dumps(record, indent=1).replace("\n", "\n  "))
        fh.write("\n ]\n}\n")


def measure(script: str, target: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", "import numpy as np\n" + script, str(target)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stat_rate(tmp: Path, files: int) -> float:
    """stat() calls per second on ``files`` real files spread over subfolders (page cache warm)."""
    paths = []
    for i in range(files):
        folder = tmp / "perfile" / f"{i % 256:02x}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i}.jpg")
        paths[-1].write_bytes(b"")
    start = time.perf_counter()
    for path in paths:
        path.is_file()
    return files / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=2_000_000)
    parser.add_argument("--clips-per-shard", type=int, default=1000)
    parser.add_argument("--stat-files", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    classes = ClassIndex(tuple(f"/m/{i:05d}" for i in range(NUM_CLASSES)), tuple(f"class {i}" for i in range(NUM_CLASSES)))
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        root = Path(tmp)
        table, shards, ids = synthetic_clips(args.clips, args.clips_per_shard, rng)
        write_index(LocalStore(root / "staged"), classes, True, shards, table, {})
        (root / "staged" / "shards").mkdir()
        for shard in shards:  # sparse files: the sizes the index records, no disk used
            with open(root / "staged" / shard.path, "wb") as fh:
                fh.truncate(shard.bytes)
        index_bytes = sum(p.stat().st_size for p in (root / "staged").glob("*.*") if p.is_file())
        write_manifest(root / "manifest.json", table, ids, classes)
        manifest_bytes = (root / "manifest.json").stat().st_size
        del table, ids

        new = measure(LOAD_INDEX, root / "staged")
        old = measure(LOAD_MANIFEST, root / "manifest.json")

        from avsiam.data.index import load_index

        index = load_index(root / "staged")
        start = time.perf_counter()
        index.check_shards()
        check_seconds = time.perf_counter() - start
        rate = stat_rate(root, args.stat_files)
    old_check_seconds = 11 * args.clips / rate

    print(f"{args.clips:,} clips in {len(shards):,} shards")
    print(f"{'':<22}{'load s':>10}{'CPU s':>10}{'RSS MB':>10}{'on disk MB':>12}")
    print(f"{'index (Arrow IPC)':<22}{new['seconds']:>10.2f}{new['cpu_seconds']:>10.2f}{new['rss_mb']:>10.0f}{index_bytes / 1e6:>12.0f}")
    print(f"{'manifest.json (old)':<22}{old['seconds']:>10.2f}{old['cpu_seconds']:>10.2f}{old['rss_mb']:>10.0f}"
          f"{manifest_bytes / 1e6:>12.0f}")
    print(f"index vs manifest: {old['seconds'] / new['seconds']:.0f}x faster, {new['rss_mb'] / old['rss_mb']:.3f}x the memory")
    print(f"start-up check: {check_seconds:.3f} s for {len(shards):,} shards; the per-file check (11 stat() a clip at "
          f"{rate:,.0f}/s, local page cache) {old_check_seconds:.0f} s: {old_check_seconds / check_seconds:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
