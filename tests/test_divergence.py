"""A diverged run stops at the step it diverged, once, with no weights, no summary and a FAILED
tracking run: the guard alone, then real 2-rank DeepSpeed runs with an absurd learning rate."""

import math

import numpy as np
import pytest
from helpers import avsiam
from mlflow import MlflowClient

from avsiam.train.divergence import DIVERGED_EXIT_STATUS, DivergenceGuard, TrainingDiverged, from_deepspeed, require_finite
from avsiam.train.metrics_log import read_jsonl


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_precision_stops_at_the_first_non_finite_loss_or_gradient_norm(precision):
    guard = DivergenceGuard(precision)
    guard.check_step(1, 4.2, 1e-3, grad_norm=3.0)
    guard.check_step(2, 4.1, 1e-3, grad_norm=None)  # optimizers that do not compute the norm
    with pytest.raises(TrainingDiverged, match=r"step 3 \(lr 0.001\) has loss nan.*no weights or summary.*learning rate"):
        guard.check_step(3, math.nan, 1e-3)
    with pytest.raises(TrainingDiverged, match=r"step 4 \(lr 0.001\) has gradient norm inf \(loss 4\)"):
        guard.check_step(4, 4.0, 1e-3, grad_norm=math.inf)


def test_fp16_tolerates_overflow_steps_until_patience_runs_out():
    guard = DivergenceGuard("fp16", patience=3)
    for step in (1, 2):  # the loss scaler skips these; the next finite loss resets the count
        guard.check_step(step, math.inf, 1e-3)
    guard.check_step(3, 2.0, 1e-3, grad_norm=math.inf)
    assert guard.bad_steps == 0
    guard.check_step(4, math.nan, 1e-3)
    restored = DivergenceGuard("fp16", patience=3)
    restored.load_state_dict(guard.state_dict())  # the count survives a resume
    restored.check_step(5, math.nan, 1e-3)
    with pytest.raises(TrainingDiverged, match="step 6 .*3 consecutive steps with loss nan"):
        restored.check_step(6, math.nan, 1e-3)


def test_deepspeeds_loss_scale_floor_becomes_the_divergence_error():
    floor = Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")
    assert "step 7 (lr 0.01) overflows in fp16 at the minimum loss scale" in str(from_deepspeed(floor, 7, 0.01))
    assert from_deepspeed(RuntimeError("CUDA out of memory"), 7, 0.01) is None


def test_non_finite_validation_outputs_name_what_and_how_many():
    require_finite({"audio": np.ones((3, 2))}, 5, "validation")
    bad = np.ones((3, 2))
    bad[1, 0], bad[2, 1] = np.nan, np.inf
    with pytest.raises(TrainingDiverged, match="validation after step 5 has 2 non-finite values in visual embeddings"):
        require_finite({"audio": np.ones((3, 2)), "visual embeddings": bad}, 5, "validation")


def _tracked_runs(out):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("avsiam")
    return client.search_runs([experiment.experiment_id])


def pretrain_at_lr_1e30(staged, out, *overrides) -> str:
    """Pretrain on 2 ranks at lr 1e30; asserts the run diverged with one error; returns its output."""
    proc = avsiam("train", "pretrain", "--model", "tiny", "--data", staged, "--output", out, "--nproc", "2",
                  "num_workers=0", "arch.depth=2", "lr=1e30", "warmup_steps=0", *overrides, check=False)
    output = proc.stdout + proc.stderr  # the launcher interleaves the ranks' output
    assert proc.returncode == DIVERGED_EXIT_STATUS, output[-3000:]
    assert output.count("avsiam train: error: training diverged") == 1
    return output


@pytest.mark.slow
def test_absurd_learning_rate_stops_the_run_with_one_error_and_nothing_saved(staged_single, tmp_path):
    out = tmp_path / "diverged"
    output = pretrain_at_lr_1e30(staged_single, out, "batch_size_per_gpu=4", "max_steps=4")
    steps = read_jsonl(out / "metrics.jsonl")
    diverged_at = next(r["step"] for r in steps if not math.isfinite(r["loss"]))
    assert f"step {diverged_at} (lr 1e+30) has loss nan" in output and steps[-1]["step"] == diverged_at
    assert "Traceback" not in output
    assert not (out / "weights.safetensors").exists() and not (out / "summary.json").exists()
    (run,) = _tracked_runs(out)
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["avsiam.failure"]


@pytest.mark.slow
def test_divergence_first_seen_by_validation_is_the_same_error_once(staged_single, tmp_path):
    # One optimizer step per epoch (24 to 47 train clips, 2 ranks x 12 a step): its loss is
    # finite, the step itself blows the weights up, and the epoch-end validation shows it.
    out = tmp_path / "diverged"
    output = pretrain_at_lr_1e30(staged_single, out, "batch_size_per_gpu=12", "epochs=2")
    assert "the validation after step 1 has" in output and "non-finite values in audio embeddings" in output
    assert "contains NaN" not in output and "Traceback" not in output
    assert not (out / "weights.safetensors").exists()
    (run,) = _tracked_runs(out)
    assert run.info.status == "FAILED"


def test_output_under_a_regular_file_is_a_named_error(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    staged = tmp_path / "staged"  # the run folder is checked first: no dataset is read
    proc = avsiam("train", "pretrain", "--model", "tiny", "--data", staged, "--output", blocker / "run", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"avsiam train: error: --output {blocker / 'run'}: is under {blocker}, which is a file" in proc.stderr
    proc = avsiam("evaluate", "--model", "tiny", "--recipe", "finetune_vggsound", "--weights", blocker, "--data", staged,
                  "--output", blocker, check=False)
    assert proc.returncode == 2 and f"--output {blocker}: is a file, not a folder" in proc.stderr
