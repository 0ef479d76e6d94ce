"""The ``avsiam`` flow: stage data -> pretrain -> finetune (one or more recipes) -> evaluate.

``prefect deployment run avsiam/full --param profile=demo --param output_dir=PATH`` runs it
through a deployment; ``python -m flows.demo`` runs it in-process (ephemeral Prefect). A new
run with the same inputs skips every completed stage (content-keyed cache, results persisted
under ``output_dir``); a stage that failed continues from its checkpoint; ``force`` recomputes
the named stages. Every stage has an MLflow child run under the flow run's parent run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_logger

from avsiam import __version__
from avsiam.config import resolve_recipe
from avsiam.tracking import Tracker, redact_credentials, registry
from avsiam.tracking.registry import GateDecision
from flows import mlflow_runs
from flows.params import DatasetSource, LauncherSettings, PipelineConfig, StageName, StageOverrides, resolve_pipeline
from flows.stages import (
    DataManifest,
    EvalManifest,
    TrainManifest,
    evaluate_stage,
    gate_stage,
    register_stage,
    stage_data,
    stage_key,
    train_stage,
)


def _source_fingerprint(source: DatasetSource) -> str:
    """What identifies the source's content: its spec for synthetic data, else a listing digest."""
    if source.is_synthetic:
        return stage_key("synthetic", source.synthetic.model_dump())
    from avsiam.data.sources import source_fingerprint

    return source_fingerprint(source.source, source.labels, source.classes_csv)


def _result_storage(out: Path, results_store: str | None):
    """Where stage results (the cache records) persist: ``results_store`` (an s3:// prefix, read
    with the environment's AWS credentials, which are never stored in the block) or, by
    default, ``output_dir/.prefect-results``. Prefect needs the block saved server-side."""
    import os

    from avsiam.storage.digest import data_digest

    name = "avsiam-results-" + data_digest(str(results_store or out))[:12]
    if results_store:
        from prefect_aws import AwsCredentials, S3Bucket
        from prefect_aws.client_parameters import AwsClientParameters

        from avsiam.storage.s3 import parse_s3_uri

        bucket, prefix = parse_s3_uri(results_store)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        block = S3Bucket(bucket_name=bucket, bucket_folder=prefix,
                         credentials=AwsCredentials(aws_client_parameters=AwsClientParameters(endpoint_url=endpoint)))
    else:
        block = LocalFileSystem(basepath=str(out / ".prefect-results"))
    block.save(name, overwrite=True)
    return block


def _check_stores(config: PipelineConfig, *stores: str | None) -> None:
    """Bad S3 credentials, endpoint or bucket fail the flow here, before any stage runs."""
    sources = [config.dataset, *config.finetune_datasets.values()]
    s3_sources = [s.source for s in sources if s.source.startswith("s3://")]
    stores = tuple(s for s in stores if s and s.startswith("s3://"))
    if not (s3_sources or stores):
        return
    from avsiam.storage.s3 import check_access

    for uri in s3_sources:
        check_access(uri)
    for uri in stores:
        check_access(uri, write=True)


def _with_options(task_fn, stage: str, config: PipelineConfig, storage):
    return task_fn.with_options(result_storage=storage, refresh_cache=stage in config.force)


def _end_tracking(status: str):
    """A flow-run state hook that ends the flow run's MLflow runs left RUNNING with ``status``."""

    def hook(_flow, flow_run, _state) -> None:
        log = get_logger("avsiam.flow")
        try:
            ended = mlflow_runs.end_runs_of_flow_run(str(flow_run.id), flow_run.parameters.get("output_dir"), status)
        except Exception as exc:  # noqa: BLE001 - a hook must not fail the state change; say why instead
            log.warning("could not end the MLflow runs of flow run %s: %s", flow_run.id, redact_credentials(str(exc))[:300])
            return
        if ended:
            log.warning("flow run %s ended without closing its MLflow runs: marked %s %s", flow_run.id, ", ".join(ended), status)

    hook.__name__ = f"end_mlflow_runs_{status.lower()}"
    return hook


