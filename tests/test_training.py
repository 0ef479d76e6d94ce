"""The training engine for real: DeepSpeed on 2 CPU ranks, checkpoints, exact resume after a
SIGKILL of the whole process group, ZeRO 1/2/3, 2-rank -> 1-rank finetuning, evaluation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import avsiam
from safetensors.torch import load_file

from avsiam.train.metrics_log import read_jsonl

pytestmark = pytest.mark.slow

# Small and fast: batch 4 per rank, about 3 optimizer steps per epoch on the test dataset.
FAST = ["batch_size_per_gpu=4", "num_workers=0", "arch.depth=2"]


def pretrain(manifest, out, *overrides, nproc=2):
    return avsiam("train", "pretrain", "--model", "tiny", "--data", manifest, "--output", out,
                  *(["--nproc", nproc] if nproc else []), *FAST, *overrides)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference_run(staged_single, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 pretraining run of 8 optimizer steps."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    pretrain(staged_single, out, "max_steps=8", "checkpoint_every=2", "epochs=4")
    return out


def test_pretraining_writes_the_run_folder(reference_run):
    out = reference_run
    config = (out / "config.yaml").read_text()
    assert "max_steps: 8" in config and "stage: pretrain" in config
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"step", "epoch", "loss", "lr", "samples_per_s", "step_time_s", "data_wait_s", "peak_memory_mb"} <= r.keys()
        assert r["samples_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags[-1] == "step8" and len(tags) <= 3  # the last 2 plus (at most) one protected
    weights = load_file(str(out / "weights.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert any(k.startswith("encoder.") for k in weights) and any(k.startswith("decoder.") for k in weights)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["gpu_hours"] > 0 and summary["startup_seconds"] > 0


def test_killed_run_resumes_to_the_same_numbers(staged_single, reference_run, tmp_path):
    """SIGKILL the whole process group after the step-4 (or step-6) checkpoint, start again, and the loss
    sequence from the checkpoint on matches the uninterrupted run to 1e-6."""
    out = tmp_path / "killed"
    segments_before = set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))
    cmd = [sys.executable, "-m", "avsiam.cli.main", "train", "pretrain", "--model", "tiny", "--data", str(staged_single),
           "--output", str(out), "--nproc", "2", *FAST, "max_steps=8", "checkpoint_every=2", "epochs=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.exists() and latest.read_text().strip() in ("step4", "step6")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "weights.safetensors").exists()
    # DeepSpeed's CPU allreduce segments were unlinked at start-up: a killed run leaks no RAM.
    assert set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) <= segments_before
    pretrain(staged_single, out, "max_steps=8", "checkpoint_every=2", "epochs=4")
    expected, resumed = losses(reference_run), losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    a, b = load_file(str(reference_run / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("stage", [0, 1, 3])  # 0: consolidated from mp_rank_00_model_states.pt (weights_only)
def test_zero_stages_give_the_same_losses(staged_single, reference_run, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    pretrain(staged_single, out, "max_steps=3", "epochs=4", f"zero_stage={stage}")
    expected, got = losses(reference_run), losses(out)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5)
    assert load_file(str(out / "weights.safetensors")).keys() == load_file(str(reference_run / "weights.safetensors")).keys()


def test_finetune_from_two_ranks_on_one_then_evaluate(staged_single, reference_run, tmp_path):
    out = tmp_path / "finetune"
    avsiam("train", "finetune", "--model", "tiny", "--recipe", "finetune_vggsound", "--init", reference_run / "weights.safetensors",
           "--data", staged_single, "--output", out, *FAST, "max_steps=4", "epochs=2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["global_step"] == 4
    weights = load_file(str(out / "weights.safetensors"))
    assert any(k.startswith("heads.multimodal") for k in weights)
    ev = tmp_path / "eval"
    avsiam("evaluate", "--model", "tiny", "--recipe", "finetune_vggsound", "--weights", out / "weights.safetensors",
           "--data", staged_single, "--output", ev, "arch.depth=2")
    results = json.loads((ev / "results.json").read_text())
    assert results["metric"] == "accuracy" and 0 <= results["accuracy"] <= 1
    assert {"accuracy"} <= results["audio_only"].keys() and {"accuracy"} <= results["visual_only"].keys()
    header = (ev / "per_class.csv").read_text().splitlines()[0]
    assert header == "index,mid,display_name,num_positives,ap_multimodal,ap_audio,ap_visual"
    again = tmp_path / "eval_again"
    avsiam("evaluate", "--model", "tiny", "--recipe", "finetune_vggsound", "--weights", out / "weights.safetensors",
           "--data", staged_single, "--output", again, "arch.depth=2")
    assert json.loads((again / "results.json").read_text()) == results  # deterministic


def test_finetune_from_a_published_pretrained_checkpoint_builds_its_architecture_and_logs_the_load(staged_single, tmp_path):
    from helpers import published_checkpoint
    from mlflow import MlflowClient

    from avsiam.config import resolve_recipe
    from avsiam.data.index import load_index
    from avsiam.model import build_finetune_model_from_recipe

    recipe = resolve_recipe("tiny", "finetune_vggsound", FAST, variant="published")
    model = build_finetune_model_from_recipe(recipe, load_index(staged_single).num_classes)
    pretrained = {k: v for k, v in published_checkpoint(model).items() if not k.startswith("module.mlp_head")}
    torch.save(pretrained, tmp_path / "published_pretrained.pth")
    out = tmp_path / "finetune"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # this test's own tracking store, whatever earlier tests set
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": store}
    proc = avsiam("train", "finetune", "--model", "tiny", "--recipe", "finetune_vggsound", "--init", tmp_path / "published_pretrained.pth",
                  "--data", staged_single, "--output", out, *FAST, "max_steps=2", "epochs=1", env=env)
    assert "building the model with arch.input_doubling=True arch.block_norm_eps=1e-05" in proc.stderr
    config = (out / "config.yaml").read_text()
    assert "input_doubling: true" in config and "block_norm_eps: 1.0e-05" in config
    report = (out / "init_load_report.txt").read_text()
    assert "published_pretrained.pth: loaded" in report and "missing (12): heads." in report
    client = MlflowClient(store)
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.data.tags["avsiam.init.missing"] == "heads 12" and run.data.tags["avsiam.init.loaded"].startswith("encoder ")
    assert "mask_token" in run.data.tags["avsiam.init.dropped"]
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "init_load_report.txt"]


def test_bad_input_fails_before_launching(staged_single, tmp_path):
    proc = avsiam("train", "finetune", "--model", "tiny", "--recipe", "finetune_as20k", "--data", staged_single,
                  "--output", tmp_path / "x", "--nproc", "2", check=False)
    assert proc.returncode == 2 and "single-label dataset does not fit recipe 'finetune_as20k'" in proc.stderr
    proc = avsiam("train", "pretrain", "--model", "tiny", "--data", tmp_path / "nope.json", "--output", tmp_path / "y", "--nproc", "2",
                  check=False)
    assert proc.returncode == 2 and "nope.json" in proc.stderr
    proc = avsiam("train", "pretrain", "--model", "tiny", "--data", staged_single, "--output", tmp_path / "z", "epochz=1", check=False)
    assert proc.returncode == 2 and "did you mean 'epochs'" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resuming_with_a_different_config_is_refused(staged_single, reference_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    proc = avsiam("train", "pretrain", "--model", "tiny", "--data", staged_single, "--output", out, *FAST, "max_steps=8",
                  "epochs=4", "lr=0.1", check=False)
    assert proc.returncode == 2 and "different configuration (changed: lr)" in proc.stderr
