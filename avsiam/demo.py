"""``make demo``: the whole pipeline on the embedded default, with the commands a user runs.

synthetic dataset -> staging -> pretraining (tiny model, 2 CPU ranks, DeepSpeed ZeRO-2)
-> finetuning -> evaluation on the test split, then a results table. Each stage is the
``avsiam`` command of that stage, so the demo shows exactly what a user would type; a stage
whose outputs exist is resumed or skipped by those commands themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def avsiam(*args: str) -> None:
    cmd = [sys.executable, "-m", "avsiam.cli.main", *args]
    console.print(f"[bold cyan]$ avsiam {' '.join(args)}")
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    console.print(f"[dim]  ({time.perf_counter() - started:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    raw, staged = out / "synthetic", out / "staged"
    # One local MLflow store for every stage, so the runs can be compared in one UI.
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    if not (raw / "labels.csv").exists():
        avsiam("synth", "--out", str(raw), "--classes", str(args.classes), "--clips", str(args.clips), "--seed", "0")
    avsiam("stage", "--videos", str(raw / "videos"), "--labels", str(raw / "labels.csv"), "--out", str(staged))
    manifest = str(staged / "manifest.json")
    avsiam("train", "pretrain", "--model", "tiny", "--data", manifest, "--output", str(out / "pretrain"), "--nproc", str(args.nproc))
    avsiam("train", "finetune", "--model", "tiny", "--recipe", "finetune_vggsound", "--init", str(out / "pretrain" / "weights.safetensors"),
           "--data", manifest, "--output", str(out / "finetune"), "--nproc", str(args.nproc))
    avsiam("evaluate", "--model", "tiny", "--recipe", "finetune_vggsound", "--weights", str(out / "finetune" / "weights.safetensors"),
           "--data", manifest, "--output", str(out / "evaluate"))
    print_results(out)
    return 0


def print_results(out: Path) -> None:
    pretrain = json.loads((out / "pretrain" / "summary.json").read_text())
    finetune = json.loads((out / "finetune" / "summary.json").read_text())
    results = json.loads((out / "evaluate" / "results.json").read_text())
    metric = results["metric"]
    table = Table(title=f"avsiam demo: tiny model, synthetic data ({results['num_clips']} test clips)")
    for col in ("stage", "GPU-hours (CPU ranks)", metric, f"audio-only {metric}", f"visual-only {metric}"):
        table.add_column(col)
    retrieval = pretrain.get("final_validation", {})
    table.add_row("pretrain", f"{pretrain['gpu_hours']:.4f}", f"val A->V R@1 {retrieval.get('a2v_R1', float('nan')):.3f}", "", "")
    table.add_row("finetune + evaluate", f"{finetune['gpu_hours']:.4f}", f"{results[metric]:.3f}",
                  f"{results['audio_only'][metric]:.3f}", f"{results['visual_only'][metric]:.3f}")
    console.print(table)
    console.print(f"Open the runs in MLflow: {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']}")


if __name__ == "__main__":
    sys.exit(main())
