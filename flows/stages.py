"""The pipeline's stages as Prefect tasks. Each returns a small manifest, never tensors.

Caching: each stage's cache key is a digest of (stage name, the stage's resolved
configuration, the upstream manifest's digest, the project version), computed by the flow and
persisted with the result, so a *new* flow run with the same inputs finds completed stages
``Cached`` (Prefect's default key contains the flow-run id, and ``TASK_SOURCE`` would
invalidate a 64-GPU stage on a cosmetic edit). The stage folder is named by the same key: a
stage that failed half-way is re-run in its folder, where training continues from its
checkpoint and its MLflow run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import BaseModel

from avsiam import __version__
from avsiam.eval.report import RESULTS_NAME, EvaluationResults
from avsiam.storage.digest import data_digest, file_digest
from avsiam.tracking import registry
from avsiam.tracking.registry import MODEL_ARTIFACT_PATH, GateDecision
from avsiam.train.divergence import DIVERGED_EXIT_STATUS
from avsiam.train.state import SUMMARY_NAME, RunSummary
from flows import mlflow_runs
from flows.params import DatasetSource, LauncherSettings


class DataManifest(BaseModel):
    location: str  # the staged dataset (folder or s3:// prefix): what --data takes
    dataset_digest: str
    num_clips: int
    splits: dict[str, int]
    shards: int
    quarantined: int
    multi_label: bool
    example_video: str | None = None  # one staged clip's video: the registered models' input example
    mlflow_run_id: str | None  # None while its creation waits in the spool (MLflow unreachable)


class TrainManifest(BaseModel):
    stage: str
    recipe: str
    run_dir: str
    weights_path: str
    weights_digest: str
    checkpoint_uri: str
    gpu_hours: float
    final_validation: dict[str, Any] = {}
    mlflow_run_id: str | None  # None while its creation waits in the spool (MLflow unreachable)


class EvalManifest(BaseModel):
    recipe: str
    run_dir: str
    metric: str
    results: dict[str, Any]
    mlflow_run_id: str | None  # None while its creation waits in the spool (MLflow unreachable)


def stage_key(stage: str, payload: Any) -> str:
    """Digest of (stage, its resolved inputs, project version): the stage's cache key."""
    blob = json.dumps({"stage": stage, "version": __version__, "payload": payload}, sort_keys=True, default=str)
    return data_digest(blob)


def _key_from_parameters(_context, parameters: dict[str, Any]) -> str:
    return parameters["key"]


# What a launched stage needs from the flow's environment, and all a cluster job is given of it:
# the tracking store (the flow may have set a local one) and where S3 is. Credentials are not
# forwarded: a cluster job gets its own (its env_file, a Kubernetes secret); local ranks inherit.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def _launch(entry: list[str], out: Path, launcher: LauncherSettings | None, log_line) -> int:
    """Run ``avsiam <entry>`` (writing into the run folder ``out``) through
    :func:`avsiam.launch.backends.launch`: on the stage's launcher, or (``None``) as one process
    here; supervised as one process group, killed as a whole on cancellation or at the
    wall-clock limit."""
    from avsiam.launch.backends import launch

    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if launcher is None:
        return launch("local", entry, output_dir=out, env=env, log_line=log_line, launcher="python")
    local = launcher.backend == "local"
    return launch(launcher.backend, entry, nodes=launcher.nodes, gpus_per_node=launcher.nproc if local else launcher.gpus_per_node,
                  output_dir=out, env=env, log_line=log_line, wall_clock_limit_s=launcher.wall_clock_limit_s, **launcher.options)


