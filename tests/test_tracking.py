"""avsiam.tracking against real MLflow: the default sqlite store, a live server, a dead one.

One MLflow server serves the whole module (a start costs seconds); every test that uses it
works in an experiment of its own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MlflowServer, free_port
from mlflow import MlflowClient

from avsiam.config import resolve_recipe
from avsiam.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    PARAM_CHANGED_TAG_PREFIX,
    SPOOL_NAME,
    NullTracker,
    Tracker,
    flatten_params,
    make_tracker,
    redact_credentials,
)
from avsiam.tracking.flatten import TRUNCATION_MARKER


@pytest.fixture(autouse=True)
def no_mlflow_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides the MLflow configuration; nothing leaks in from the shell."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real MLflow server for this module."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def dead_server_uri() -> str:
    """An http URI where nothing listens (a port just bound and released)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def hung_server_uri() -> Iterator[str]:
    """An http URI whose server accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def unique_experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def spool_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / SPOOL_NAME).read_text().splitlines()]


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- flatten_params -------------------------------------------------------------------------


def test_flatten_params_of_a_resolved_recipe() -> None:
    cfg = resolve_recipe("base", "finetune_as20k")
    flat = flatten_params(cfg)
    assert flat["lr"] == "0.0001"
    assert flat["arch.embed_dim"] == "768"
    assert flat["betas"] == "[0.95, 0.999]"
    assert flat["contrastive_mask_ratios"] == "[0.0, 0.2, 0.4, 0.6, 0.8]"
    assert flat["gpu_type"] == "A5000"  # strings are not quoted
    assert flat["mixup"] == "true" and flat["fusion_lr_multiplier"] == "null"
    assert "arch" not in flat
    assert all(isinstance(v, str) and len(v) <= MAX_PARAM_VALUE_LENGTH for v in flat.values())
    assert flat == flatten_params(cfg.model_dump(mode="json"))
    assert flatten_params(cfg, prefix="cfg")["cfg.arch.depth"] == "12"


def test_flatten_params_truncates_long_values_and_keeps_empty_sections() -> None:
    flat = flatten_params({"note": "x" * 1000, "ratios": list(range(400)), "extra": {}, "a": {"b": {"c": None}}})
    assert len(flat["note"]) == len(flat["ratios"]) == MAX_PARAM_VALUE_LENGTH
    assert flat["note"].endswith(TRUNCATION_MARKER) and flat["ratios"].startswith("[0, 1, 2")
    assert flat["extra"] == "{}"
    assert flat["a.b.c"] == "null"
    with pytest.raises(TypeError):
        flatten_params([1, 2])


# --- the default local store --------------------------------------------------------------------


def test_without_configuration_logs_to_sqlite_in_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    cfg = resolve_recipe("base", "finetune_as20k")
    with Tracker.start(out, run_name="finetune") as tracker:
        assert tracker.tracking_uri == f"sqlite:///{out / 'mlflow.db'}"
        tracker.log_params(cfg)
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4, "samples_per_s": 100.0}, step=step)
        tracker.log_metrics({"gpu_hours": 0.25, "val_mAP": 0.4}, step=1)
        tracker.log_artifact(weights, "weights")
        tracker.set_tags({"avsiam.weights_path": str(weights)})

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "finetune" and run.info.status == "FINISHED"
    assert run.data.params["arch.embed_dim"] == "768" and run.data.params["betas"] == "[0.95, 0.999]"
    assert len(run.data.params) == len(flatten_params(cfg))
    assert metric_steps(client, tracker.run_id, "loss") == [0, 1, 2]
    assert run.data.metrics["gpu_hours"] == 0.25
    assert run.data.tags["avsiam.weights_path"] == str(weights)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "weights")] == ["weights/model.safetensors"]
    # Artifacts stay in the output directory, not in ./mlruns of the working directory.
    assert list((out / "mlartifacts").rglob("model.safetensors"))
    assert not (out / SPOOL_NAME).exists()


# --- a live server --------------------------------------------------------------------------


def test_resume_adds_new_params_and_records_changed_ones(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment = unique_experiment()
    first = Tracker.start(tmp_path, experiment=experiment)
    first.log_params({"lr": 0.1, "epochs": 10})
    first.log_metrics({"loss": 2.0}, step=0)
    first.log_metrics({"loss": 1.5}, step=1)
    first.flush()  # as the trainer does before it saves a checkpoint
    # ... the process dies without finish(); the checkpoint kept first.run_id.

    caplog.set_level(logging.WARNING)
    with Tracker.start(tmp_path, experiment=experiment, run_id=first.run_id) as resumed:
        resumed.log_params({"lr": 0.2, "epochs": 10, "seed": 0})
        resumed.log_metrics({"loss": 1.0}, step=2)

    client = MlflowClient(mlflow_server)
    run = client.get_run(first.run_id)
    assert run.data.params == {"lr": "0.1", "epochs": "10", "seed": "0"}
    assert run.data.tags[PARAM_CHANGED_TAG_PREFIX + "lr"] == "0.2"
    assert f"{PARAM_CHANGED_TAG_PREFIX}epochs" not in run.data.tags
    assert metric_steps(client, first.run_id, "loss") == [0, 1, 2]
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    [warning] = warnings_in(caplog)
    assert "['lr']" in warning.getMessage()


def test_attaches_to_the_run_the_orchestrator_created(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(unique_experiment())
    created = client.create_run(experiment_id, run_name="finetune")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)

    with pytest.raises(RuntimeError), Tracker.start(tmp_path) as tracker:
        assert tracker.run_id == created.info.run_id
        tracker.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("training crashed")

    run = client.get_run(created.info.run_id)
    assert run.data.metrics == {"loss": 1.0}
    assert run.info.status == "FAILED"
    assert len(client.search_runs([experiment_id])) == 1
    assert not (tmp_path / "mlflow.db").exists()


def test_child_run_over_http_with_params_metrics_and_artifact(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(mlflow_server)
    experiment = unique_experiment()
    parent = client.create_run(client.create_experiment(experiment), run_name="flow")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

    tracker = Tracker.start(
        tmp_path / "out", experiment=experiment, run_name="pretrain", tags={"stage": "pretrain"}, parent_run_id=parent.info.run_id
    )
    tracker.log_params(resolve_recipe("base", "finetune_as20k"))
    for step in range(3):
        tracker.log_metrics({"loss": 3.0 - step}, step=step)
    tracker.log_artifact(weights, "weights")
    tracker.finish()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["arch.embed_dim"] == "768"
    assert metric_steps(client, tracker.run_id, "loss") == [0, 1, 2]
    downloaded = client.download_artifacts(tracker.run_id, "weights/model.safetensors", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes() == weights.read_bytes()
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert [c.info.run_id for c in children] == [tracker.run_id]


def test_spool_of_an_outage_is_delivered_by_the_next_start(
    mlflow_server: str, dead_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = unique_experiment()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead_server_uri)
    during_outage = Tracker.start(tmp_path, experiment=experiment, run_name="pretrain")
    during_outage.log_params({"lr": 0.1})
    for step in range(3):
        during_outage.log_metrics({"loss": 3.0 - step}, step=step)
    during_outage.flush()  # as the trainer does before it saves a checkpoint
    # ... the process dies; the restarted one finds the server up again.

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with Tracker.start(tmp_path, experiment=experiment) as restarted:
        restarted.log_metrics({"loss": 0.5}, step=3)

    assert not (tmp_path / SPOOL_NAME).exists()
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == restarted.run_id and run.info.run_name == "pretrain"
    assert run.data.params == {"lr": "0.1"}
    assert metric_steps(client, run.info.run_id, "loss") == [0, 1, 2, 3]
    assert run.info.status == "FINISHED"


def test_reconnects_in_process_once_mlflow_accepts_records_again(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = MlflowClient(mlflow_server)
    experiment = unique_experiment()
    experiment_id = client.create_experiment(experiment)
    client.delete_experiment(experiment_id)  # runs cannot be created: the tracker degrades
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    caplog.set_level(logging.INFO, logger="avsiam.tracking")

    tracker = Tracker.start(tmp_path, experiment=experiment, reconnect_interval_s=0)
    tracker.log_metrics({"loss": 2.0}, step=0)
    tracker.flush()
    assert tracker.run_id is None and len(spool_records(tmp_path)) == 2
    client.restore_experiment(experiment_id)
    tracker.log_metrics({"loss": 1.0}, step=1)  # reconnect due: the spool goes first
    tracker.log_metrics({"loss": 0.5}, step=2)  # live again
    tracker.finish()

    assert tracker.run_id is not None and not (tmp_path / SPOOL_NAME).exists()
    assert metric_steps(client, tracker.run_id, "loss") == [0, 1, 2]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert len(warnings_in(caplog)) == 1
    assert any("accepts records again" in r.getMessage() for r in caplog.records)


def test_metrics_are_queued_while_mlflow_is_slow_and_sent_in_batches(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    threads_before = set(threading.enumerate())  # senders of earlier tests' unfinished runs included
    tracker = Tracker.start(tmp_path, experiment=unique_experiment())
    slow_server, metric_requests = threading.Event(), []
    real_log_batch = MlflowClient.log_batch

    def stalled_log_batch(self, run_id, metrics=(), **kw):
        if metrics:
            metric_requests.append(len(metrics))
            slow_server.wait(60)  # a round trip that takes as long as the test wants
        return real_log_batch(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", stalled_log_batch)
    for step in range(50):  # every call returns while the first request is still in flight
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    client = MlflowClient(mlflow_server)
    assert metric_steps(client, tracker.run_id, "loss") == []
    slow_server.set()
    tracker.flush()
    assert metric_steps(client, tracker.run_id, "loss") == list(range(50))
    assert len(metric_requests) <= 3 and sum(metric_requests) == 100  # batched, not one request a step
    tracker.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert set(threading.enumerate()) <= threads_before  # the sender ended with the run


# --- a dead server ----------------------------------------------------------------------------


def test_dead_server_costs_seconds_warns_once_and_spools(
    dead_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead_server_uri)
    caplog.set_level(logging.DEBUG)
    began = time.monotonic()
    tracker = Tracker.start(tmp_path)
    tracker.log_params(resolve_recipe("base", "finetune_as20k"))
    for step in range(20):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.set_tags({"avsiam.weights_path": "/ckpt/model.safetensors"})
    tracker.finish()
    assert time.monotonic() - began < 10

    assert tracker.run_id is None
    [warning] = warnings_in(caplog)  # from every logger: MLflow's client did not retry
    assert warning.exc_info is None and str(tmp_path / SPOOL_NAME) in warning.getMessage()
    records = spool_records(tmp_path)
    assert [r["kind"] for r in records] == ["open", "params"] + ["metrics"] * 20 + ["tags", "status"]
    assert [r["step"] for r in records if r["kind"] == "metrics"] == list(range(20))
    assert records[1]["params"]["betas"] == "[0.95, 0.999]"


def test_hung_server_stalls_training_once_per_attempt_by_the_users_timeout(
    hung_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", hung_server_uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the user's setting wins over the tracker's 5 s
    began = time.monotonic()
    tracker = Tracker.start(tmp_path)  # times out once, then spools
    for step in range(20):
        tracker.log_metrics({"loss": 1.0}, step=step)
    after_logging = time.monotonic() - began
    tracker.finish()  # one more delivery attempt: one more timeout
    total = time.monotonic() - began
    # MLflow's own default would retry 7 times with backoff: minutes, not seconds.
    assert 1 <= after_logging < 5 and 2 <= total < 8
    assert len(spool_records(tmp_path)) == 22


def test_credentials_in_the_tracking_uri_never_leave_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
    caplog.set_level(logging.DEBUG)
    tracker = Tracker.start(tmp_path, tags={"source": "test"})
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.finish()

    assert tracker.tracking_uri == f"http://***@127.0.0.1:{port}"
    [warning] = warnings_in(caplog)
    assert f"http://***@127.0.0.1:{port}" in warning.getMessage()
    assert "secret" not in caplog.text
    assert "secret" not in (tmp_path / SPOOL_NAME).read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&x=1", "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&x=1"),
        ("token rotated: tok-123 expired", "token rotated: *** expired"),
    ],
)
def test_redact_credentials(text: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    assert redact_credentials(text) == expected


# --- ranks --------------------------------------------------------------------------------------


def test_only_rank_zero_tracks(dead_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_tracker(1, tmp_path / "rank1")
    assert isinstance(worker, NullTracker)
    with worker:
        worker.log_params({"lr": 0.1})
        worker.log_metrics({"loss": 1.0}, step=0)
        worker.log_artifact(tmp_path / "missing")
    assert not (tmp_path / "rank1").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead_server_uri)
    assert isinstance(make_tracker(0, tmp_path / "rank0"), Tracker)


def test_a_run_another_process_of_the_folder_created_from_the_spool_is_taken_up(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow opens a stage's run while MLflow refuses it (its creation spooled in the stage
    folder); the training process it launches creates the run once MLflow accepts records; the
    flow's tracker then logs to that run instead of waiting for one it will never create."""
    client = MlflowClient(mlflow_server)
    experiment = unique_experiment()
    experiment_id = client.create_experiment(experiment)
    client.delete_experiment(experiment_id)  # runs cannot be created: the flow's tracker spools
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    flow_side = Tracker.start(tmp_path, experiment=experiment, run_name="pretrain", run_id_from_env=False)
    assert flow_side.run_id is None and (tmp_path / SPOOL_NAME).exists()
    client.restore_experiment(experiment_id)
    with Tracker.start(tmp_path, experiment=experiment) as training:  # the launched process
        training.log_metrics({"loss": 1.0}, step=0)
    assert training.run_id is not None and not (tmp_path / SPOOL_NAME).exists()

    flow_side.reload_folder()
    flow_side.set_tags({"avsiam.weights_file": "weights.safetensors"})
    flow_side.finish()
    [run] = client.search_runs([experiment_id])
    assert run.info.run_id == training.run_id == flow_side.run_id and run.info.run_name == "pretrain"
    assert run.data.tags["avsiam.weights_file"] == "weights.safetensors" and run.info.status == "FINISHED"
    assert not (tmp_path / SPOOL_NAME).exists()


