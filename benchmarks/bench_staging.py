"""Staging throughput on a local Ray cluster with 1 and 2 workers, and CPU-seconds per clip.

Each run is the staging flow as users run it (``flows.staging.run_staging``: one Prefect task
per shard on a temporary local Ray cluster) into a fresh folder. Reported per run: the shard
phase's wall-clock (first task submitted to last finished; Prefect and Ray start-up excluded,
Ray workers' first imports included), clips per second, and the CPU-seconds per decoded clip
summed over the tasks (decode + resize + JPEG/wav encode + shard write). The speed-up is the
1-worker shard phase over the 2-worker one on the same clips.

Clips: ``--clips`` synthetic ones (256x256, 10 s), and ``--real-copies`` copies of each real
clip of ../shared/data/real (AudioSet-style 256x144; VGGSound-style 1280x720), staged once
each with 2 workers for their CPU cost.

    .venv/bin/python benchmarks/bench_staging.py [--clips 192] [--clips-per-shard 8] [--real-copies 6]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from avsiam.data.synthetic import generate_synthetic_dataset
from flows.staging import run_staging

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
REAL_CLIPS = {"AudioSet-style 256x144": REAL / "00W1lcxW-WU_40.000.mp4", "VGGSound-style 1280x720": REAL / "KlsG1EnBEjc_000361.mp4"}


def stage(labels: Path, videos: Path, out: Path, workers: int, clips_per_shard: int):
    return run_staging(workers=workers, labels=[str(labels)], out=str(out), videos=str(videos), val_fraction=0,
                       clips_per_shard=clips_per_shard)


def real_clip_copies(root: Path, clip: Path, copies: int) -> tuple[Path, Path]:
    """``copies`` copies of a real clip under distinct ids, with a VGGSound csv naming them."""
    videos = root / clip.stem / "videos"
    videos.mkdir(parents=True)
    for k in range(copies):
        shutil.copy(clip, videos / f"copy{k:03d}_000000.mp4")
    labels = videos.parent / "labels.csv"
    labels.write_text("".join(f"copy{k:03d},0,real,train\n" for k in range(copies)))
    return labels, videos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=192)
    parser.add_argument("--clips-per-shard", type=int, default=8)
    parser.add_argument("--real-copies", type=int, default=6)
    args = parser.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-staging-") as tmp:
        root = Path(tmp)
        ds = generate_synthetic_dataset(root / "raw", 8, args.clips, seed=0, workers=2, progress=False)
        runs = {}
        for workers in (1, 2):
            runs[workers] = stage(ds.labels_csv, ds.videos_dir, root / f"staged-{workers}", workers, args.clips_per_shard)
        real = {}
        for name, clip in REAL_CLIPS.items():
            labels, videos = real_clip_copies(root / "real", clip, args.real_copies)
            real[name] = stage(labels, videos, root / "real" / f"staged-{clip.stem}", 2, 2)

    print(f"{args.clips} synthetic clips, {args.clips_per_shard} per shard")
    print(f"{'workers':>8}{'shard phase s':>15}{'clips/s':>10}{'CPU-s/clip':>12}")
    for workers, s in runs.items():
        print(f"{workers:>8}{s.shard_seconds:>15.1f}{s.decoded / s.shard_seconds:>10.2f}{s.cpu_seconds / s.decoded:>12.3f}")
    print(f"speed-up, 2 workers vs 1: {runs[1].shard_seconds / runs[2].shard_seconds:.2f}x "
          f"(same digest: {runs[1].dataset_digest == runs[2].dataset_digest})")
    for name, s in real.items():
        print(f"real clip {name}: {s.cpu_seconds / s.decoded:.3f} CPU-s per clip over {s.decoded} copies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