@task(name="stage_data", cache_key_fn=_key_from_parameters, persist_result=True)
def stage_data(key: str, source: DatasetSource, data_dir: str, staged: str, parent_dir: str,
               ray_address: str | None = None) -> DataManifest:
    """Materialise the source (generate, or fetch its label files from S3) and stage it into
    ``staged`` (a folder or s3:// prefix) with the staging flow: one task per shard on Ray."""
    from avsiam.data.staging import StagingRequest
    from flows.staging import run_staging

    log = get_run_logger()
    root = Path(data_dir)
    # The run ends FINISHED, or FAILED (KILLED on cancellation) whatever raises inside.
    with mlflow_runs.stage_run(root, parent_dir, "stage_data", {"avsiam.source": source.source}) as run:
        run.log_params(source.model_dump())
        videos, labels, classes = _materialize(source, root, log)
        request = StagingRequest(labels=labels, out=staged, videos=videos, classes_csv=classes,
                                 val_fraction=source.val_fraction, max_bad_fraction=source.max_bad_fraction,
                                 seed=source.synthetic.seed, clips_per_shard=source.clips_per_shard)
        summary = run_staging(request, address=ray_address, workers=source.workers)
        run.log_metrics({"num_clips": summary.num_clips, "quarantined": summary.quarantined, "shards": summary.shards,
                         "shards_built": summary.shards_built, "clips_decoded": summary.decoded,
                         "clips_copied": summary.copied, "staged_with_warning": summary.staged_with_warning})
        run.set_tags({"avsiam.dataset_digest": summary.dataset_digest, "avsiam.dataset": summary.location})
        _log_dataset_files(run, summary.location, root)
    return DataManifest(location=summary.location, dataset_digest=summary.dataset_digest, num_clips=summary.num_clips,
                        splits=summary.splits, shards=summary.shards, quarantined=summary.quarantined,
                        multi_label=summary.multi_label, example_video=summary.example_video, mlflow_run_id=run.run_id)


def _log_dataset_files(run, location: str, folder: Path) -> None:
    """The index and the quarantine report as artifacts of the stage's MLflow run, copied into
    the stage folder first: a spooled upload must still find its file after this task."""
    from avsiam.data.index import INDEX_NAME, QUARANTINE_NAME
    from avsiam.storage.store import open_store

    store = open_store(location)
    reports = folder / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    for name in (INDEX_NAME, QUARANTINE_NAME):
        (reports / name).write_bytes(store.read_bytes(name))
        run.log_artifact(reports / name)


def _materialize(source: DatasetSource, root: Path, log) -> tuple[str, list[Path], Path | None]:
    """(videos folder or s3:// prefix, local label files, classes csv) of the source, generated
    or fetched as needed; the clips of an S3 source stay in S3."""
    if source.is_synthetic:
        from avsiam.synthetic import generate_synthetic_dataset

        raw = root / "synthetic"
        spec = source.synthetic
        if not (raw / ".complete").exists():
            if raw.exists():
                import shutil

                shutil.rmtree(raw)  # an interrupted generation: start it again
            log.info("generating %d synthetic clips of %d classes", spec.clips, spec.classes)
            generate_synthetic_dataset(raw, spec.classes, spec.clips, multi_label=spec.multi_label, seed=spec.seed,
                                       workers=source.workers, progress=False)
            (raw / ".complete").touch()
        if spec.multi_label:
            return str(raw / "videos"), [raw / "train_segments.csv", raw / "eval_segments.csv"], raw / "class_labels_indices.csv"
        return str(raw / "videos"), [raw / "labels.csv"], None
    from avsiam.data.sources import resolve_source

    layout = resolve_source(source.source, root / "source", label_files=source.labels, classes_csv=source.classes_csv)
    return layout.videos, list(layout.label_files), layout.classes_csv


