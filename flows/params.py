"""The flow's typed parameters and their resolution against a profile.

Every parameter is a pydantic type, so the Prefect UI renders a form; ``profile`` names a set
of values in ``profiles.yaml`` (``demo``, ``paper-base``, ``paper-large``, ``paper-huge``) and
explicit parameters override it. :func:`resolve_pipeline` checks everything it can before
any stage runs: unknown profile, model or recipe, a missing dataset, invalid overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from avsiam.config import RECIPES, SIZES, ConfigError, resolve_recipe
from avsiam.config.presets import format_validation_error
from avsiam.launch.backends import BackendName

PROFILES_PATH = Path(__file__).with_name("profiles.yaml")
StageName = Literal["stage_data", "pretrain", "finetune", "evaluate", "gate"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticSpec(Strict):
    """The generated dataset (``avsiam synth``) used when the source is ``synthetic``."""

    classes: int = Field(default=10, ge=2)
    clips: int = Field(default=300, ge=2)
    multi_label: bool = False
    seed: int = 0


class DatasetSource(Strict):
    """Where a stage's clips come from.

    ``source``: ``synthetic`` (generated), a local folder, or an ``s3://bucket/prefix``; a folder
    or prefix holds the clips under ``videos/`` and the label file(s) named in ``labels``
    (relative to it), plus ``classes_csv`` (``class_labels_indices.csv``) for AudioSet layouts
    and CAV-MAE datafiles.
    """

    source: str = "synthetic"
    labels: list[str] = Field(default_factory=lambda: ["labels.csv"])
    classes_csv: str | None = None
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    max_bad_fraction: float = Field(default=0.2, ge=0, le=1)
    clips_per_shard: int = Field(default=1000, ge=1)  # ~0.5 GB shards of AudioSet-sized clips
    workers: int = Field(default=2, ge=1)  # CPUs of the temporary local Ray cluster that stages it

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"


class LauncherSettings(Strict):
    """How training stages run: ``local`` ranks on this machine (``nproc``), or a cluster backend."""

    backend: BackendName = "local"
    nproc: int = Field(default=2, ge=1)
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=8, ge=1)
    wall_clock_limit_s: float | None = Field(default=None, gt=0)
    options: dict[str, str] = Field(default_factory=dict)  # backend options (partition, namespace, ...)


class StageOverrides(Strict):
    """``key=value`` recipe overrides per training stage (e.g. ``max_steps=20``)."""

    pretrain: list[str] = Field(default_factory=list)
    finetune: list[str] = Field(default_factory=list)


class PipelineConfig(Strict):
    """The fully resolved pipeline: what the stages run."""

    profile: str
    output_dir: str
    model: str
    dataset: DatasetSource
    finetune_datasets: dict[str, DatasetSource] = Field(default_factory=dict)
    pretrain_recipe: str = "pretrain_as2m"
    finetune_recipes: list[str]
    launcher: LauncherSettings
    finetune_launcher: LauncherSettings | None = None
    overrides: StageOverrides = Field(default_factory=StageOverrides)
    variant: str | None = None
    force: list[StageName] = Field(default_factory=list)
    register_model: bool = True  # register each finetuned model and gate it against the champion
    promotion_margin: float = Field(default=0.0, ge=0.0)  # a challenger must beat the champion by this much

    def dataset_for(self, recipe: str) -> DatasetSource:
        return self.finetune_datasets.get(recipe, self.dataset)

    def launcher_for(self, stage: str) -> LauncherSettings:
        return self.finetune_launcher if stage != "pretrain" and self.finetune_launcher else self.launcher


def load_profiles() -> dict[str, dict]:
    return yaml.safe_load(PROFILES_PATH.read_text()) or {}


def resolve_pipeline(
    profile: str,
    output_dir: str,
    *,
    model: str | None = None,
    dataset: DatasetSource | dict | None = None,
    finetune_datasets: dict[str, DatasetSource | dict] | None = None,
    pretrain_recipe: str | None = None,
    finetune_recipes: list[str] | None = None,
    launcher: LauncherSettings | dict | None = None,
    overrides: StageOverrides | dict | None = None,
    variant: str | None = None,
    force: list[str] | None = None,
    register_model: bool | None = None,
    promotion_margin: float | None = None,
) -> PipelineConfig:
    """Merge ``profile`` with the explicit values and validate the result (and every recipe)."""
    profiles = load_profiles()
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}; allowed: {', '.join(profiles)} ({PROFILES_PATH})")
    values = dict(profiles[profile])
    explicit = {
        "model": model, "dataset": dataset, "finetune_datasets": finetune_datasets, "pretrain_recipe": pretrain_recipe,
        "finetune_recipes": finetune_recipes, "launcher": launcher, "overrides": overrides, "variant": variant, "force": force,
        "register_model": register_model, "promotion_margin": promotion_margin,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    values = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in values.items()}
    if "dataset" not in values:
        raise ConfigError(f"profile {profile!r} needs a dataset: pass the flow parameter dataset={{\"source\": \"s3://...\"}}")
    try:
        config = PipelineConfig.model_validate({"profile": profile, "output_dir": output_dir, **values})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"flow parameters (profile {profile})", PipelineConfig)) from None
    if config.model not in SIZES:
        raise ConfigError(f"unknown model {config.model!r}; allowed: {', '.join(SIZES)}")
    for recipe in [config.pretrain_recipe, *config.finetune_recipes]:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    # Resolve every stage's recipe now: a bad override fails the flow before any stage runs.
    resolve_recipe(config.model, config.pretrain_recipe, config.overrides.pretrain, variant=config.variant)
    for recipe in config.finetune_recipes:
        resolve_recipe(config.model, recipe, config.overrides.finetune, variant=config.variant)
    return config
