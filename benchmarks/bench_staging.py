"""Staging throughput on a local Ray cluster with 1 and 2 workers, and CPU-seconds per clip.

Each run is the staging flow as users run it (``flows.staging.run_staging``: one Prefect task
per shard on Ray) into a fresh folder, on copies of the two real clips of ../shared/data/real
(AudioSet-style 256x144 and VGGSound-style 1280x720, half each: AudioSet's downloads are mostly small, VGGSound's
mostly HD). Reported per run: the shard phase's wall-clock (first task submitted
to last finished), clips per second, and the CPU-seconds per clip summed over the tasks (decode
+ resize + JPEG/wav encode + shard write). The speed-up is the 1-worker shard phase over the
2-worker one on the same clips.

Two measurements of each: *cold*, a fresh temporary cluster per run as ``avsiam stage`` makes
it (its workers import torch and PyAV inside the timed phase: a few seconds paid once per
cluster, not per shard), and *warm*, the flow on a cluster whose workers are already up
(``ray.init`` first; the flow then uses that cluster), which is what a long staging sees.

    .venv/bin/python benchmarks/bench_staging.py [--copies 24] [--clips-per-shard 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import ray
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from avsiam.data.staging import StagingRequest
from flows.staging import LOCAL_OBJECT_STORE_BYTES, run_staging

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
REAL_CLIPS = {"AudioSet-style 256x144": REAL / "00W1lcxW-WU_40.000.mp4", "VGGSound-style 1280x720": REAL / "KlsG1EnBEjc_000361.mp4"}


def clip_copies(root: Path, clips: list[Path], copies: int) -> tuple[Path, Path]:
    """``copies`` copies of each clip under distinct ids, alternating, with a VGGSound csv naming them."""
    videos = root / "videos"
    videos.mkdir(parents=True)
    rows = []
    for k in range(copies):
        for j, clip in enumerate(clips):
            clip_id = f"copy{j}{k:04d}"
            shutil.copy(clip, videos / f"{clip_id}_000000.mp4")
            rows.append(f"{clip_id},0,{clip.stem[:5]},train\n")
    labels = root / "labels.csv"
    labels.write_text("".join(rows))
    return labels, videos


@ray.remote
def _warm() -> None:
    import time

    import avsiam.data.staging  # noqa: F401  (the imports a shard task pays on a fresh worker)

    time.sleep(2)  # hold the worker so that every worker gets one


def stage(labels: Path, videos: Path, out: Path, workers: int, clips_per_shard: int, warm: bool):
    def run():
        request = StagingRequest(labels=[labels], out=out, videos=videos, val_fraction=0, clips_per_shard=clips_per_shard)
        return run_staging(request, workers=workers)

    if not warm:
        return run()
    # A cluster started before the flow gets no Prefect API URL from it: start the API first
    # and put its URL in the environment the Ray workers inherit.
    with prefect_test_harness():
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        try:
            ray.get([_warm.remote() for _ in range(workers)])
            return run()
        finally:
            ray.shutdown()
            del os.environ["PREFECT_API_URL"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=24, help="copies of each real clip")
    parser.add_argument("--clips-per-shard", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry attempts from a closed network
    runs, per_clip = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-staging-") as tmp:
        root = Path(tmp)
        labels, videos = clip_copies(root / "mix", list(REAL_CLIPS.values()), args.copies)
        for warm in (False, True):
            for workers in (1, 2):
                out = root / f"staged-{workers}-{'warm' if warm else 'cold'}"
                runs[warm, workers] = stage(labels, videos, out, workers, args.clips_per_shard, warm)
        for name, clip in REAL_CLIPS.items():
            one_labels, one_videos = clip_copies(root / clip.stem, [clip], max(2, args.copies // 4))
            per_clip[name] = stage(one_labels, one_videos, root / f"staged-{clip.stem}", 2, 2, warm=True)

    n = 2 * args.copies
    print(f"{n} real clips (half 256x144, half 1280x720), {args.clips_per_shard} per shard, {-(-n // args.clips_per_shard)} shards")
    print(f"{'cluster':<8}{'workers':>8}{'shard phase s':>15}{'clips/s':>10}{'CPU-s/clip':>12}{'speed-up':>10}")
    for warm in (False, True):
        for workers in (1, 2):
            s = runs[warm, workers]
            speed_up = runs[warm, 1].shard_seconds / s.shard_seconds
            print(f"{'warm' if warm else 'cold':<8}{workers:>8}{s.shard_seconds:>15.1f}{s.decoded / s.shard_seconds:>10.2f}"
                  f"{s.cpu_seconds / s.decoded:>12.3f}{speed_up:>9.2f}x")
    print(f"same dataset digest in every run: {len({s.dataset_digest for s in runs.values()}) == 1}")
    for name, s in per_clip.items():
        print(f"{name}: {s.cpu_seconds / s.decoded:.3f} CPU-s per clip ({s.decoded} copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