@task(name="train", cache_key_fn=_key_from_parameters, persist_result=True)
def train_stage(
    key: str,
    stage: str,
    model: str,
    recipe: str,
    overrides: list[str],
    variant: str | None,
    data: DataManifest,
    init: TrainManifest | None,
    run_dir: str,
    launcher: LauncherSettings,
    parent_dir: str,
    checkpoint_store: str | None = None,
) -> TrainManifest:
    """Pretrain or finetune through the training engine; resumes from the run folder's checkpoint.
    A finetuned model is logged as an MLflow pyfunc model (its weights, recipe and classes)."""
    from avsiam.eval.plots import plot_loss_curve
    from avsiam.train.metrics_log import read_jsonl

    log = get_run_logger()
    out = Path(run_dir)
    tags = {"avsiam.recipe": recipe, "avsiam.model": model, "avsiam.dataset_digest": data.dataset_digest}
    entry = ["train", stage, "--model", model, "--recipe", recipe, "--data", data.location, "--output", str(out),
             *(["--init", init.weights_path] if init else []), *(["--variant", variant] if variant else []), *overrides]
    # Opened before the launch, so the training process finds the run in its folder and logs to
    # it; ended FAILED (KILLED on a cancel) by any exception below.
    with mlflow_runs.stage_run(out, parent_dir, stage, tags) as run:
        code = _launch(entry, out, launcher, log.info)
        run.reload_folder()  # the training process may have created the run (its creation was spooled here)
        if code == DIVERGED_EXIT_STATUS:
            raise RuntimeError(f"{stage} ({recipe}) diverged (the log above names the step); resuming would diverge again: "
                               "change the recipe (e.g. a lower lr override) and run the flow again")
        if code != 0:
            raise RuntimeError(f"{stage} ({recipe}) exited with code {code}; run the flow again to resume from "
                               f"{out / 'checkpoints'}")
        summary = RunSummary.read(out)
        weights = Path(summary.weights)
        checkpoint_uri = summary.checkpoint
        if checkpoint_store:
            from avsiam.storage.s3 import sync_tree_to_s3

            checkpoint_uri = f"{checkpoint_store.rstrip('/')}/{stage}/{key[:16]}/checkpoints"
            sync_tree_to_s3(out / "checkpoints", checkpoint_uri)
        plot_loss_curve(read_jsonl(out / "metrics.jsonl"), out.name, out / "loss_curve.png")
        run.set_tags({"avsiam.checkpoint_uri": checkpoint_uri, "avsiam.weights_file": weights.name})
        for path in (out / "config.yaml", out / SUMMARY_NAME, out / "loss_curve.png"):
            run.log_artifact(path)
        if stage == "finetune":
            from avsiam.eval.serving import save_clip_model

            # The model (weights inside) is this run's one copy of the weights in MLflow.
            run.log_artifact(save_clip_model(out, out / "mlflow_model", data.example_video), artifact_path=MODEL_ARTIFACT_PATH)
        else:
            run.log_artifact(weights, artifact_path=MODEL_ARTIFACT_PATH)
    return TrainManifest(stage=stage, recipe=recipe, run_dir=str(out), weights_path=str(weights),
                         weights_digest=file_digest(weights), checkpoint_uri=checkpoint_uri, gpu_hours=summary.gpu_hours,
                         final_validation={k: v for k, v in (summary.final_validation or {}).items() if isinstance(v, (int, float))},
                         mlflow_run_id=run.run_id)


@task(name="register")
def register_stage(finetuned: TrainManifest, name: str, dataset_digest: str, flow_run_id: str) -> str | None:
    """Register the finetuned model (its run's ``model`` artifact) as a new version of
    ``name``, the challenger; returns the version. Idempotent: a run registered before gets
    its version back, so a cached finetuning stage is registered once. Not possible while the
    run's records wait in the spool (MLflow unreachable): said, and skipped (None)."""
    log = get_run_logger()
    if finetuned.mlflow_run_id is None or mlflow_runs.deferred_records(Path(finetuned.run_dir)):
        log.warning("not registering %s: MLflow has not received the finetuning run yet (tracking deferred); "
                    "its model stays in %s", name, finetuned.run_dir)
        return None
    client = mlflow_runs.registry_client()
    logged = {a.path for a in client.list_artifacts(finetuned.mlflow_run_id, MODEL_ARTIFACT_PATH)}
    if f"{MODEL_ARTIFACT_PATH}/MLmodel" not in logged:
        raise RuntimeError(f"finetuning run {finetuned.mlflow_run_id} ({finetuned.run_dir}) has no MLflow model under "
                           f"'{MODEL_ARTIFACT_PATH}' (an earlier avsiam logged only its weights): run the flow with "
                           "force=['finetune'] to log and register it")
    tags = {"avsiam.dataset_digest": dataset_digest, "gpu_hours": f"{finetuned.gpu_hours:.6f}", mlflow_runs.FLOW_RUN_TAG: flow_run_id}
    version = registry.register_version(client, name, finetuned.mlflow_run_id, tags)
    log.info("registered %s version %s (alias %s)", name, version, registry.CHALLENGER)
    return version