# --- outages that end -----------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A server of this test alone: the test kills it and brings it back."""
    server = MlflowServer(tmp_path_factory.mktemp("own_server")).start()
    try:
        yield server
    finally:
        server.stop()


def test_spool_is_flushed_on_a_short_backoff_while_the_run_goes_on(
    own_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own_server.url)
    tracker = Tracker.start(tmp_path, experiment="outage", first_retry_s=0.5, reconnect_interval_s=2)
    for step in range(3):
        tracker.log_metrics({"loss": 1.0}, step=step)
    tracker.flush()  # delivered before the outage
    own_server.stop(signal.SIGKILL)
    for step in range(3, 6):
        tracker.log_metrics({"loss": 1.0}, step=step)
    tracker.flush()
    assert len(spool_records(tmp_path)) == 3
    own_server.start()
    step, deadline = 6, time.monotonic() + 30
    while (tmp_path / SPOOL_NAME).exists():  # no finish(), no restart: the backoff delivers it
        assert time.monotonic() < deadline, "the spool was not re-sent while the run went on"
        tracker.log_metrics({"loss": 1.0}, step=step)
        step += 1
        time.sleep(0.2)
    tracker.flush()
    assert metric_steps(MlflowClient(own_server.url), tracker.run_id, "loss") == list(range(step))
    tracker.finish()