@flow(name="avsiam", log_prints=True, on_failure=[_end_tracking("FAILED")], on_crashed=[_end_tracking("FAILED")],
      on_cancellation=[_end_tracking("KILLED")])
def avsiam_pipeline(
    profile: str = "demo",
    output_dir: str = "avsiam_runs",
    model: str | None = None,
    dataset: DatasetSource | None = None,
    finetune_datasets: dict[str, DatasetSource] | None = None,
    pretrain_recipe: str | None = None,
    finetune_recipes: list[str] | None = None,
    launcher: LauncherSettings | None = None,
    overrides: StageOverrides | None = None,
    variant: str | None = None,
    force: list[StageName] | None = None,
    checkpoint_store: str | None = None,
    results_store: str | None = None,
    data_store: str | None = None,
    ray_address: str | None = None,
    tracking_required: bool = False,
    register_model: bool | None = None,
    promotion_margin: float | None = None,
) -> dict[str, Any]:
    """Run the AVSiam pipeline for ``profile`` (demo, paper-base, paper-large, paper-huge);
    explicit parameters override the profile's values. ``checkpoint_store``: an s3:// prefix
    the DeepSpeed checkpoints are synced to (only their URI is logged to MLflow);
    ``results_store``: an s3:// prefix for the stage cache records (default: output_dir);
    ``data_store``: a folder or s3:// prefix the staged shards go to (default: output_dir/data),
    which training then reads; ``ray_address``: the Ray cluster staging runs on (``auto``,
    ``ray://head:10001``; default: a temporary local cluster of each source's ``workers`` CPUs);
    ``tracking_required``: fail within seconds when MLflow is unreachable, instead of running
    with tracking deferred (records spooled in the run folders, sent when MLflow is back);
    ``register_model`` (default true): register every finetuned model in the MLflow Model
    Registry as ``avsiam-<model>-<recipe>`` and promote it to ``champion`` only when it scores at
    least ``promotion_margin`` (default 0) above the current champion on the same test split."""
    log = get_run_logger()
    config = resolve_pipeline(profile, output_dir, model=model, dataset=dataset, finetune_datasets=finetune_datasets,
                              pretrain_recipe=pretrain_recipe, finetune_recipes=finetune_recipes, launcher=launcher,
                              overrides=overrides, variant=variant, force=force, register_model=register_model,
                              promotion_margin=promotion_margin)
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_stores(config, checkpoint_store, results_store, data_store)
    tracking_uri = mlflow_runs.ensure_tracking_uri(out)
    if tracking_required:
        mlflow_runs.require_reachable(tracking_uri)
    mlflow_runs.sync_earlier_spools(out, log)
    storage = _result_storage(out, results_store)
    ctx = get_run_context()
    deployment = getattr(ctx.flow_run, "deployment_id", None)
    parent = mlflow_runs.parent_run(out, str(ctx.flow_run.id), {
        "avsiam.profile": profile, "avsiam.version": __version__, "avsiam.model": config.model,
        "prefect.deployment_id": str(deployment or ""), "prefect.flow_run_name": ctx.flow_run.name,
    })
    parent.log_params(config.model_dump(mode="json"))
    log.info("MLflow: %s (parent run %s)", redact_credentials(tracking_uri), parent.run_id or "not created yet: MLflow unreachable")
    with parent:  # FINISHED, or FAILED (KILLED on cancellation) whatever a stage raises
        summary = _run_stages(config, out, storage, parent, checkpoint_store, data_store, ray_address, str(ctx.flow_run.id))
    summary["mlflow_parent_run_id"] = parent.run_id
    deferred = mlflow_runs.deferred_records(out)
    summary["tracking"] = f"deferred: {deferred} records spooled" if deferred else "live"
    if deferred:
        log.warning("tracking deferred: MLflow at %s did not accept %d records; they are kept in the run folders and sent "
                    "when it is back (by the next flow run, or now: avsiam tracking sync %s)",
                    redact_credentials(tracking_uri), deferred, out)
    return summary


