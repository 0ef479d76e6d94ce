"""What a training run carries from step to step and across a resumption, as typed parts that
are state_dict'd and tested without DeepSpeed:

* :class:`TrainState`: where the run is (epoch, step), what it has seen (the epoch-end
  validation history), how long it has run, its tracking run and divergence count. It is the
  ``client_state`` of every DeepSpeed checkpoint, so a resumed run continues exactly.
* :class:`CheckpointPolicy`: when to save and which step checkpoints to keep.
* :class:`RunSummary`: what a finished run reports (``summary.json``), written by the engine
  and read by the flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SUMMARY_NAME = "summary.json"


class TrainState(BaseModel):
    """The position and history of one run; the next step to take is ``global_step + 1``."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)  # older checkpoints carry "sampler" and "rng"

    epoch: int = 1  # the epoch being trained (1-based); recipe.epochs + 1 once all are done
    step_in_epoch: int = 0  # optimizer steps taken in ``epoch``
    global_step: int = 0  # optimizer steps taken in the run
    history: list[dict[str, Any]] = []  # one record per finished epoch: epoch, global_step, tag, validation scores
    elapsed_seconds: float = 0.0  # training time of the sessions before this one
    tracking_run_id: str | None = None
    divergence: dict[str, int] = {}  # DivergenceGuard.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in TrainState.model_validate(state).model_dump().items():
            setattr(self, name, value)

    def step_done(self) -> None:
        self.global_step += 1
        self.step_in_epoch += 1

    def epoch_done(self, record: dict[str, Any]) -> None:
        """Close the epoch with its record (``epoch``, ``global_step``, ``tag`` and scores)."""
        self.history.append(record)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def best_epoch(self, metric: str) -> dict[str, Any] | None:
        """The history record with the highest ``metric`` (the first of equals), if any has it."""
        scored = [h for h in self.history if metric in h]
        return max(scored, key=lambda h: h[metric]) if scored else None


class CheckpointPolicy(BaseModel):
    """When a run saves, and what it keeps.

    Every epoch end saves (after its validation: the record names the checkpoint the scores
    belong to). Inside an epoch a run also saves every ``every`` optimizer steps, and where it
    stops before the epoch's end (``max_steps``). Of the step checkpoints the newest ``keep``
    are kept, plus the protected ones (the best epoch's) and the latest.
    """

    model_config = ConfigDict(frozen=True)

    every: int | None = None  # optimizer steps; None or 0: epoch ends only
    keep: int = Field(default=2, gt=0)

    def save_after_step(self, state: TrainState, steps_per_epoch: int, total_steps: int) -> bool:
        if state.step_in_epoch >= steps_per_epoch:
            return False  # the epoch end saves, after validation
        stopping = state.global_step >= total_steps
        return stopping or bool(self.every and state.global_step % self.every == 0)

    def to_remove(self, step_tags: dict[str, int], protected: set[str], latest: str | None) -> list[str]:
        """The tags (of ``{tag: global_step}``) to delete."""
        by_age = sorted(step_tags, key=step_tags.get)
        return [tag for tag in by_age[: -self.keep] if tag not in protected and tag != latest]


class RunSummary(BaseModel):
    """A finished training run (``summary.json``): its weights and checkpoint, cost and scores."""

    stage: str
    model: str
    recipe: str
    global_step: int
    weights: str  # the consolidated fp32 weights (absolute path)
    checkpoint: str  # the checkpoint they were consolidated from (absolute path)
    selected_epoch: int | None  # finetuning: the best validated epoch; else the last epoch
    selection_metric: str | None  # e.g. val_accuracy, when an epoch was selected by it
    gpu_hours: float  # wall time of all sessions x world size
    wall_seconds: float  # the training loop's, all sessions (steps, validation, checkpoints)
    # The last session's start-up on rank 0, from its process's start to the training loop:
    # imports, process group, deepspeed.initialize, data index, model, opening the MLflow run.
    startup_seconds: float | None = None
    world_size: int
    dataset_digest: str
    tracking_run_id: str | None
    history: list[dict[str, Any]]
    final_validation: dict[str, Any] | None = None  # the selected (or last) epoch's record

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / SUMMARY_NAME
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        return cls.model_validate_json((Path(run_dir) / SUMMARY_NAME).read_text())
