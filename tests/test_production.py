"""The production-like setup, no mocks: on loopback, a Prefect server on PostgreSQL, a Moto S3
server, an MLflow server (PostgreSQL backend store, artifacts proxied to S3 on Moto) and a
Prefect process worker. The flow is deployed with `prefect deploy` and run with
`prefect deployment run avsiam/full --watch`, staging on a local Ray cluster into S3 and
training from those shards; runs, params, metrics and S3 objects are then checked through
MLflow and boto3. A second scenario kills the training processes in the
middle of finetuning and shows that running the deployment again skips staging and
pretraining and continues finetuning from its checkpoint, in the same MLflow run."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import psycopg2
import pytest

from avsiam.launch.local import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG = "postgresql://postgres@127.0.0.1:5432"
FAST = ["batch_size_per_gpu=4", "num_workers=0", "arch.depth=2"]
DATASET = {"source": "synthetic", "synthetic": {"classes": 4, "clips": 40, "seed": 3}}
DATA_STORE = "s3://avsiam-data/staged"  # staged shards go to S3 and training reads them from there
TRACKING_PASSWORD = "hunter2-tracking"  # in MLFLOW_TRACKING_URI; never to appear in a log
MODEL_NAME = "avsiam-tiny-finetune_vggsound"  # what the finetuned models are registered as


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def create_database(name: str) -> str:
    conn = psycopg2.connect(f"{PG}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"{PG}/{name}"


def drop_database(name: str) -> None:
    conn = psycopg2.connect(f"{PG}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


class Stack:
    """The services, started once for the module and stopped (with their databases) at the end."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs, self.databases = root, [], []
        suffix = uuid.uuid4().hex[:8]
        self.moto_port, self.mlflow_port, self.prefect_port = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(root / "prefect_home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{self.prefect_port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.moto_port}",
            # Credentials in the URI (a proxy with basic auth): they must never reach a log.
            "MLFLOW_TRACKING_URI": f"http://avsiam:{TRACKING_PASSWORD}@127.0.0.1:{self.mlflow_port}",
            # multi-MB weights go through proxied multipart upload (1 MiB parts here)
            "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
            "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(1 << 20),
            "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(1 << 20),
            "AVSIAM_CACHE_DIR": str(root / "node_cache"),  # where training keeps the S3 shards it reads
        }
        self.env.pop("MLFLOW_RUN_ID", None)
        self.start("moto", [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                   extra={"S3_UPLOAD_PART_MIN_SIZE": str(256 * 1024)})
        wait_for(f"http://127.0.0.1:{self.moto_port}/moto-api/")
        s3 = self.s3()
        for bucket in ("mlflow-artifacts", "avsiam-checkpoints", "avsiam-results", "avsiam-data"):
            s3.create_bucket(Bucket=bucket)
        self.databases = [f"avsiam_mlflow_{suffix}", f"avsiam_prefect_{suffix}"]
        mlflow_db = create_database(self.databases[0]).replace("postgresql://", "postgresql+psycopg2://")
        prefect_db = create_database(self.databases[1]).replace("postgresql://", "postgresql+asyncpg://")
        self.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_db, "--artifacts-destination",
                              "s3://mlflow-artifacts", "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"],
                   extra={"MLFLOW_S3_ENDPOINT_URL": self.env["AWS_ENDPOINT_URL"], "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)],
                   extra={"PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db})
        wait_for(f"http://127.0.0.1:{self.mlflow_port}/health", 180)
        wait_for(f"http://127.0.0.1:{self.prefect_port}/api/health", 180)
        bootstrap = subprocess.run([str(BIN / "python"), "-m", "flows.bootstrap"], cwd=REPO, env=self.env, capture_output=True, text=True)
        assert bootstrap.returncode == 0 and bootstrap.stdout.count(": created") == 2, bootstrap.stdout + bootstrap.stderr[-3000:]
        self.cli(["--no-prompt", "deploy", "--all"])
        self.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "avsiam-local", "--limit", "1"])

    def start(self, name: str, argv: list[str], extra: dict | None = None) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(argv, cwd=REPO, env={**self.env, **(extra or {})}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def cli(self, args: list[str], check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"prefect {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n"
                        f"worker log:\n{(self.root / 'worker.log').read_text()[-6000:]}")
        return proc

    def s3(self):
        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing-secret")

    def run_params(self, output_dir: Path, finetune: list[str], **extra: str) -> list[str]:
        params = {
            "profile": "demo", "output_dir": str(output_dir), "dataset": DATASET,
            "overrides": {"pretrain": [*FAST, "max_steps=3"], "finetune": [*FAST, *finetune]},
            "checkpoint_store": "s3://avsiam-checkpoints/runs", "results_store": "s3://avsiam-results/cache", **extra,
        }
        return ["--params", json.dumps(params)]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for name in self.databases:
            drop_database(name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()


@pytest.fixture(scope="module", autouse=True)
def _tracking_uri_restored():
    """``mlflow.set_tracking_uri`` (in :func:`mlflow_runs`) also sets MLFLOW_TRACKING_URI in
    this process's environment: unset both after the module, or later tests' training
    processes would log to this module's stopped server."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def mlflow_runs(stack):
    import mlflow

    mlflow.set_tracking_uri(stack.env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("avsiam")
    assert exp is not None, "no avsiam experiment on the MLflow server"
    return client, mlflow.search_runs([exp.experiment_id])


def test_deployment_run_logs_runs_params_metrics_and_s3_artifacts(stack, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    proc = stack.cli(["deployment", "run", "avsiam/full", *stack.run_params(out, ["max_steps=3"], data_store=DATA_STORE),
                      "--watch", "--watch-timeout", "900"])
    assert "Completed" in proc.stdout, proc.stdout[-3000:]
    client, runs = mlflow_runs(stack)
    parents = runs[runs["tags.avsiam.stage"].isna()]
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert parent["tags.avsiam.profile"] == "demo" and parent["tags.prefect.flow_run_id"]
    assert parent["tags.avsiam.dataset_digest"] and parent["metrics.gpu_hours_total"] > 0
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert set(children["tags.avsiam.stage"]) == {"stage_data", "pretrain", "finetune", "evaluate"}
    # Staged on Ray into S3, and trained from there through the node cache.
    staged = children[children["tags.avsiam.stage"] == "stage_data"].iloc[0]["tags.avsiam.dataset"]
    assert staged.startswith("s3://avsiam-data/staged/")
    from avsiam.data.index import load_index

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, stack.env[name])
    monkeypatch.setenv("AVSIAM_CACHE_DIR", str(tmp_path / "test_cache"))
    index = load_index(staged)
    assert index.dataset_digest == parent["tags.avsiam.dataset_digest"] and len(index.shards) >= 3
    assert {p.name for p in (stack.root / "node_cache").rglob("*.tar")} <= {s.name for s in index.shards}
    assert any((stack.root / "node_cache").rglob("*.tar"))
    for stage in ("pretrain", "finetune"):
        row = children[children["tags.avsiam.stage"] == stage].iloc[0]
        assert row["metrics.gpu_hours"] > 0 and row["params.lr"] and row["params.arch.embed_dim"] == "128"
        assert row["params.weight_decay"] == "5e-07" and row["tags.avsiam.checkpoint_uri"].startswith("s3://avsiam-checkpoints/")
    evaluate = children[children["tags.avsiam.stage"] == "evaluate"].iloc[0]
    assert evaluate["tags.avsiam.recipe"] == "finetune_vggsound"
    assert 0 <= evaluate["metrics.accuracy"] <= 1 and "metrics.audio_only_accuracy" in evaluate
    # Artifacts landed in S3 through the MLflow proxy (the weights by multipart upload) ...
    s3 = stack.s3()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow-artifacts") for o in page.get("Contents", [])]
    for name in ("weights.safetensors", "per_class.csv", "per_class_ap.png", "loss_curve.png", "results.json", "config.yaml"):
        assert any(k.endswith(name) for k in keys), name
    # ... and the DeepSpeed checkpoints were synced straight to S3, only their URI logged.
    ckpt = s3.list_objects_v2(Bucket="avsiam-checkpoints", Prefix="runs/")
    assert any(o["Key"].endswith("/latest") for o in ckpt.get("Contents", []))
    assert s3.list_objects_v2(Bucket="avsiam-results", Prefix="cache/")["KeyCount"] >= 4  # the stage cache records
    # The finetuned model is registered (its run's model, weights inside: stored once) and, the
    # first version of its name, becomes champion; the decision is on the parent run.
    finetune_run = children[children["tags.avsiam.stage"] == "finetune"].iloc[0]["run_id"]
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == "1" and champion.run_id == finetune_run and champion.source == f"runs:/{finetune_run}/model"
    assert champion.tags["avsiam.gate"] == "promoted" and float(champion.tags["test_accuracy"]) == pytest.approx(evaluate["metrics.accuracy"], abs=1e-6)
    assert champion.tags["avsiam.dataset_digest"] == parent["tags.avsiam.dataset_digest"] and float(champion.tags["gpu_hours"]) > 0
    assert parent["tags.avsiam.gate.finetune_vggsound"] == "promoted"
    assert parent["tags.avsiam.gate.finetune_vggsound.reason"] == "first version: there is no champion yet"
    assert sum(k.endswith("weights.safetensors") and f"/{finetune_run}/" in k for k in keys) == 1
    assert any(k.endswith(f"{finetune_run}/artifacts/model/MLmodel") for k in keys)
    # Credentials never reach MLflow params or tags, nor the flow's or the training's logs.
    assert not any("testing-secret" in str(v) for v in runs.to_dict("records")[0].values())
    assert not any(TRACKING_PASSWORD in str(v) for v in runs.to_dict("records")[0].values())
    worker_log = (stack.root / "worker.log").read_text()
    assert "MLflow: http://***@127.0.0.1" in worker_log and TRACKING_PASSWORD not in worker_log


def _prefect_client(stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.env["PREFECT_API_URL"])


def test_bootstrap_created_the_pool_and_the_zombie_run_automation_once(stack):
    again = subprocess.run([str(BIN / "python"), "-m", "flows.bootstrap"], cwd=REPO, env=stack.env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count(": exists") == 2, again.stdout + again.stderr
    with _prefect_client(stack) as client:
        assert client.read_work_pool("avsiam-local").type == "process"
        automations = client.read_automations_by_name("avsiam: crash flow runs whose heartbeats stopped")
    assert len(automations) == 1
    trigger, action = automations[0].trigger, automations[0].actions[0]
    assert trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.Completed" in trigger.expect
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == 3 * 180
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"


def _flow_run_state(stack, flow_run_id: str) -> str:
    with _prefect_client(stack) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def test_killed_finetuning_resumes_when_the_deployment_runs_again(stack, tmp_path):
    """Same dataset and pretraining as the first scenario, so those stages come from the shared
    S3 results store (Cached) and the first run goes straight to finetuning, which is killed."""
    out = tmp_path / "resume"
    finetune = ["max_steps=8", "checkpoint_every=2", "epochs=4"]
    params = stack.run_params(out, finetune, data_store=DATA_STORE)
    first = stack.cli(["deployment", "run", "avsiam/full", *params])
    flow_run_id = next(line.split()[-1] for line in first.stdout.splitlines() if "UUID" in line)
    latest = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        found = list(out.glob("finetune/*/*/checkpoints/latest"))
        if found and found[0].read_text().strip() in ("step2", "step4", "step6"):
            latest = found[0]
            break
        time.sleep(0.2)
    assert latest is not None, "finetuning never wrote its first checkpoint"
    run_dir = latest.parent.parent
    killed = subprocess.run(["pkill", "-KILL", "-f", f"train finetune .*{run_dir}"], capture_output=True)
    assert killed.returncode == 0
    while _flow_run_state(stack, flow_run_id) not in ("FAILED", "CRASHED"):
        assert time.monotonic() < deadline
        time.sleep(2)
    assert not (run_dir / "weights.safetensors").exists()
    mlflow_run_before = (run_dir / "mlflow_run_id").read_text()
    client, _ = mlflow_runs(stack)
    assert client.get_run(mlflow_run_before).info.status == "FAILED"  # not left RUNNING by the killed stage

    second = stack.cli(["deployment", "run", "avsiam/full", *params, "--watch", "--watch-timeout", "900"])
    assert "Completed" in second.stdout
    worker_log = (stack.root / "worker.log").read_text()
    assert "resuming from" in worker_log
    second_id = next(line.split()[-1] for line in second.stdout.splitlines() if "UUID" in line)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _prefect_client(stack) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[second_id])))
    states = {t.name.rsplit("-", 1)[0]: [] for t in task_runs}
    for t in task_runs:
        states[t.name.rsplit("-", 1)[0]].append(t.state.name)
    assert states["stage_data"] == ["Cached"]
    assert "Cached" in states["train"] and "Completed" in states["train"]  # pretrain cached, finetune ran
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # one uninterrupted sequence: continued, not restarted
    assert (run_dir / "mlflow_run_id").read_text() == mlflow_run_before  # the same MLflow run
    # Registered as version 2 and gated against version 1, re-scored on the same test split.
    mlflow_client, _ = mlflow_runs(stack)
    assert mlflow_client.get_model_version(MODEL_NAME, "2").run_id == mlflow_run_before
    parent = _parent_run(stack, second_id)
    challenger = parent["metrics.finetune_vggsound.challenger_accuracy"]
    champion_before = parent["metrics.finetune_vggsound.champion_accuracy"]
    recorded = float(mlflow_client.get_model_version(MODEL_NAME, "1").tags["test_accuracy"])
    assert champion_before == pytest.approx(recorded, abs=1e-6)
    promoted = challenger >= champion_before
    assert parent["tags.avsiam.gate.finetune_vggsound"] == ("promoted" if promoted else "kept challenger")
    assert mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion").version == ("2" if promoted else "1")


def _parent_run(stack, flow_run_id: str):
    _, runs = mlflow_runs(stack)
    parents = runs[runs["tags.prefect.flow_run_id"] == flow_run_id]
    assert len(parents) == 1
    return parents.iloc[0]


def _gated_run(stack, out: Path, finetune: list[str], **extra):
    """Run the deployment; (its parent run, the newest version of the model)."""
    proc = stack.cli(["deployment", "run", "avsiam/full", *stack.run_params(out, finetune, data_store=DATA_STORE, **extra),
                      "--watch", "--watch-timeout", "900"])
    assert "Completed" in proc.stdout
    client, _ = mlflow_runs(stack)
    newest = max(int(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'"))
    return _parent_run(stack, next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID" in line)), str(newest)


def test_the_gate_keeps_a_worse_model_promotes_an_equal_one_and_predict_and_serve_use_the_champion(stack, tmp_path, real_data):
    """A model that cannot clear the margin stays challenger; the champion's recipe trained again
    (forced, in a new folder: a new run) scores the same and takes champion; `avsiam predict`
    and `mlflow models serve` then label the real clips with it, through the registry and the
    S3 artifacts."""
    client, _ = mlflow_runs(stack)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    parent, worse = _gated_run(stack, tmp_path / "worse", ["max_steps=1"], promotion_margin=1.0)
    assert parent["tags.avsiam.gate.finetune_vggsound"] == "kept challenger"
    assert "+ margin 1" in parent["tags.avsiam.gate.finetune_vggsound.reason"]
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == worse
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion.version
    assert client.get_model_version(MODEL_NAME, worse).tags["avsiam.gate"] == "kept challenger"

    # The two earlier scenarios' finetuning recipes, by the max_steps the champion's run logged.
    champion_recipe = {"3": ["max_steps=3"], "8": ["max_steps=8", "checkpoint_every=2", "epochs=4"]}
    again = champion_recipe[client.get_run(champion.run_id).data.params["max_steps"]]
    parent, equal = _gated_run(stack, tmp_path / "equal", again, force=["finetune"])
    assert equal != champion.version
    challenger = parent["metrics.finetune_vggsound.challenger_accuracy"]
    assert challenger == parent["metrics.finetune_vggsound.champion_accuracy"]  # the same training, the same score
    assert parent["tags.avsiam.gate.finetune_vggsound"] == "promoted"
    assert f"challenger accuracy {challenger:.4f} >= champion {challenger:.4f} + margin 0" == parent["tags.avsiam.gate.finetune_vggsound.reason"]
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == equal

    clip = real_data / "KlsG1EnBEjc_000361.mp4"
    uri = f"models:/{MODEL_NAME}@champion"
    predicted = subprocess.run([str(BIN / "avsiam"), "predict", "--model", uri, str(clip), "--json", "--top-k", "3"],
                               env=stack.env, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    record = json.loads(predicted.stdout.splitlines()[-1])
    assert record["clip"] == "KlsG1EnBEjc_000361" and len(record["top"]) == 3
    by_run = subprocess.run([str(BIN / "avsiam"), "predict", "--model", f"runs:/{client.get_model_version(MODEL_NAME, equal).run_id}/model",
                             str(clip), "--json", "--top-k", "3"], env=stack.env, capture_output=True, text=True, timeout=300)
    assert by_run.returncode == 0 and json.loads(by_run.stdout.splitlines()[-1]) == record, by_run.stderr[-3000:]

    port = free_port()
    serve_env = {**stack.env, "PATH": f"{BIN}:{stack.env.get('PATH', '')}"}  # the server execs uvicorn from the venv
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                                   "-p", str(port)], env=serve_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", 180)
        import base64

        body = {"dataframe_records": [{"video": str(clip)}, {"video_bytes": base64.b64encode(clip.read_bytes()).decode()}],
                "params": {"top_k": 3}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert served[0] == record
    assert served[1]["clip"] == "video_bytes[1]" and served[1]["top"] == record["top"]
