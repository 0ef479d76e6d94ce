"""benchmarks/gpu_check.py, run on the CPU with the tiny shape (the GPU run is the same code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avsiam.config import resolve_recipe
from avsiam.plan.compute import train_flops_per_sample

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_real_deepspeed_steps_and_reports_utilisation(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--precisions", "fp32", "bf16", "--batch", "2",
         "--steps", "2", "--warmup", "1", "--peak-tflops", "1", "--profile", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, bf16 = json.loads(out.read_text())
    recipe = resolve_recipe("tiny", "pretrain_as2m", [("batch_size_per_gpu", 2)])
    assert result["flops_per_sample"] == train_flops_per_sample(recipe)
    assert result["samples_per_s"] == pytest.approx(2 / result["step_s"])
    assert result["mfu"] == pytest.approx(result["flops_per_sample"] * result["samples_per_s"] / 1e12)
    assert result["losses_finite"] and result["steps"] == 2
    assert "tiny  fp32     2" in proc.stdout  # the table
    # bf16 runs as on a GPU: DeepSpeed casts the parameters and keeps the buffers (the MAE
    # decoder's position tables) in float32, which once promoted the decoder to float32.
    assert bf16["precision"] == "bf16" and bf16["losses_finite"]
    assert result["profile"]["steps"] == 1 and "top operators by CPU time" in proc.stdout


def test_gpu_check_refuses_a_missing_gpu() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr
