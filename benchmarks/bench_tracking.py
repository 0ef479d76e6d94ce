"""Tracking overhead per training step against a live MLflow server.

A tiny-model pretraining step (forward, backward, Adam) on this machine, tracked by rank 0 in
three ways, interleaved over ``--repeats`` rounds of ``--steps`` steps:

* ``off``: no tracking (a :class:`NullTracker`), the baseline;
* ``per-step round trip``: each step's metrics delivered before the next step starts (what
  the tracker did before its sender thread: ``log_metrics`` then ``flush``);
* ``queued``: ``log_metrics`` only, as the trainer calls it; the sender thread delivers.

Each tracked step logs the trainer's per-step metrics to a real ``mlflow server`` (sqlite
backend) on loopback, started here with the tests' helper. Reported per step: the step time
(median), the time the step loop spends inside tracking calls (the critical path), and the CPU
time of the sender thread (off the critical path; it competes for cores only where the node
has none to spare). On a 2-core machine the step times of whole rounds scatter by 10-20 %
(the server shares the cores), so the critical-path column is the one that resolves 1 %.

    .venv/bin/python benchmarks/bench_tracking.py [--steps 40] [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import MlflowServer  # noqa: E402 - the tests' real-server helper

from avsiam.config import resolve_recipe  # noqa: E402
from avsiam.model import build_pretrain_model_from_recipe  # noqa: E402
from avsiam.tracking import NullTracker, Tracker  # noqa: E402

MODES = ("off", "per-step round trip", "queued")


def tracked_steps(model, optimizer, batch, tracker, steps: int, wait_each_step: bool) -> tuple[list[float], float]:
    """Per-step wall times, and the seconds spent inside tracking calls over all steps."""
    times, in_tracking = [], 0.0
    for step in range(steps):
        start = time.perf_counter()
        out = model(*batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        metrics = {"loss": float(out["loss"].detach()), "lr": 1e-4, "samples_per_s": len(batch[0]) / seconds,
                   "step_time_s": seconds, "data_wait_s": 0.0, "peak_memory_mb": 0.0,
                   **{k: float(v) for k, v in out.items() if k != "loss"}}
        tracking_began = time.perf_counter()
        tracker.log_metrics(metrics, step=step)
        if wait_each_step:
            tracker.flush()
        in_tracking += time.perf_counter() - tracking_began
        times.append(time.perf_counter() - start)
    return times, in_tracking


def sender_cpu_seconds(tracker) -> float:
    """CPU time of the tracker's sender thread so far (0 without one)."""
    sender = getattr(tracker, "_sender", None)
    return time.clock_gettime(time.pthread_getcpuclockid(sender.ident)) if sender is not None else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = resolve_recipe("tiny", "pretrain_as2m")
    model = build_pretrain_model_from_recipe(recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = (torch.randn(args.batch, recipe.arch.audio_frames, recipe.arch.mel_bins),
             torch.randn(args.batch, 3, recipe.arch.img_size, recipe.arch.img_size))
    tracked_steps(model, optimizer, batch, NullTracker(), 3, False)  # warm-up

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "server").mkdir()
        server = MlflowServer(Path(tmp) / "server").start()
        os.environ["MLFLOW_TRACKING_URI"] = server.url
        try:
            results: dict[str, dict[str, list[float]]] = {m: {"step": [], "critical": [], "sender": []} for m in MODES}
            for repeat in range(args.repeats):
                for mode in MODES:
                    tracker = NullTracker() if mode == "off" else Tracker.start(Path(tmp) / f"{repeat}-{mode}", experiment="bench")
                    times, in_tracking = tracked_steps(model, optimizer, batch, tracker, args.steps, mode == "per-step round trip")
                    tracker.flush()
                    sender = sender_cpu_seconds(tracker)
                    tracker.finish()
                    results[mode]["step"].append(statistics.median(times))
                    results[mode]["critical"].append(in_tracking / args.steps)
                    results[mode]["sender"].append(sender / args.steps)
        finally:
            server.stop()

    base = statistics.median(results["off"]["step"])
    print(f"tiny pretraining step, batch {args.batch}, {torch.get_num_threads()} threads; live MLflow server on loopback")
    print(f"{'tracking':>22} {'step ms':>9} {'in tracking calls / step':>26} {'sender thread CPU / step':>26}")
    for mode in MODES:
        step, critical, sender = (statistics.median(results[mode][k]) for k in ("step", "critical", "sender"))
        print(f"{mode:>22} {step * 1e3:9.1f} {critical * 1e3:11.3f} ms {100 * critical / base:9.3f} % "
              f"{sender * 1e3:11.3f} ms {100 * sender / base:9.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
