"""The MLflow Model Registry: a registered model per (model size, finetuning recipe), its
versions, and the champion/challenger gate of scheduled retraining.

A finetuning run's model is logged once (the run's ``model`` artifact) and registered from
there, so the registry holds no second copy of the weights. A new version gets the alias
``challenger``; the gate scores it and the current ``champion`` on the same test split and
moves ``champion`` to it only when ``challenger >= champion + margin`` (MLflow's aliases; its
stages are deprecated). The first version of a model becomes champion.
"""

from __future__ import annotations

import math
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_PATH = "model"
READY_TIMEOUT_S = 300.0


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the model and version."""


def registered_model_name(model: str, recipe: str) -> str:
    """``avsiam-<model>-<recipe>``, e.g. ``avsiam-tiny-finetune_vggsound``."""
    return f"avsiam-{model}-{recipe}"


def register_version(client: MlflowClient, name: str, run_id: str, tags: dict[str, str]) -> str:
    """Register the ``model`` artifact of run ``run_id`` as a new version of ``name`` (created
    if needed), with ``tags``, and make it the challenger; returns its version. A run that has
    a version already (a retried stage) gets that version back, not a second one."""
    try:
        client.create_registered_model(name, description="AVSiam finetuned model (avsiam pipeline)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return str(existing[0].version)
    version = client.create_model_version(name, f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", run_id=run_id, tags=tags)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while version.status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise RegistryError(f"{name} version {version.version}: still pending registration after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.5)
        version = client.get_model_version(name, version.version)
    if version.status != "READY":
        raise RegistryError(f"{name} version {version.version}: registration {version.status} ({version.status_message})")
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return str(version.version)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points to, or None (no such alias, or no such model)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)
    return None if version is None else str(version)


class GateDecision(BaseModel):
    """What the gate decided for a challenger, and why: logged to the flow's parent run."""

    model_name: str
    metric: str
    challenger_version: str
    challenger_score: float
    champion_version: str | None  # None: there was no champion
    champion_score: float | None
    promotion_margin: float
    promoted: bool
    reason: str


def decide(challenger_score: float, champion_score: float | None, margin: float, metric: str) -> tuple[bool, str]:
    """(promote?, why): promote when there is no champion, or ``challenger >= champion + margin``;
    a challenger whose score is not finite is never promoted."""
    if not math.isfinite(challenger_score):
        return False, f"the challenger's {metric} is {challenger_score}, not a finite score"
    if champion_score is None:
        return True, "first version: there is no champion yet"
    if not math.isfinite(champion_score):
        return True, f"the champion's {metric} is {champion_score}, not a finite score"
    comparison = f"challenger {metric} {challenger_score:.4f} {{}} champion {champion_score:.4f} + margin {margin:g}"
    if challenger_score >= champion_score + margin:
        return True, comparison.format(">=")
    return False, comparison.format("<")


def apply_decision(client: MlflowClient, decision: GateDecision) -> None:
    """Move the aliases as ``decision`` says and record it on the challenger version."""
    name, version = decision.model_name, decision.challenger_version
    client.set_model_version_tag(name, version, f"test_{decision.metric}", f"{decision.challenger_score:.6f}")
    client.set_model_version_tag(name, version, "avsiam.gate", "promoted" if decision.promoted else "kept challenger")
    client.set_model_version_tag(name, version, "avsiam.gate_reason", decision.reason)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        if alias_version(client, name, CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
