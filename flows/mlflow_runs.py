"""MLflow runs of a pipeline: one parent run per flow run, one child run per stage.

Every run is a :class:`~avsiam.tracking.Tracker` bound to a folder, the same tracker the
training processes use: the parent's folder is ``<output>/flow-runs/<flow run id>``, a stage's
is its stage folder (where its training process logs to the same run). So the flow has the
trainer's resilience: when MLflow is unreachable the flow runs to the end, every record waits
in its folder's spool, children refer to their parent by folder, and the records are replayed
with their nesting when MLflow is back (while the flow runs, by the next flow run, or by
``avsiam tracking sync OUTPUT``). ``tracking_required`` turns an unreachable server into an
error within seconds instead.

The tracking store is ``MLFLOW_TRACKING_URI`` (a server, possibly with an S3 artifact store);
without it the flow sets a local sqlite store in the output folder, which the training
processes it launches inherit. A stage that is re-run after a failure (a new flow run, or a
retry) continues the MLflow run recorded in its folder, as the training process does from its
checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient

from avsiam.tracking import Tracker, redact_credentials
from avsiam.tracking.mlflow_tracker import (
    SPOOL_NAME,
    Spool,
    SyncError,
    apply_http_budget,
    end_running_runs,
    spooled_folders,
    sync_spools,
)

EXPERIMENT = "avsiam"
FLOW_RUNS_DIR = "flow-runs"
FLOW_RUN_TAG = "prefect.flow_run_id"  # of a flow run's parent run


def ensure_tracking_uri(output_dir: Path) -> str:
    """The tracking URI every stage uses (set in the environment the training processes inherit)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        output_dir.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
    return os.environ["MLFLOW_TRACKING_URI"]


def registry_client() -> MlflowClient:
    """A client of the tracking store's model registry (the flow set ``MLFLOW_TRACKING_URI``)."""
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"], registry_uri=os.environ.get("MLFLOW_REGISTRY_URI"))


def require_reachable(tracking_uri: str) -> None:
    """Raise within seconds when the tracking server does not answer (``tracking_required``)."""
    apply_http_budget()
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - whatever MLflow's stores raise, the answer is "unreachable"
        first_line = next(iter(str(exc).strip().splitlines()), "")
        raise RuntimeError(
            f"MLflow at {redact_credentials(tracking_uri)} is unreachable ({type(exc).__name__}: "
            f"{redact_credentials(first_line)[:300]}) and tracking_required is set"
        ) from None


def parent_run(output_dir: Path, flow_run_id: str, tags: Mapping[str, str]) -> Tracker:
    """The flow run's parent run (re-opened on a retry of the same flow run)."""
    name = f"avsiam-{tags.get('avsiam.profile', '')}-{flow_run_id[:8]}"
    return Tracker.start(output_dir / FLOW_RUNS_DIR / flow_run_id, experiment=EXPERIMENT, run_name=name,
                         tags={FLOW_RUN_TAG: flow_run_id, **tags}, run_id_from_env=False)


def stage_run(stage_dir: Path, parent_dir: str | None, stage: str, tags: Mapping[str, str], run_id: str | None = None) -> Tracker:
    """The stage's child run: ``run_id``, else the one recorded (or still spooled) in
    ``stage_dir``, else a new one."""
    run_name = "-".join(v for v in (stage, tags.get("avsiam.recipe")) if v)
    return Tracker.start(stage_dir, experiment=EXPERIMENT, run_name=run_name, run_id=run_id,
                         tags={"avsiam.stage": stage, **tags}, parent_dir=parent_dir, run_id_from_env=False)


def end_runs_of_flow_run(flow_run_id: str, output_dir: str | None, status: str) -> list[str]:
    """End the MLflow runs of flow run ``flow_run_id`` that are still RUNNING (its parent run
    and its stages' runs) with ``status``; returns their ids. The flow's ``on_crashed`` and
    ``on_cancellation`` hooks call it: they run in the worker's process after the flow's own
    process was killed (cancelled, crashed, lost its infrastructure), which could not end them;
    ``on_failure`` too, for runs a failing flow left behind.
    The store is the worker's ``MLFLOW_TRACKING_URI``, else the local store the flow would have
    created in ``output_dir``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = Path(output_dir or ".").resolve() / "mlflow.db"
        if not store.exists():
            return []
        uri = f"sqlite:///{store}"
    return end_running_runs(uri, EXPERIMENT, FLOW_RUN_TAG, flow_run_id, status)


def sync_earlier_spools(output_dir: Path, log) -> None:
    """Deliver what earlier flow runs and their stages spooled during an MLflow outage (what
    ``avsiam tracking sync`` does), before this run adds to it."""
    folders = spooled_folders([output_dir])
    if not folders:
        return
    try:
        results = sync_spools(folders)
    except SyncError as exc:
        log.warning("not re-sending tracking records: %s", exc)
        return
    sent = sum(s for s, _ in results.values())
    left = sum(n for _, n in results.values())
    log.info("re-sent %d tracking records that earlier runs spooled during an MLflow outage%s", sent,
             f"; {left} still spooled" if left else "")


def deferred_records(output_dir: Path) -> int:
    """How many tracking records under ``output_dir`` MLflow has not accepted yet."""
    return sum(len(Spool(folder / SPOOL_NAME).read()) for folder in spooled_folders([output_dir]))