def _run_stages(config: PipelineConfig, out: Path, storage, parent: Tracker, checkpoint_store: str | None,
                data_store: str | None, ray_address: str | None, flow_run_id: str) -> dict[str, Any]:
    datasets: dict[str, Any] = {}

    def staged(source: DatasetSource):
        """Stage each distinct source once. Its folder is named by what the source *is*, not
        by its content, so re-staging changed content decodes only the changed shards there."""
        folder = stage_key("dataset", source.model_dump(include={"source", "labels", "classes_csv", "synthetic"}))[:16]
        key = stage_key("stage_data", {"source": source.model_dump(exclude={"workers"}), "content": _source_fingerprint(source),
                                       "data_store": data_store})
        if key not in datasets:
            location = f"{data_store.rstrip('/')}/{folder}" if data_store else str(out / "data" / folder / "staged")
            datasets[key] = _with_options(stage_data, "stage_data", config, storage)(
                key=key, source=source, data_dir=str(out / "data" / folder), staged=location, parent_dir=str(parent.output_dir),
                ray_address=ray_address)
        return datasets[key]

    pre_data = staged(config.dataset)
    parent.set_tags({"avsiam.dataset_digest": pre_data.dataset_digest})
    pre_recipe = resolve_recipe(config.model, config.pretrain_recipe, config.overrides.pretrain, variant=config.variant)
    pre_key = stage_key("pretrain", {"recipe": pre_recipe.result_key(),
                                     "data": pre_data.dataset_digest})
    pretrained: TrainManifest = _with_options(train_stage, "pretrain", config, storage)(
        key=pre_key, stage="pretrain", model=config.model, recipe=config.pretrain_recipe, overrides=config.overrides.pretrain,
        variant=config.variant, data=pre_data, init=None, run_dir=str(out / "pretrain" / pre_key[:16]),
        launcher=config.launcher_for("pretrain"), parent_dir=str(parent.output_dir), checkpoint_store=checkpoint_store)

    evaluations: list[EvalManifest] = []
    decisions: dict[str, GateDecision | None] = {}
    stage_hours = {"pretrain": pretrained.gpu_hours}
    for recipe_name in config.finetune_recipes:
        data = staged(config.dataset_for(recipe_name))
        recipe = resolve_recipe(config.model, recipe_name, config.overrides.finetune, variant=config.variant)
        ft_key = stage_key("finetune", {"recipe": recipe.result_key(),
                                        "data": data.dataset_digest, "init": pretrained.weights_digest})
        finetuned: TrainManifest = _with_options(train_stage, "finetune", config, storage)(
            key=ft_key, stage="finetune", model=config.model, recipe=recipe_name, overrides=config.overrides.finetune,
            variant=config.variant, data=data, init=pretrained, run_dir=str(out / "finetune" / recipe_name / ft_key[:16]),
            launcher=config.launcher_for("finetune"), parent_dir=str(parent.output_dir), checkpoint_store=checkpoint_store)
        stage_hours[f"finetune:{recipe_name}"] = finetuned.gpu_hours
        ev_key = stage_key("evaluate", {"recipe": recipe_name, "model": config.model, "variant": config.variant,
                                        "data": data.dataset_digest, "weights": finetuned.weights_digest})
        evaluation = _with_options(evaluate_stage, "evaluate", config, storage)(
            key=ev_key, model=config.model, recipe=recipe_name, overrides=config.overrides.finetune, variant=config.variant,
            data=data, finetuned=finetuned, run_dir=str(out / "evaluate" / recipe_name / ev_key[:16]), parent_dir=str(parent.output_dir))
        with mlflow_runs.stage_run(Path(evaluation.run_dir), str(parent.output_dir), "evaluate", {},
                                   run_id=evaluation.mlflow_run_id) as evaluate_run:
            evaluate_run.log_metrics({"pipeline_gpu_hours": pretrained.gpu_hours + finetuned.gpu_hours})
        evaluations.append(evaluation)
        if config.register_model:
            decisions[recipe_name] = _register_and_gate(config, storage, parent, finetuned, evaluation, data, flow_run_id,
                                                        out / "gate" / recipe_name)

    total = sum(stage_hours.values())
    headline = {f"{e.recipe}.{e.metric}": e.results[e.metric] for e in evaluations}
    parent.log_metrics({"gpu_hours_total": total, **headline})
    table = _results_markdown(config, evaluations, stage_hours, decisions)
    create_markdown_artifact(key="avsiam-results", markdown=table, description="AVSiam pipeline results and GPU-hours")
    return {
        "output_dir": str(out), "gpu_hours_total": total, "stage_gpu_hours": stage_hours,
        "pretrain": pretrained.model_dump(), "results": {e.recipe: e.results for e in evaluations}, "results_markdown": table,
        "registry": {recipe: d.model_dump() if d else None for recipe, d in decisions.items()},
    }


