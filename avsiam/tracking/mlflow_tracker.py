"""MLflow tracking for the training process: one run that survives resumes and tracking outages.

Only rank 0 tracks (:func:`make_tracker` gives other ranks a :class:`NullTracker`). The run is
found the way an orchestrated training needs it:

* tracking URI: ``MLFLOW_TRACKING_URI``, else a sqlite store ``<output_dir>/mlflow.db`` whose
  artifacts go to ``<output_dir>/mlartifacts`` (MLflow would put them under ``./mlruns`` of
  whatever the working directory is);
* run: the explicit ``run_id`` (a resumed checkpoint's), else the run recorded in
  ``<output_dir>/mlflow_run_id`` (the tracker writes it once MLflow has created the run, so
  every process working in the folder, the orchestrator's and the training's, logs to one
  run), else the run whose creation is still waiting in the folder's spool, else
  ``MLFLOW_RUN_ID`` (an orchestrator's run that a new folder attaches to), else a new run in
  the experiment. A new run is a child run when ``parent_run_id`` or
  ``parent_dir`` (the folder of the parent's tracker, resolved when the child is created, so
  a parent created during an outage still nests its children) is given. Re-opening a run sets
  it back to RUNNING.

Params are immutable in MLflow, so :meth:`Tracker.log_params` sends only keys the run does not
have. A key the run already has with a *different* value (a resume with a changed config) is
not sent, which MLflow would reject; it is recorded as the tag
``avsiam.param_changed.<key>`` holding the new value, and a warning names the keys. The tag
is visible and searchable in the UI, where a local file would not be.

Resilience: no tracking failure stops training. A call MLflow does not accept (server down,
timeout, rejected request) logs ONE warning for the outage and puts the tracker in degraded
mode: from then on every record is appended to ``<output_dir>/tracking_spool.jsonl``. The
spool holds exactly the records MLflow has not accepted, in order: it is empty while MLflow
is healthy (the MLflow store is the copy then). The tracker re-sends the spool
(:meth:`Tracker.replay_spool`) on a backoff while the run goes on (``first_retry_s``, then
doubling up to ``reconnect_interval_s``) and at :meth:`Tracker.finish`; once all of it is
accepted, the spool is emptied and tracking is live again. A tracker started in an output
directory with a non-empty spool (a restart after an outage) re-sends it first, and
:func:`sync_spool` (``avsiam tracking sync RUN_DIR``, also run by the next flow run for its
stage folders) delivers what a process that has ended left behind. Each spooled record names
its tracking URI, redacted, so a sync cannot send a run's records to another server.
Re-sending is idempotent: metrics carry their original timestamps (MLflow drops exact
duplicates), params go through the same only-new-keys rule, tags and artifacts overwrite.
Records of a run whose creation never reached MLflow carry no run id; they go to the run
this output directory's tracker ends up with.

Off the training thread: :meth:`Tracker.log_metrics`, the one call a step makes, only queues
its record; a sender thread delivers what has queued, at most once every ``SEND_INTERVAL_S``,
as one ``log_batch`` (or spools it), so neither a round trip nor an outage ever waits in the
step loop, and fast steps cost the server one request a second, not one a step. Every other
call (params, tags, artifacts, the run's start and end: a few per run) first waits for the
queue to drain, then is delivered in order, and :meth:`Tracker.flush` waits for it explicitly
(the trainer calls it before a checkpoint, so a killed run loses no record of the steps it
will not redo). MLflow's own ``log_batch(synchronous=False)`` is not used: it reports a
failure only to a caller that waits for the result, which is what the spool replaces.

HTTP budget: MLflow's client retries a failed request 7 times with exponential backoff and
waits 120 s per request by default, minutes of stalled training per call against a dead
server. The tracker has its own recovery, so its metadata calls run with a 5 s timeout and
no retries, artifact uploads (gigabytes through a proxy) with no retries and MLflow's
timeout. MLflow reads these settings from the environment at every request and has no
per-client setting, so a process that tracks sets the metadata budget once
(:func:`apply_http_budget`, when its first tracker starts), only where the user has not set
them (``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` set by the user
win); an artifact upload lifts the 5 s timeout for its own duration, under a lock every
tracker of the process shares.

Credentials never leave the process: :attr:`Tracker.tracking_uri` and every logged message
go through :func:`redact_credentials`, and the spool holds only the redacted URI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from avsiam.tracking.flatten import flatten_params, truncate

_log = logging.getLogger(__name__)

SPOOL_NAME = "tracking_spool.jsonl"
RUN_ID_NAME = "mlflow_run_id"
LOCAL_STORE_NAME = "mlflow.db"
LOCAL_ARTIFACTS_NAME = "mlartifacts"
PARENT_RUN_TAG = "mlflow.parentRunId"
PARAM_CHANGED_TAG_PREFIX = "avsiam.param_changed."
MAX_TAG_VALUE_LENGTH = 8000  # MLflow rejects longer tag values
DEFAULT_FIRST_RETRY_S = 5.0
DEFAULT_RECONNECT_INTERVAL_S = 120.0  # the longest wait between two delivery attempts
SEND_INTERVAL_S = 1.0  # the sender thread's shortest interval between two metric deliveries

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
Record = dict[str, Any]

# Set once per process where the user has not set them (module docstring, "HTTP budget").
# Ending a run on a server makes MLflow print its URL, user:password included, to stdout (the
# flow's and the training's logs), after one more request to build it: suppressed.
_HTTP_BUDGET = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_budget_set_here: set[str] = set()  # the variables apply_http_budget set (not the user)
_artifact_upload_lock = threading.Lock()

_URI_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")
_SECRET_QUERY_PARAM = re.compile(
    r"(?i)([?&][^=&\s]*(?:token|signature|credential|secret|password|key)[^=&\s]*=)[^&\s]+"
)
_SECRET_ENV_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def redact_credentials(text: str) -> str:
    """``text`` with URI user info, secret-looking query parameters and secret env values masked.

    Exception messages of MLflow's REST client contain the full request URL, user:password
    included, and presigned S3 URLs carry signatures and session tokens.
    """
    text = _URI_USERINFO.sub("***@", text)
    text = _SECRET_QUERY_PARAM.sub(r"\1***", text)
    for name in _SECRET_ENV_VARS:
        if secret := os.environ.get(name):
            text = text.replace(secret, "***")
    return text


def apply_http_budget() -> None:
    """Give this process's MLflow calls the tracker's budget (5 s, no retries), where the user
    has not set them; idempotent. Trackers call it; so do other callers of MLflow's client
    that must fail fast (the flow's reachability check, its state hooks)."""
    for name, value in _HTTP_BUDGET.items():
        if name not in os.environ:
            os.environ[name] = value
            _budget_set_here.add(name)


@contextmanager
def _artifact_upload_timeout() -> Iterator[None]:
    """MLflow's own request timeout for one artifact upload instead of the 5 s budget: a
    proxying server answers once the file is stored, which takes longer for gigabytes."""
    with _artifact_upload_lock:
        lifted = "MLFLOW_HTTP_REQUEST_TIMEOUT" in _budget_set_here and os.environ.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        try:
            yield
        finally:
            if lifted:
                os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = lifted


def recorded_run_id(output_dir: Path) -> str | None:
    """The run MLflow created for ``output_dir``'s tracker, if it has created one."""
    path = output_dir / RUN_ID_NAME
    return (path.read_text().strip() or None) if path.is_file() else None


def local_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside its database (MLflow's default would be
    ``./mlruns`` of whatever the working directory is); a server decides its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / LOCAL_ARTIFACTS_NAME).as_uri()


