"""Training throughput on this machine: steps/s and samples/s of the pretraining step for the
tiny and base configs under ZeRO 1/2/3 on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo),
each reported as a ratio against ZeRO-2 of the same size measured in the same run.

    .venv/bin/python benchmarks/bench_training.py [--sizes tiny base] [--steps 6] [--nproc 2]

Every configuration is a real ``avsiam train pretrain --nproc N`` run on a small synthetic
dataset; the first step (process start, JIT, allocator warm-up) is left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from avsiam.data.staging import StagingRequest, stage_dataset
from avsiam.synthetic import generate_synthetic_dataset

BATCH = {"tiny": 8, "base": 2}


def run(size: str, zero: int, steps: int, nproc: int, data: str, out: Path) -> dict[str, float]:
    run_dir = out / f"{size}-zero{zero}"
    cmd = [sys.executable, "-m", "avsiam.cli.main", "train", "pretrain", "--model", size, "--data", data,
           "--output", str(run_dir), "--nproc", str(nproc), f"zero_stage={zero}", f"max_steps={steps}",
           f"batch_size_per_gpu={BATCH[size]}", "num_workers=1", "epochs=100", "precision=fp32"]
    subprocess.run(cmd, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    step = statistics.median(r["step_time_s"] for r in records)
    return {"steps_per_s": 1 / step, "samples_per_s": statistics.median(r["samples_per_s"] for r in records),
            "data_wait_s": statistics.median(r["data_wait_s"] for r in records),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in records)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = generate_synthetic_dataset(tmp / "raw", 4, 48, seed=0, workers=2, progress=False)
        staged = stage_dataset(StagingRequest(labels=[ds.labels_csv], out=tmp / "staged", videos=ds.videos_dir)).index.location
        print(f"{'config':<14}{'steps/s':>9}{'samples/s':>11}{'vs ZeRO-2':>11}{'data wait s':>13}{'peak MB/rank':>14}")
        for size in args.sizes:
            results = {zero: run(size, zero, args.steps, args.nproc, staged, tmp) for zero in (2, 1, 3)}
            for zero in (1, 2, 3):
                r = results[zero]
                ratio = r["samples_per_s"] / results[2]["samples_per_s"]
                print(f"{size}/zero{zero:<8}{r['steps_per_s']:>9.3f}{r['samples_per_s']:>11.2f}{ratio:>10.2f}x"
                      f"{r['data_wait_s']:>13.3f}{r['peak_memory_mb']:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