def _register_and_gate(config: PipelineConfig, storage, parent: Tracker, finetuned: TrainManifest, evaluation: EvalManifest,
                       data: DataManifest, flow_run_id: str, gate_dir: Path) -> GateDecision | None:
    """Register the finetuned model as the challenger and run the gate; the decision, both
    scores and the reason go to the parent run. None when the model could not be registered."""
    name = registry.registered_model_name(config.model, evaluation.recipe)
    version = register_stage(finetuned, name, data.dataset_digest, flow_run_id)
    if version is None:
        return None
    champion_version = registry.alias_version(mlflow_runs.registry_client(), name, registry.CHAMPION)
    key = stage_key("gate", {"model": name, "challenger": version, "champion": champion_version, "data": data.dataset_digest,
                             "margin": config.promotion_margin})
    decision = _with_options(gate_stage, "gate", config, storage)(
        key=key, name=name, version=version, evaluation=evaluation, data=data, champion_version=champion_version,
        promotion_margin=config.promotion_margin, run_dir=str(gate_dir / key[:16]))
    recipe, metric = evaluation.recipe, decision.metric
    parent.log_metrics({f"{recipe}.challenger_{metric}": decision.challenger_score,
                        **({f"{recipe}.champion_{metric}": decision.champion_score} if decision.champion_score is not None else {})})
    parent.set_tags({f"avsiam.gate.{recipe}": "promoted" if decision.promoted else "kept challenger",
                     f"avsiam.gate.{recipe}.reason": decision.reason, f"avsiam.gate.{recipe}.model": f"{name}/{version}",
                     f"avsiam.gate.{recipe}.champion": decision.challenger_version if decision.promoted else champion_version})
    return decision


def _results_markdown(config: PipelineConfig, evaluations: list[EvalManifest], stage_hours: dict[str, float],
                      decisions: dict[str, GateDecision | None]) -> str:
    lines = [f"## avsiam `{config.profile}`: model {config.model}", "",
             "| recipe | metric | multimodal | audio-only | visual-only | GPU-hours |",
             "| --- | --- | --- | --- | --- | --- |"]
    for e in evaluations:
        m = e.metric
        hours = stage_hours["pretrain"] + stage_hours[f"finetune:{e.recipe}"]
        audio = e.results.get("audio_only", {}).get(m)
        visual = e.results.get("visual_only", {}).get(m)
        lines.append(f"| {e.recipe} | {m} | {e.results[m]:.4f} | {'-' if audio is None else f'{audio:.4f}'} | "
                     f"{'-' if visual is None else f'{visual:.4f}'} | {hours:.4f} |")
    lines += ["", "GPU-hours of a row: its pretraining and finetuning (wall-clock x devices; CPU ranks count as devices).", "",
              f"GPU-hours in total: {sum(stage_hours.values()):.4f}"]
    if decisions:
        lines += ["", "### Model registry", "", "| recipe | model version | challenger | champion before | decision | reason |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for recipe, d in decisions.items():
            if d is None:
                lines.append(f"| {recipe} | - | - | - | not registered | tracking deferred (MLflow unreachable) |")
                continue
            before = "-" if d.champion_version is None else f"v{d.champion_version}: {d.champion_score:.4f}"
            lines.append(f"| {recipe} | {d.model_name} v{d.challenger_version} | {d.challenger_score:.4f} | {before} | "
                         f"{'promoted to champion' if d.promoted else 'kept as challenger'} | {d.reason} |")
    return "\n".join(lines)
