"""MLflow runs of a pipeline: one parent run per flow run, one child run per stage.

The tracking store is ``MLFLOW_TRACKING_URI`` (a server, possibly with an S3 artifact store);
without it the flow sets a local sqlite store in the output folder, which the training
processes it launches inherit. A stage's child run id is kept in its stage folder, so a stage
that is re-run after a failure (a new flow run, or a retry) continues the same MLflow run, as
the training process does from its checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from avsiam.tracking import SPOOL_NAME, flatten_params
from avsiam.tracking.mlflow_tracker import LOCAL_ARTIFACTS_NAME, SyncError, sync_spool

EXPERIMENT = "avsiam"
RUN_ID_FILE = "mlflow_run_id"


def ensure_tracking_uri(output_dir: Path) -> str:
    """The tracking URI every stage uses (set in the environment the training processes inherit)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        output_dir.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
    return os.environ["MLFLOW_TRACKING_URI"]


def sync_stage_spools(output_dir: Path, log) -> None:
    """Deliver the records stage processes of earlier flow runs spooled during an MLflow outage
    (what ``avsiam tracking sync`` does for one folder), before new stages add to them."""
    for spool in sorted(output_dir.glob(f"*/**/{SPOOL_NAME}")):
        try:
            sent, left = sync_spool(spool.parent)
        except SyncError as exc:
            log.warning("not re-sending tracking records: %s", exc)
            continue
        log.info("%s: re-sent %d tracking records an earlier run spooled during an MLflow outage%s", spool.parent, sent,
                 f"; {left} still spooled" if left else "")


def client() -> MlflowClient:
    return MlflowClient()


def local_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside its database: MLflow's default would be
    ``./mlruns`` in whatever folder the flow happens to run from. A server decides its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / LOCAL_ARTIFACTS_NAME).as_uri()


def experiment_id(c: MlflowClient) -> str:
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp:
        return exp.experiment_id
    return c.create_experiment(EXPERIMENT, artifact_location=local_artifact_location(c.tracking_uri))


def parent_run(flow_run_id: str, tags: Mapping[str, str]) -> str:
    """The flow run's parent run: found by its Prefect flow-run id on a retry, else created."""
    c = client()
    exp = experiment_id(c)
    found = c.search_runs([exp], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = c.create_run(exp, run_name=f"avsiam-{tags.get('avsiam.profile', '')}-{flow_run_id[:8]}", tags={"prefect.flow_run_id": flow_run_id}).info.run_id
    for key, value in tags.items():
        c.set_tag(run_id, key, value)
    return run_id


def stage_run(stage_dir: Path, parent_id: str | None, stage: str, tags: Mapping[str, str]) -> str:
    """The stage's child run: the one recorded in ``stage_dir`` (resumed stage) or a new one."""
    c = client()
    stage_dir.mkdir(parents=True, exist_ok=True)
    recorded = stage_dir / RUN_ID_FILE
    run_id = recorded.read_text().strip() if recorded.exists() else ""
    if run_id:
        c.update_run(run_id, status="RUNNING")
    else:
        all_tags = {"avsiam.stage": stage, **tags}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run_name = "-".join(v for v in (stage, tags.get("avsiam.recipe")) if v)
        run_id = c.create_run(experiment_id(c), run_name=run_name, tags=all_tags).info.run_id
        recorded.write_text(run_id)
    return run_id


def log_params_once(run_id: str, params: Mapping[str, object]) -> None:
    """Params are immutable in MLflow: log only those the run does not have yet."""
    c = client()
    existing = c.get_run(run_id).data.params
    for key, value in flatten_params(dict(params)).items():
        if key not in existing:
            c.log_param(run_id, key, value)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    c = client()
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step)


def set_tags(run_id: str, tags: Mapping[str, object]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    c = client()
    for path in paths:
        if Path(path).exists():
            c.log_artifact(run_id, str(path), artifact_path)


def finish(run_id: str, failed: bool = False) -> None:
    client().set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))
