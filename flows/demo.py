"""``make demo``: the whole pipeline on the embedded default, with no server to start.

The ``avsiam`` flow runs in-process on ephemeral Prefect with the ``demo`` profile (synthetic
data, the tiny model, 2 CPU ranks), MLflow in a local sqlite store and artifacts on local
disk, then prints the results table (with the model registry's gate decision), the command
that opens the MLflow UI on the runs and one that labels a clip with the champion model.
Running it again skips every completed stage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from rich.console import Console
from rich.markdown import Markdown

from avsiam.tracking import redact_credentials
from flows.params import StageName


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    parser.add_argument("--force", nargs="*", default=[], choices=list(get_args(StageName)),
                        help="stages to recompute")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    out.mkdir(parents=True, exist_ok=True)
    from flows.pipeline import avsiam_pipeline

    summary = avsiam_pipeline(profile="demo", output_dir=str(out), force=args.force)
    console = Console()
    console.print(Markdown(summary["results_markdown"]))
    mlflow = Path(sys.executable).parent / "mlflow"
    uri = redact_credentials(os.environ["MLFLOW_TRACKING_URI"])
    console.print(f"\nOpen the runs in MLflow:\n  {mlflow} ui --backend-store-uri {uri}\n")
    champions = [d["model_name"] for d in summary["registry"].values() if d]
    if champions:
        avsiam = Path(sys.executable).parent / "avsiam"
        console.print(f"Label a clip with the champion:\n  MLFLOW_TRACKING_URI={uri} {avsiam} predict --model "
                      f"models:/{champions[0]}@champion CLIP.mp4\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
