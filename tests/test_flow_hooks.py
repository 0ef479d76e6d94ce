"""The flow's state hooks: a flow run that crashes (or is cancelled) out of reach of its own
``with`` blocks still ends the MLflow runs it left RUNNING. A real Prefect flow run (temporary
server) with the pipeline's own hooks creates a parent run and two stage runs, ends one, and
exits the interpreter mid-run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.pipeline import avsiam_pipeline

pytestmark = pytest.mark.slow

CRASHING_FLOW = """
import json, sys
from pathlib import Path
from prefect import flow
from prefect.context import get_run_context
from flows import mlflow_runs
from flows.pipeline import avsiam_pipeline

@flow(name="crashing", on_crashed=avsiam_pipeline.on_crashed_hooks)
def crashing(output_dir: str):
    out = Path(output_dir)
    mlflow_runs.ensure_tracking_uri(out)
    parent = mlflow_runs.parent_run(out, str(get_run_context().flow_run.id), {})
    done = mlflow_runs.stage_run(out / "staged", str(parent.output_dir), "stage_data", {})
    done.finish()
    training = mlflow_runs.stage_run(out / "pretrain", str(parent.output_dir), "pretrain", {})
    training.flush()
    parent.flush()
    print("IDS " + json.dumps({"parent": parent.run_id, "done": done.run_id, "training": training.run_id}), flush=True)
    raise SystemExit(1)  # the flow's process goes away: no with-block or except clause runs

crashing(sys.argv[1])
"""


def test_the_pipeline_declares_hooks_for_crashes_and_cancellations():
    assert [h.__name__ for h in avsiam_pipeline.on_failure_hooks] == ["end_mlflow_runs_failed"]
    assert [h.__name__ for h in avsiam_pipeline.on_crashed_hooks] == ["end_mlflow_runs_failed"]
    assert [h.__name__ for h in avsiam_pipeline.on_cancellation_hooks] == ["end_mlflow_runs_killed"]


def test_a_crashed_flow_run_ends_the_mlflow_runs_it_left_running(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", CRASHING_FLOW, str(out)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    output = proc.stdout + proc.stderr
    ids = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("IDS "))[4:])
    assert "Running hook 'end_mlflow_runs_failed' in response to entering state 'Crashed'" in output, output[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"parent": "FAILED", "done": "FINISHED", "training": "FAILED"}
    assert f"marked {ids['training']}, {ids['parent']} FAILED" in output
