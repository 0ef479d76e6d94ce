"""The pipeline flow with MLflow unreachable from the start: it runs to the end with tracking
deferred, and `avsiam tracking sync` replays every run with its nesting once a real MLflow
server is up on that address; with tracking_required it fails within seconds instead."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MlflowServer, avsiam, free_port
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

FAST = ["batch_size_per_gpu=4", "num_workers=0", "arch.depth=2"]
RUN_FLOW = """
import json, sys
from flows.pipeline import avsiam_pipeline
summary = avsiam_pipeline(**json.loads(sys.argv[1]))
print("SUMMARY " + json.dumps({k: summary[k] for k in ("tracking", "mlflow_parent_run_id", "results", "registry")}))
"""


def run_flow(tmp_path: Path, tracking_uri: str, **params) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "PREFECT_HOME": str(tmp_path / "prefect_home"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    params = {"profile": "demo", "output_dir": str(tmp_path / "out"),
              "dataset": {"source": "synthetic", "synthetic": {"classes": 4, "clips": 40, "seed": 5}},
              "overrides": {"pretrain": [*FAST, "max_steps=2"], "finetune": [*FAST, "max_steps=2"]}, **params}
    return subprocess.run([sys.executable, "-c", RUN_FLOW, json.dumps(params)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=900)


def test_flow_runs_to_the_end_without_mlflow_and_sync_replays_the_nested_runs(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens here until the server starts below
    began = time.monotonic()
    proc = run_flow(tmp_path, uri)
    print(f"flow run: {time.monotonic() - began:.0f} s")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
    assert summary["tracking"].startswith("deferred: ") and summary["mlflow_parent_run_id"] is None
    assert summary["results"]["finetune_vggsound"]["accuracy"] >= 0
    assert "tracking deferred" in output and f"avsiam tracking sync {tmp_path / 'out'}" in output
    # Registering needs MLflow: skipped, saying so, and the model stays in the run folder.
    assert summary["registry"] == {"finetune_vggsound": None} and "not registering avsiam-tiny-finetune_vggsound" in output

    server = MlflowServer(tmp_path / "mlflow", port=port)
    (tmp_path / "mlflow").mkdir()
    server.start()
    try:
        synced = avsiam("tracking", "sync", tmp_path / "out", env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert "still spooled" not in synced.stdout
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("avsiam").experiment_id])
        check_replayed_runs(client, runs, summary)
    finally:
        server.stop()
    assert not list((tmp_path / "out").rglob("tracking_spool.jsonl"))


def check_replayed_runs(client, runs, summary):
    parents = [r for r in runs if "avsiam.stage" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["avsiam.profile"] == "demo"
    parent = parents[0]
    children = {r.data.tags["avsiam.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"stage_data", "pretrain", "finetune", "evaluate"} and len(runs) == 5
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["gpu_hours_total"] > 0 and parent.data.params["model"] == "tiny"
    assert [m.step for m in client.get_metric_history(children["pretrain"].info.run_id, "loss")] == [1, 2]
    assert children["pretrain"].data.metrics["startup_s"] > 0 and children["finetune"].data.metrics["startup_s"] > 0
    assert children["evaluate"].data.metrics["accuracy"] == summary["results"]["finetune_vggsound"]["accuracy"]
    assert children["stage_data"].data.metrics["num_clips"] == 40


def test_tracking_required_makes_an_unreachable_server_an_error_within_seconds(tmp_path):
    began = time.monotonic()
    proc = run_flow(tmp_path, f"http://127.0.0.1:{free_port()}", tracking_required=True)
    elapsed = time.monotonic() - began
    assert proc.returncode != 0
    assert "is unreachable" in proc.stdout + proc.stderr and "tracking_required is set" in proc.stdout + proc.stderr
    assert elapsed < 120  # Prefect's start included; MLflow's own retries would take minutes
    assert not (tmp_path / "out" / "data").exists()  # nothing was staged