def _now_ms() -> int:
    return int(time.time() * 1000)


class Spool:
    """Tracking records MLflow has not accepted yet: one JSON object a line, oldest first."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: list[Record]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))

    def read(self) -> list[Record]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # A process killed in the middle of an append leaves a partial last line.
                _log.warning("skipping unreadable line %d of the tracking spool %s", number, self.path)
        return records

    def replace(self, records: list[Record]) -> None:
        """Make ``records`` the spool's whole content (atomically); no records removes the file."""
        if not records:
            self.path.unlink(missing_ok=True)
            return
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(partial, self.path)


def _delivery_batches(records: list[Record]) -> Iterator[list[Record]]:
    """Consecutive metric records of one run as one batch (MLflow sends 1000 metrics a request);
    every other record alone, in order."""
    batch: list[Record] = []
    for record in records:
        if batch and not (record["kind"] == "metrics" == batch[0]["kind"] and record["run_id"] == batch[0]["run_id"]):
            yield batch
            batch = []
        batch.append(record)
    if batch:
        yield batch


class Tracker:
    """Rank 0's MLflow run. Build it with :meth:`start`; see the module docstring for behaviour."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        spool: Spool,
        run_id: str | None,
        reconnect_interval_s: float = DEFAULT_RECONNECT_INTERVAL_S,
        first_retry_s: float = DEFAULT_FIRST_RETRY_S,
    ) -> None:
        apply_http_budget()
        self._uri = tracking_uri
        self.tracking_uri = redact_credentials(tracking_uri)
        self.run_id = run_id
        self.output_dir = spool.path.parent
        self._spool = spool
        self._client: MlflowClient | None = None
        self._reconnect_interval_s = reconnect_interval_s
        self._first_retry_s = first_retry_s
        self._retry_s = min(first_retry_s, reconnect_interval_s)
        # Records left by an earlier process are undelivered: behave as degraded with a
        # reconnect due now, so the first call re-sends them before anything new.
        self._degraded = spool.path.exists()
        self._outage_reported = False
        self._next_reconnect = 0.0
        # The queue of metric records and its sender thread (module docstring, "Off the
        # training thread"); one delivery at a time, whichever thread sends it.
        self._queued: list[Record] = []
        self._sending = False
        self._queue_changed = threading.Condition()
        self._sender: threading.Thread | None = None
        self._closing = False
        self._flushing = 0  # callers waiting in flush(): the sender goes now
        self._delivery = threading.RLock()

    @classmethod
    def start(
        cls,
        output_dir: str | Path,
        *,
        experiment: str = "avsiam",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, object] | None = None,
        parent_run_id: str | None = None,
        parent_dir: str | Path | None = None,
        run_id_from_env: bool = True,
        reconnect_interval_s: float = DEFAULT_RECONNECT_INTERVAL_S,
        first_retry_s: float = DEFAULT_FIRST_RETRY_S,
    ) -> Tracker:
        """Open (create or re-open) the run of ``output_dir`` (see the module docstring for which
        run that is; ``run_id_from_env=False`` ignores ``MLFLOW_RUN_ID``, for an orchestrator
        whose own runs are not the one it may run inside); never raises for a tracking failure."""
        output_dir = Path(output_dir).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        spool = Spool(output_dir / SPOOL_NAME)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / LOCAL_STORE_NAME}"
        tracker = cls(
            uri,
            spool=spool,
            run_id=run_id or recorded_run_id(output_dir),
            reconnect_interval_s=reconnect_interval_s,
            first_retry_s=first_retry_s,
        )
        run_tags = {k: truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in (tags or {}).items()}
        if parent_run_id:
            run_tags[PARENT_RUN_TAG] = parent_run_id
        if tracker.run_id is None and any(r["kind"] == "open" and not r.get("run_id") for r in spool.read()):
            # The run's creation is still spooled (an earlier process of this folder, during an
            # outage): this is that run, not another one.
            tracker._submit({"kind": "tags", "tags": run_tags}, reconnect_now=True)
            return tracker
        if tracker.run_id is None and run_id_from_env:
            tracker.run_id = os.environ.get("MLFLOW_RUN_ID") or None
        tracker._submit(
            {
                "kind": "open",
                "experiment": experiment,
                "artifact_location": local_artifact_location(uri),
                "run_name": run_name,
                "tags": run_tags,
                "parent_dir": str(Path(parent_dir).resolve()) if parent_dir else None,
            },
            reconnect_now=True,
        )
        return tracker

    # --- public logging API -----------------------------------------------------------------

    def log_params(self, params: Mapping[str, object] | BaseModel) -> None:
        """Log the params the run does not have yet; ``params`` may be nested (it is flattened)."""
        self._submit({"kind": "params", "params": flatten_params(params)})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue one step's metrics for the sender thread; returns at once."""
        record = {
            "kind": "metrics",
            "step": 0 if step is None else int(step),
            "timestamp": _now_ms(),
            "metrics": {metric_key(key): float(value) for key, value in metrics.items()},
        }
        with self._queue_changed:
            self._queued.append(record)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_queued, name="avsiam-tracking", daemon=True)
                self._sender.start()
            self._queue_changed.notify_all()

    def flush(self) -> None:
        """Wait until every queued metric record is delivered or spooled."""
        with self._queue_changed:
            self._flushing += 1
            self._queue_changed.notify_all()
            self._queue_changed.wait_for(lambda: not self._queued and not self._sending)
            self._flushing -= 1

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self._submit({"kind": "tags", "tags": {k: truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory; a path that does not exist is skipped with a warning."""
        self._submit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``status``; a degraded tracker tries once more to deliver its spool."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        self._submit({"kind": "status", "status": status, "end_time": _now_ms()}, reconnect_now=True)
        with self._queue_changed:
            sender, self._sender, self._closing = self._sender, None, True
            self._queue_changed.notify_all()
        if sender is not None:
            sender.join()
        self._closing = False

    def reload_folder(self) -> None:
        """Take up what another process of this folder did to the run meanwhile (the training
        process a flow launched into a folder whose run it opened): the run id it recorded when
        it created the run, and the spool as it left it (empty if it delivered the records)."""
        with self._delivery:
            self.run_id = self.run_id or recorded_run_id(self.output_dir)
            self._degraded = self._spool.path.exists()
            self._next_reconnect = 0.0

    def replay_spool(self) -> int:
        """Re-send the spooled records; returns how many MLflow accepted. On a failure the rest
        stays spooled and the tracker stays (or becomes) degraded; never raises."""
        with self._delivery:
            return self._replay_spool()

    def _replay_spool(self) -> int:
        records = self._spool.read()
        sent = 0
        for batch in _delivery_batches(records):
            try:
                self._deliver(batch)
            except Exception as exc:  # noqa: BLE001 - see _submit
                self._spool.replace(records[sent:])
                self._enter_degraded(exc)
                return sent
            sent += len(batch)
        self._spool.replace([])
        if sent or self._outage_reported:
            _log.info("MLflow tracking at %s accepts records again; re-sent %d spooled records", self.tracking_uri, sent)
        self._degraded = self._outage_reported = False
        self._retry_s = min(self._first_retry_s, self._reconnect_interval_s)
        return sent

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # --- delivery ---------------------------------------------------------------------------

    def _send_queued(self) -> None:
        """The sender thread: deliver (or spool) everything queued since its last delivery."""
        last_send = -SEND_INTERVAL_S
        while True:
            with self._queue_changed:
                self._queue_changed.wait_for(lambda: self._queued or self._closing)
                if not self._queued:
                    return  # the run has ended
                self._queue_changed.wait_for(lambda: self._flushing or self._closing,
                                             timeout=last_send + SEND_INTERVAL_S - time.monotonic())
                records, self._queued = self._queued, []
                self._sending = True
            last_send = time.monotonic()
            try:
                self._deliver_or_spool(records)
            finally:
                with self._queue_changed:
                    self._sending = False
                    self._queue_changed.notify_all()

    def _submit(self, record: Record, *, reconnect_now: bool = False) -> None:
        """Deliver (or spool) ``record`` after the metrics queued before it."""
        self.flush()
        self._deliver_or_spool([record], reconnect_now=reconnect_now)

    def _deliver_or_spool(self, records: list[Record], *, reconnect_now: bool = False) -> None:
        """Deliver one record or consecutive metric records; spool them while MLflow fails."""
        with self._delivery:
            for record in records:
                record["run_id"] = self.run_id
                record["tracking_uri"] = self.tracking_uri  # redacted: where a later sync must send it
            if self._degraded:
                self._spool.append(records)
                if reconnect_now or time.monotonic() >= self._next_reconnect:
                    self.replay_spool()
                return
            try:
                self._deliver(records)
            # MLflow's stores raise from requests, sqlalchemy, alembic, botocore and boto3 as well
            # as MlflowException, and no tracking failure may stop training; the warning names
            # the exception type, so a bug still shows.
            except Exception as exc:  # noqa: BLE001
                self._spool.append(records)
                self._enter_degraded(exc)

    def _enter_degraded(self, exc: Exception) -> None:
        self._degraded = True
        self._next_reconnect = time.monotonic() + self._retry_s
        self._retry_s = min(2 * self._retry_s, self._reconnect_interval_s)
        # The first line only: some MLflow errors go on with paragraphs of advice.
        first_line = next(iter(str(exc).strip().splitlines()), "")
        reason = redact_credentials(f"{type(exc).__name__}: {first_line}")[:500]
        if self._outage_reported:
            _log.debug("MLflow tracking still failing: %s", reason)
            return
        self._outage_reported = True
        _log.warning(
            "MLflow tracking at %s failed (%s); training continues, tracking records are kept in %s "
            "and re-sent (every %.0f s at most) until MLflow accepts them, or by `avsiam tracking sync %s`",
            self.tracking_uri,
            reason,
            self._spool.path,
            self._reconnect_interval_s,
            self._spool.path.parent,
        )

    def _mlflow(self) -> MlflowClient:
        # Built at first use inside the guarded delivery: a sqlite store is created (and
        # migrated) by the constructor, which can fail like any other call.
        if self._client is None:
            self._client = MlflowClient(self._uri)
        return self._client

    def _deliver(self, batch: list[Record]) -> None:
        """Send one batch from :func:`_delivery_batches` to MLflow; raises what MLflow raises."""
        first = batch[0]
        kind = first["kind"]
        with _artifact_upload_timeout() if kind == "artifact" else contextlib.nullcontext():
            if kind == "open":
                self._open_run(first)
                return
            run_id = first["run_id"] or self.run_id
            if run_id is None:
                raise MlflowException("no run to log to: opening the run has not reached MLflow yet")
            if kind == "metrics":
                self._send_metrics(run_id, batch)
            elif kind == "params":
                self._send_params(run_id, first["params"])
            elif kind == "tags":
                if first["tags"]:
                    self._mlflow().log_batch(run_id, tags=[RunTag(k, v) for k, v in first["tags"].items()])
            elif kind == "artifact":
                self._send_artifact(run_id, Path(first["path"]), first["artifact_path"])
            elif kind == "status":
                self._mlflow().set_terminated(run_id, first["status"], end_time=first["end_time"])
            else:
                raise ValueError(f"unknown tracking record kind {kind!r}")

    def _open_run(self, record: Record) -> None:
        client = self._mlflow()
        run_id = record["run_id"] or self.run_id
        if run_id is None:
            tags = dict(record["tags"])
            if parent_dir := record.get("parent_dir"):
                parent_id = recorded_run_id(Path(parent_dir))
                if parent_id is None:  # not an outage, but the same remedy: keep it spooled
                    raise MlflowException(f"the parent run (of {parent_dir}) has not reached MLflow yet")
                tags[PARENT_RUN_TAG] = parent_id
            experiment_id = self._experiment_id(record["experiment"], record["artifact_location"])
            run = client.create_run(experiment_id, tags=tags, run_name=record["run_name"])
            self.run_id = run.info.run_id
            (self.output_dir / RUN_ID_NAME).write_text(self.run_id)
            return
        client.update_run(run_id, status="RUNNING")
        if record["tags"]:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        client = self._mlflow()
        if experiment := client.get_experiment_by_name(name):
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            # Another process (the orchestrator, a sibling stage) created it in between.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(name).experiment_id

    def _send_metrics(self, run_id: str, records: list[Record]) -> None:
        metrics = [
            Metric(key, value, record["timestamp"], record["step"])
            for record in records
            for key, value in record["metrics"].items()
        ]
        self._mlflow().log_batch(run_id, metrics=metrics)

    def _send_params(self, run_id: str, params: dict[str, str]) -> None:
        client = self._mlflow()
        existing = client.get_run(run_id).data.params
        new = [Param(key, value) for key, value in params.items() if key not in existing]
        changed = {key: value for key, value in params.items() if key in existing and existing[key] != value}
        client.log_batch(run_id, params=new)
        if changed:
            _log.warning(
                "params %s differ from the values run %s was started with; MLflow params are "
                "immutable, the new values are recorded as tags %s<key>",
                sorted(changed),
                run_id,
                PARAM_CHANGED_TAG_PREFIX,
            )
            client.log_batch(run_id, tags=[RunTag(PARAM_CHANGED_TAG_PREFIX + k, v) for k, v in changed.items()])

    def _send_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        # A missing file is not an outage: spooling it would block the spool for good.
        if not path.exists():
            _log.warning("not logging artifact %s to MLflow: no such file or directory", path)
            return
        if path.is_dir():
            self._mlflow().log_artifacts(run_id, str(path), artifact_path)
        else:
            self._mlflow().log_artifact(run_id, str(path), artifact_path)


_INVALID_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in metric names (e.g. "@") replaced by "_":
    one rejected name would otherwise hold back every record after it."""
    return _INVALID_METRIC_CHARS.sub("_", name)


class SyncError(RuntimeError):
    """A spool cannot be delivered where the configuration points (the message says why)."""


def sync_spool(output_dir: str | Path) -> tuple[int, int]:
    """Deliver the tracking records a process left in ``output_dir``'s spool to the server they
    were meant for; returns (records sent, records still spooled). Never raises for an outage;
    raises :class:`SyncError` when ``MLFLOW_TRACKING_URI`` names another server than the one
    the records were logged for (or is missing where that one had credentials)."""
    output_dir = Path(output_dir).resolve()
    spool = Spool(output_dir / SPOOL_NAME)
    records = spool.read()
    if not records:
        return 0, 0
    recorded = next((r["tracking_uri"] for r in records if r.get("tracking_uri")), None)
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured is None:
        if recorded is not None and "***" in recorded:
            raise SyncError(f"{spool.path}: its records belong to {recorded}; set MLFLOW_TRACKING_URI to it (with credentials)")
        uri = recorded or f"sqlite:///{output_dir / LOCAL_STORE_NAME}"
    else:
        uri = configured
        if recorded is not None and redact_credentials(configured) != recorded:
            raise SyncError(f"{spool.path}: its records belong to {recorded}, not to MLFLOW_TRACKING_URI "
                            f"{redact_credentials(configured)}")
    run_id = next((r["run_id"] for r in records if r.get("run_id")), None) or recorded_run_id(output_dir)
    tracker = Tracker(uri, spool=spool, run_id=run_id)
    sent = tracker.replay_spool()
    return sent, len(records) - sent


def end_running_runs(tracking_uri: str, experiment: str, tag: str, value: str, status: RunStatus) -> list[str]:
    """End with ``status`` the runs still RUNNING of ``experiment`` tagged ``tag = value`` and
    their child runs; returns their ids. For a process that outlives the one that owned the
    runs (an orchestrator's crash hook): the owner's trackers could not end them."""
    apply_http_budget()
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    ids = [found.experiment_id]
    parents = client.search_runs(ids, filter_string=f"tags.`{tag}` = '{value}'")
    children = [run for parent in parents for run in
                client.search_runs(ids, filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")]
    ended = []
    for run in [*children, *parents]:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
            ended.append(run.info.run_id)
    return ended


def spooled_folders(roots: Iterable[str | Path]) -> list[Path]:
    """Every folder at or under ``roots`` that holds a tracking spool."""
    found: set[Path] = set()
    for root in map(Path, roots):
        found.update(p.parent.resolve() for p in [root / SPOOL_NAME, *root.rglob(f"*/{SPOOL_NAME}")] if p.is_file())
    return sorted(found)


def sync_spools(folders: Iterable[str | Path]) -> dict[Path, tuple[int, int]]:
    """:func:`sync_spool` for each folder, repeated while it makes progress: a child run waits for
    its parent's creation, whichever folder holds it. Returns {folder: (sent, left)}."""
    results = {Path(f).resolve(): (0, -1) for f in folders}
    progress = True
    while progress:
        progress = False
        for folder, (sent_before, left_before) in results.items():
            if left_before == 0:
                continue
            sent, left = sync_spool(folder)
            results[folder] = (sent_before + sent, left)
            progress = progress or sent > 0
    return results


class NullTracker:
    """What ranks other than 0 get: the :class:`Tracker` interface, doing nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, object] | BaseModel) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, object]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: RunStatus = "FINISHED") -> None:
        pass

    def replay_spool(self) -> int:
        return 0

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        pass


def make_tracker(rank: int, output_dir: str | Path, **start_kwargs: Any) -> Tracker | NullTracker:
    """A :class:`Tracker` on global rank 0 (``start_kwargs`` go to :meth:`Tracker.start`), a
    :class:`NullTracker` elsewhere, so only one process talks to MLflow."""
    if rank != 0:
        return NullTracker()
    return Tracker.start(output_dir, **start_kwargs)
