"""Orchestration overhead of the pipeline: Prefect + MLflow + launch, as a share of training.

Runs the ``avsiam`` flow on ephemeral Prefect (``--profile``, default ``demo``: what ``make
demo`` runs) into a fresh folder, then reads back from Prefect's API each stage task's run
time and from each training stage's ``summary.json`` the time the training loop itself ran
(``wall_seconds``: every optimizer step, epoch-end validation and checkpoint) and the training
program's start-up (``startup_seconds``: rank 0's process start to its training loop: Python
and library imports, process group, ``deepspeed.initialize``, the dataset index and its
start-up check, the model build, opening its MLflow run), which a hand-run ``deepspeed
train.py`` pays as well. What is left of the task is the orchestration: the Prefect task and
its cache record, the flow's MLflow stage run, launching the ranks (started directly by the
local backend), their exit and, after the loop, consolidating the weights (``zero_to_fp32``),
the summary and the stage's artifacts (finetuning: the pyfunc model). Both are reported as a
share of the training loop. The flow's own time outside its tasks is reported too. README.md
(Performance) has today's numbers and where the fixed cost goes.

    .venv/bin/python benchmarks/bench_orchestration.py [--profile demo] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def covered_seconds(task_runs) -> float:
    """Seconds covered by at least one task run (a subflow's run lies inside its task's)."""
    covered, reach = 0.0, None
    for run in task_runs:  # sorted by start time
        if reach is None or run.start_time > reach:
            covered += (run.end_time - run.start_time).total_seconds()
            reach = run.end_time
        elif run.end_time > reach:
            covered += (run.end_time - reach).total_seconds()
            reach = run.end_time
    return covered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--out", type=Path, default=None, help="a new folder for the run (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp) / "run").resolve()
        if out.exists() and any(out.iterdir()):
            print(f"{out} is not empty: the stages would be cached, not run", file=sys.stderr)
            return 2
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        out.mkdir(parents=True, exist_ok=True)
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        from flows.pipeline import avsiam_pipeline

        began = time.perf_counter()
        state = avsiam_pipeline(profile=args.profile, output_dir=str(out), return_state=True)
        flow_seconds = time.perf_counter() - began
        if not state.is_completed():
            print(f"the flow run ended {state.type.value}: {state.message}", file=sys.stderr)
            return 1
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        task_runs = sorted((t for t in task_runs if t.start_time and t.end_time), key=lambda t: t.start_time)
        # The stage folders' summaries (MLflow's local artifact store holds copies).
        summaries = [json.loads(p.read_text()) for p in sorted([*out.glob("pretrain/*/summary.json"), *out.glob("finetune/*/*/summary.json")])]
        summaries.sort(key=lambda s: s["stage"] != "pretrain")
        train_runs = [t for t in task_runs if t.name.startswith("train")]
        if len(train_runs) != len(summaries):
            print(f"{len(train_runs)} train task runs but {len(summaries)} training summaries under {out}", file=sys.stderr)
            return 1

        print(f"profile {args.profile}: flow {flow_seconds:.1f} s (in-process, ephemeral Prefect)")
        print(f"{'stage':>28} {'task s':>7} {'loop s':>7} {'start-up s':>11} {'orchestration s':>16} "
              f"{'orchestration / loop':>21} {'all overhead / loop':>20}")
        for run, summary in zip(train_runs, summaries):
            task_s = (run.end_time - run.start_time).total_seconds()
            loop_s, startup_s = summary["wall_seconds"], summary["startup_seconds"]
            orchestration_s = task_s - loop_s - startup_s
            name = f"{summary['stage']} {summary['recipe']}"
            print(f"{name:>28} {task_s:7.1f} {loop_s:7.1f} {startup_s:11.1f} {orchestration_s:16.1f} "
                  f"{100 * orchestration_s / loop_s:20.1f}% {100 * (task_s - loop_s) / loop_s:19.1f}%")
        for run in task_runs:
            if not run.name.startswith("train"):
                print(f"{run.name:>28} {(run.end_time - run.start_time).total_seconds():7.1f}")
        print(f"{'flow outside its tasks':>28} {flow_seconds - covered_seconds(task_runs):7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