@task(name="evaluate", cache_key_fn=_key_from_parameters, persist_result=True)
def evaluate_stage(
    key: str, model: str, recipe: str, overrides: list[str], variant: str | None, data: DataManifest,
    finetuned: TrainManifest, run_dir: str, parent_dir: str,
) -> EvalManifest:
    """Score the finetuned weights on the test split and log the report."""
    from avsiam.eval.plots import plot_per_class_ap

    log = get_run_logger()
    out = Path(run_dir)
    arch_overrides = [o for o in overrides if o.startswith("arch.")]  # evaluation needs the trained architecture
    entry = ["evaluate", "--model", model, "--recipe", recipe, "--weights", finetuned.weights_path, "--data", data.location,
             "--output", str(out), *(["--variant", variant] if variant else []), *arch_overrides]
    with mlflow_runs.stage_run(out, parent_dir, "evaluate", {"avsiam.recipe": recipe, "avsiam.model": model,
                                                             "avsiam.dataset_digest": data.dataset_digest}) as run:
        code = _launch(entry, out, None, log.info)
        if code != 0:
            raise RuntimeError(f"evaluate ({recipe}) exited with code {code}")
        results = EvaluationResults.read(out)
        run.log_params({"recipe": recipe, "model": model, "weights": finetuned.weights_path, "split": results.split})
        run.log_metrics(results.scores())
        plot_per_class_ap(out / "per_class.csv", out / "per_class_ap.png")
        for path in (out / RESULTS_NAME, out / "per_class.csv", out / "per_class_ap.png",
                     Path(finetuned.run_dir) / "loss_curve.png"):
            run.log_artifact(path)
    return EvalManifest(recipe=recipe, run_dir=str(out), metric=results.metric, results=results.model_dump(exclude_none=True),
                        mlflow_run_id=run.run_id)


@task(name="gate", cache_key_fn=_key_from_parameters, persist_result=True)
def gate_stage(
    key: str, name: str, version: str, evaluation: EvalManifest, data: DataManifest, champion_version: str | None,
    promotion_margin: float, run_dir: str,
) -> GateDecision:
    """The champion/challenger gate: score the current champion on the challenger's test split
    (``avsiam evaluate`` with the champion's own recipe and weights), then move ``champion`` to
    the challenger only when it is at least ``promotion_margin`` better. ``champion_version``
    is read by the flow and is part of the cache key: a re-run decides again only when the
    champion changed."""
    log = get_run_logger()
    metric = evaluation.metric
    score = float(evaluation.results[metric])
    if champion_version == version:  # promoted by an earlier run of this gate
        champion_score, promoted, reason = score, True, "already the champion"
    else:
        champion_score = None if champion_version is None else _champion_score(name, champion_version, data, metric,
                                                                                Path(run_dir), log)
        promoted, reason = registry.decide(score, champion_score, promotion_margin, metric)
    decision = GateDecision(model_name=name, metric=metric, challenger_version=version, challenger_score=score,
                            champion_version=champion_version, champion_score=champion_score,
                            promotion_margin=promotion_margin, promoted=promoted, reason=reason)
    registry.apply_decision(mlflow_runs.registry_client(), decision)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "gate.json").write_text(decision.model_dump_json(indent=1) + "\n")
    log.info("%s version %s: %s (%s)", name, version, "promoted to champion" if promoted else "stays challenger", reason)
    return decision


def _champion_score(name: str, version: str, data: DataManifest, metric: str, out: Path, log) -> float:
    """The champion's ``metric`` on ``data``'s test split, by the evaluation the challenger had."""
    import mlflow.artifacts

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(out / f"champion-v{version}")))
    artifacts = model_dir / "artifacts"
    scored = out / f"champion-v{version}-evaluation"
    entry = ["evaluate", "--config", str(artifacts / "config.yaml"), "--weights", str(artifacts / "weights.safetensors"),
             "--data", data.location, "--output", str(scored)]
    code = _launch(entry, scored, None, log.info)
    if code != 0:
        raise RuntimeError(f"scoring the champion ({name} version {version}) on the test split exited with code {code}")
    results = EvaluationResults.read(scored)
    if results.metric != metric:
        raise RuntimeError(f"{name} version {version} is scored by {results.metric}, the challenger by {metric}")
    return results.headline
