"""``avsiam compare``: the evaluations of pipeline runs side by side, like the paper's Tables 1-2.

Reads the ``evaluate`` runs of the MLflow experiment (``--tracking-uri``, else
MLFLOW_TRACKING_URI, else MLflow's local default) and prints one row per run: model, recipe,
task, GPU-hours (pretrain + finetune of the evaluated weights), the multimodal, audio-only and
visual-only scores in percent, the pipeline profile, the run's start date (UTC) and short id.
A missing experiment, a bad filter or no matching run is reported with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare evaluate runs (scores, GPU-hours) from MLflow", description=__doc__)
    p.add_argument("--experiment", default="avsiam", help="MLflow experiment name (default: avsiam)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's local default)")
    p.add_argument("--model", help="only this model size (the avsiam.model tag), e.g. base")
    p.add_argument("--recipe", help="only this finetuning recipe (the avsiam.recipe tag), e.g. finetune_as20k")
    p.add_argument("--profile", help="only runs of this pipeline profile (the parent run's avsiam.profile tag), e.g. paper-base")
    p.add_argument("--filter", dest="filter_string", metavar="FILTER",
                   help="an MLflow search filter on the evaluate runs, ANDed to the others, e.g. \"metrics.mAP > 0.4\"")
    p.add_argument("--paper", action="store_true",
                   help="add the paper's reported score and V100-hours where model and recipe match (base, large, huge; "
                        "read from a secondary summary of the paper)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also write a GPU-hours vs score scatter plot to this file")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list (scores as logged: fractions)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at module level: mlflow and matplotlib take seconds to import, which
    # every other avsiam command would pay for, since the CLI registers all commands.
    from mlflow.exceptions import MlflowException

    from avsiam.tracking import redact_credentials
    from avsiam.tracking.compare import CompareError, compare_runs, render_table, scatter_plot, with_paper_reference

    try:
        rows = compare_runs(args.tracking_uri, args.experiment, model=args.model, recipe=args.recipe,
                            profile=args.profile, filter_string=args.filter_string)
    except (CompareError, MlflowException) as exc:  # MlflowException: a bad filter, an unreachable server
        print(f"avsiam compare: error: {redact_credentials(str(exc))}", file=sys.stderr)
        return 1
    if args.paper:
        rows = with_paper_reference(rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        Console(width=220).print(render_table(rows))
    if args.plot:
        _report_plot(scatter_plot(rows, args.plot), rows, to_stderr=args.json)
    return 0


def _report_plot(path: Path, rows: list[dict], to_stderr: bool) -> None:
    """Print where the plot went; on stderr under --json, which keeps stdout one JSON document."""
    unplotted = sum(row["gpu_hours"] is None for row in rows)
    note = f" ({unplotted} run(s) without pipeline_gpu_hours left out)" if unplotted else ""
    print(f"plot: {path}{note}", file=sys.stderr if to_stderr else sys.stdout)
