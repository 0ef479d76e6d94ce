"""The model registry and the champion/challenger gate, against a real ``mlflow server``."""

import math

import pytest
from helpers import MlflowServer
from mlflow import MlflowClient

from avsiam.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    GateDecision,
    alias_version,
    apply_decision,
    decide,
    register_version,
    registered_model_name,
)


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promoted"),
    [(0.5, None, 0.0, True), (0.5, 0.5, 0.0, True), (0.49, 0.5, 0.0, False), (0.55, 0.5, 0.1, False),
     (0.61, 0.5, 0.1, True), (math.nan, None, 0.0, False), (math.nan, 0.1, 0.0, False), (0.2, math.nan, 0.0, True)],
)
def test_decide_promotes_only_a_finite_challenger_at_least_margin_better(challenger, champion, margin, promoted):
    decision, reason = decide(challenger, champion, margin, "mAP")
    assert decision is promoted
    assert reason  # always says why
    if champion is not None and math.isfinite(champion) and math.isfinite(challenger):
        assert f"{challenger:.4f}" in reason and f"{champion:.4f}" in reason


def test_registered_model_name_names_model_and_recipe():
    assert registered_model_name("tiny", "finetune_vggsound") == "avsiam-tiny-finetune_vggsound"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield MlflowClient(server.url)
    server.stop()


def _run_with_model(client: MlflowClient, tmp_path) -> str:
    experiment = client.get_experiment_by_name("gate")
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment("gate"))
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    client.log_artifact(run.info.run_id, str(tmp_path / "MLmodel"), "model")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _decision(name, version, score, champion=None, champion_score=None, promoted=True, reason="r") -> GateDecision:
    return GateDecision(model_name=name, metric="accuracy", challenger_version=version, challenger_score=score,
                        champion_version=champion, champion_score=champion_score, promotion_margin=0.0, promoted=promoted,
                        reason=reason)


def test_versions_are_registered_once_per_run_as_challenger_and_the_gate_moves_the_aliases(client, tmp_path):
    name = "avsiam-test-gate"
    first_run = _run_with_model(client, tmp_path)
    v1 = register_version(client, name, first_run, {"avsiam.dataset_digest": "d1"})
    assert v1 == "1" and alias_version(client, name, CHALLENGER) == "1" and alias_version(client, name, CHAMPION) is None
    assert register_version(client, name, first_run, {}) == "1"  # a retried stage: the same version, not a second
    assert client.get_model_version(name, "1").source == f"runs:/{first_run}/model"
    apply_decision(client, _decision(name, "1", 0.5, reason="first version: there is no champion yet"))
    assert alias_version(client, name, CHAMPION) == "1" and alias_version(client, name, CHALLENGER) is None
    tags = client.get_model_version(name, "1").tags
    assert tags["avsiam.gate"] == "promoted" and tags["test_accuracy"] == "0.500000" and tags["avsiam.dataset_digest"] == "d1"

    second_run = _run_with_model(client, tmp_path)
    assert register_version(client, name, second_run, {}) == "2"
    apply_decision(client, _decision(name, "2", 0.4, "1", 0.5, promoted=False, reason="worse"))
    assert alias_version(client, name, CHAMPION) == "1" and alias_version(client, name, CHALLENGER) == "2"
    assert client.get_model_version(name, "2").tags["avsiam.gate_reason"] == "worse"

    third_run = _run_with_model(client, tmp_path)
    assert register_version(client, name, third_run, {}) == "3"
    assert alias_version(client, name, CHALLENGER) == "3"
    apply_decision(client, _decision(name, "3", 0.6, "1", 0.5))
    assert alias_version(client, name, CHAMPION) == "3" and alias_version(client, name, CHALLENGER) is None
    assert alias_version(client, "avsiam-no-such-model", CHAMPION) is None
