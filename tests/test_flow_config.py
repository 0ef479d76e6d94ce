"""The flow's interface: typed parameters, profiles, deployments, early errors (no stage runs)."""

from pathlib import Path

import pytest
import yaml

from avsiam.config import ConfigError
from flows.params import resolve_pipeline

REPO = Path(__file__).resolve().parents[1]


def test_profiles_resolve_and_explicit_values_override():
    demo = resolve_pipeline("demo", "/tmp/out")
    assert (demo.model, demo.dataset.source, demo.launcher.backend, demo.launcher.nproc) == ("tiny", "synthetic", "local", 2)
    assert demo.finetune_recipes == ["finetune_vggsound"]
    huge = resolve_pipeline("paper-huge", "/tmp/out", dataset={"source": "s3://as2m/clips", "labels": ["unbalanced_train_segments.csv"]})
    assert huge.model == "huge" and huge.launcher.nodes * huge.launcher.gpus_per_node == 64
    assert huge.launcher_for("finetune").nodes * huge.launcher_for("finetune").gpus_per_node == 8
    assert set(huge.finetune_recipes) == {"finetune_as20k", "finetune_as2m", "finetune_vggsound"}
    custom = resolve_pipeline("demo", "/tmp/out", model="base", finetune_recipes=["finetune_as20k"], force=["pretrain"])
    assert custom.model == "base" and custom.force == ["pretrain"]


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"profile": "nightly"}, "unknown profile 'nightly'; allowed: demo, paper-base"),
    ({"finetune_recipes": ["finetune_as2k"]}, "unknown recipe 'finetune_as2k'"),
    ({"model": "giant"}, "unknown model 'giant'"),
    ({"overrides": {"pretrain": ["epochz=1"]}}, "did you mean 'epochs'"),
    ({"force": ["pretraining"]}, "force"),
    ({"profile": "paper-base"}, "needs a dataset"),
    ({"launcher": {"backend": "mesos"}}, "launcher.backend"),
])
def test_bad_parameters_fail_before_any_stage(kwargs, expected):
    profile = kwargs.pop("profile", "demo")
    with pytest.raises(ConfigError, match=expected):
        resolve_pipeline(profile, "/tmp/out", **kwargs)


def test_flow_parameters_are_a_typed_form():
    from flows.pipeline import avsiam_pipeline

    schema = avsiam_pipeline.parameters.model_dump()
    props = schema["properties"]
    assert {"profile", "output_dir", "model", "dataset", "finetune_recipes", "launcher", "overrides", "force"} <= props.keys()
    assert avsiam_pipeline.name == "avsiam"
    definitions = schema.get("definitions") or schema.get("$defs")
    assert {"DatasetSource", "LauncherSettings", "StageOverrides"} <= set(definitions)


def test_prefect_yaml_declares_full_and_a_non_overlapping_scheduled_retrain():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in doc["deployments"]}
    assert set(deployments) == {"full", "retrain"}
    for d in deployments.values():
        assert d["entrypoint"] == "flows/pipeline.py:avsiam_pipeline" and d["work_pool"]["name"] == "avsiam-local"
    retrain = deployments["retrain"]
    assert retrain["schedules"][0]["cron"] and retrain["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    from flows.serve import deployments_from_prefect_yaml

    served = {d.name: d for d in deployments_from_prefect_yaml()}
    assert served["retrain"].concurrency_limit == 1 and served["retrain"].schedules[0].schedule.cron == "0 3 * * 0"


def test_a_local_sqlite_store_keeps_the_flows_artifacts_beside_its_database(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever folder the flow runs from (MLflow's default)."""
    from mlflow import MlflowClient

    from avsiam.tracking.mlflow_tracker import local_artifact_location
    from flows import mlflow_runs

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "out").mkdir()
    parent = mlflow_runs.parent_run(tmp_path / "out", "0123abcd", {"avsiam.profile": "demo"})
    parent.finish()
    experiment = MlflowClient(uri).get_experiment_by_name(mlflow_runs.EXPERIMENT)
    assert experiment.artifact_location == (tmp_path / "out" / "mlartifacts").as_uri()
    assert local_artifact_location("http://127.0.0.1:5000") is None  # a server decides
