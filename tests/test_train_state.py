"""The trainer's parts without DeepSpeed: the train state (a checkpoint's client_state), the
checkpoint policy (when to save, what to keep) and the typed run summary and evaluation results."""

import math
import subprocess
import sys
import time

import pytest
import torch

from avsiam.eval.report import EvaluationResults
from avsiam.train.metrics_log import process_age_seconds
from avsiam.train.state import CheckpointPolicy, RunSummary, TrainState


def test_train_state_round_trips_through_a_checkpoint_client_state():
    state = TrainState(tracking_run_id="abc", divergence={"bad_steps": 2}, elapsed_seconds=12.5)
    for _ in range(3):
        state.step_done()
    state.epoch_done({"epoch": 1, "global_step": 3, "tag": "step3", "accuracy": 0.5})
    state.step_done()
    restored = TrainState()
    restored.load_state_dict(state.state_dict())
    assert restored == state
    assert (restored.epoch, restored.step_in_epoch, restored.global_step) == (2, 1, 4)


def test_checkpoints_written_before_the_state_was_typed_still_resume():
    # What the trainer saved as a plain dict: the same keys plus ones the state no longer keeps.
    legacy = {"epoch": 3, "step_in_epoch": 2, "global_step": 14, "sampler": {"epoch": 3, "start": 8, "seed": 0},
              "rng": {"torch": torch.get_rng_state()}, "tracking_run_id": None, "elapsed_seconds": 40.0, "world_size": 2,
              "history": [{"epoch": 1, "global_step": 6, "tag": "step6"}], "divergence": {"bad_steps": 0}}
    state = TrainState()
    state.load_state_dict(legacy)
    assert (state.epoch, state.step_in_epoch, state.global_step, state.elapsed_seconds) == (3, 2, 14, 40.0)
    assert state.history == legacy["history"]


def test_a_corrupt_client_state_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="global_step"):
        TrainState().load_state_dict({"global_step": "many"})


def test_best_epoch_is_the_first_of_the_highest_scores():
    state = TrainState()
    assert state.best_epoch("accuracy") is None
    for epoch, score in enumerate([0.2, 0.7, 0.7, 0.5], start=1):
        state.epoch_done({"epoch": epoch, "tag": f"step{epoch}", "accuracy": score})
    assert state.best_epoch("accuracy")["epoch"] == 2
    assert state.best_epoch("mAP") is None


def _saves(policy: CheckpointPolicy, steps_per_epoch: int, total_steps: int) -> list[tuple[str, int]]:
    """Which steps a run saves at, as the trainer's loop drives the policy."""
    state, saved = TrainState(), []
    while state.global_step < total_steps:
        while state.step_in_epoch < steps_per_epoch and state.global_step < total_steps:
            state.step_done()
            if policy.save_after_step(state, steps_per_epoch, total_steps):
                saved.append(("step", state.global_step))
        if state.step_in_epoch < steps_per_epoch:
            break
        state.epoch_done({})
        saved.append(("epoch end", state.global_step))
    return saved


def test_saves_every_n_steps_inside_epochs_and_at_every_epoch_end():
    assert _saves(CheckpointPolicy(every=2), steps_per_epoch=3, total_steps=9) == [
        ("step", 2), ("epoch end", 3), ("step", 4), ("epoch end", 6), ("step", 8), ("epoch end", 9)]
    assert _saves(CheckpointPolicy(every=0), steps_per_epoch=3, total_steps=6) == [("epoch end", 3), ("epoch end", 6)]


def test_a_run_stopped_inside_an_epoch_saves_where_it_stopped_once():
    assert _saves(CheckpointPolicy(every=2), steps_per_epoch=5, total_steps=4) == [("step", 2), ("step", 4)]
    assert _saves(CheckpointPolicy(every=0), steps_per_epoch=5, total_steps=7) == [("epoch end", 5), ("step", 7)]


def test_pruning_keeps_the_newest_the_protected_and_the_latest():
    tags = {f"step{n}": n for n in (2, 4, 6, 8, 10, 12)}  # numeric order, not text order
    policy = CheckpointPolicy(keep=2)
    assert policy.to_remove(tags, protected={"step4"}, latest="step12") == ["step2", "step6", "step8"]
    assert CheckpointPolicy(keep=1).to_remove(tags, protected=set(), latest="step12") == [
        "step2", "step4", "step6", "step8", "step10"]
    with pytest.raises(ValueError, match="keep"):
        CheckpointPolicy(keep=0)  # the latest checkpoint is always kept


def test_run_summary_and_evaluation_results_round_trip(tmp_path):
    summary = RunSummary(stage="finetune", model="tiny", recipe="finetune_vggsound", global_step=6, weights="/w",
                         checkpoint="/c/step6", selected_epoch=2, selection_metric="val_accuracy", gpu_hours=0.01,
                         wall_seconds=18.0, world_size=2, dataset_digest="d", tracking_run_id=None,
                         history=[{"epoch": 2, "tag": "step6", "accuracy": 0.9}], final_validation={"accuracy": 0.9})
    summary.write(tmp_path)
    assert RunSummary.read(tmp_path) == summary

    results = EvaluationResults(metric="accuracy", split="test", num_clips=60, accuracy=0.95, audio_only={"accuracy": 0.9},
                                audio_only_accuracy=0.9)
    results.write(tmp_path)
    read = EvaluationResults.read(tmp_path)
    assert read == results and read.headline == 0.95
    assert read.scores() == {"accuracy": 0.95, "audio_only_accuracy": 0.9}
    with pytest.raises(ValueError, match="metric 'mAP'"):
        _ = EvaluationResults(metric="mAP", split="test", num_clips=1, accuracy=math.nan).headline


def test_a_process_age_counts_from_its_start_as_its_parent_sees_it():
    """The start-up a run reports (``startup_seconds``): a child that sleeps 1 s before asking is
    at least 1 s old and no older than its parent saw it run, to a clock tick."""
    child = ("import time; time.sleep(1.0); from avsiam.train.metrics_log import process_age_seconds; "
             "print(process_age_seconds())")
    began = time.monotonic()
    age = float(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout)
    seen = time.monotonic() - began
    assert 1.0 <= age <= seen + 0.01
    assert process_age_seconds() > age  # this process (pytest) started before the child