def test_records_of_a_run_that_ended_during_the_outage_are_sent_by_tracking_sync(
    own_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own_server.url)
    tracker = Tracker.start(tmp_path, experiment="outage")
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.flush()
    own_server.stop(signal.SIGKILL)  # killed at step 5; the run goes on and ends before it is back
    for step in range(5, 24):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.set_tags({"avsiam.weights": "/runs/x/weights.safetensors"})
    tracker.finish()
    client = MlflowClient(own_server.url)
    cli = [sys.executable, "-m", "avsiam.cli.main", "tracking", "sync", str(tmp_path)]
    env = {**os.environ}
    still_down = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert still_down.returncode == 1 and "21 still spooled" in still_down.stdout

    own_server.start()
    # Another server is not where these records belong: refused, naming both.
    elsewhere = subprocess.run(cli, capture_output=True, text=True, env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert elsewhere.returncode == 2 and f"belong to {own_server.url}, not to MLFLOW_TRACKING_URI http://127.0.0.1:9" in elsewhere.stderr
    synced = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert synced.returncode == 0 and "sent 21 records, all delivered" in synced.stdout, synced.stdout + synced.stderr
    assert not (tmp_path / SPOOL_NAME).exists()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["avsiam.weights"] == "/runs/x/weights.safetensors"
    assert metric_steps(client, tracker.run_id, "loss") == list(range(24))


def test_the_http_budget_is_set_once_per_process_and_lifted_only_around_artifact_uploads(monkeypatch):
    from avsiam.tracking import mlflow_tracker

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(name, "recorded")  # so that the test's end restores the shell's values
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # the user's setting
    monkeypatch.setattr(mlflow_tracker, "_budget_set_here", set())
    mlflow_tracker.apply_http_budget()
    mlflow_tracker.apply_http_budget()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    with mlflow_tracker._artifact_upload_timeout():
        assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # MLflow's own timeout for the upload
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.setattr(mlflow_tracker, "_budget_set_here", set())
    with mlflow_tracker._artifact_upload_timeout():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"  # the user's timeout is left alone
