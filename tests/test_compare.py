"""``avsiam compare`` against a real sqlite MLflow store holding runs shaped like the flow's."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from mlflow import MlflowClient

from avsiam.cli import compare_command
from avsiam.tracking.compare import compare_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECIPE_PARAMS = {"lr": "0.0001", "epochs": "10", "arch.embed_dim": "768"}

# (metric, multimodal, audio-only, visual-only, pipeline GPU-hours or None) per finetuning recipe.
PIPELINES = {
    "large": {
        "profile": "paper-large",
        "date": datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc),
        "evaluations": {
            "finetune_as20k": ("mAP", 0.4310, 0.3820, 0.2010, 330.5),
            "finetune_vggsound": ("accuracy", 0.6655, 0.5512, 0.4470, 341.25),
        },
    },
    "huge": {
        "profile": "paper-huge",
        "date": datetime(2025, 4, 2, 8, 30, tzinfo=timezone.utc),
        "evaluations": {
            "finetune_as20k": ("mAP", 0.4480, 0.3990, 0.2150, 812.0),
            # Logged before the flow recorded pipeline_gpu_hours: in the table, not in the plot.
            "finetune_vggsound": ("accuracy", 0.6790, 0.5601, 0.4633, None),
        },
    },
}
EXPECTED_ORDER = [("large", "finetune_as20k"), ("large", "finetune_vggsound"), ("huge", "finetune_as20k"), ("huge", "finetune_vggsound")]


@pytest.fixture(autouse=True)
def no_mlflow_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test names its store; nothing leaks in from the shell."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _log_pipeline(client: MlflowClient, experiment_id: str, model: str, spec: dict) -> dict[str, str]:
    """A parent run with the flow's children; returns the evaluate run ids by recipe."""
    start = int(spec["date"].timestamp() * 1000)
    parent = client.create_run(experiment_id, start_time=start, tags={
        "prefect.flow_run_id": f"flow-{model}", "avsiam.profile": spec["profile"], "avsiam.model": model,
        "avsiam.version": "0.1.0", "avsiam.dataset_digest": "d" * 64}).info.run_id

    def child(stage: str, **tags: str) -> str:
        return client.create_run(experiment_id, start_time=start, tags={
            "mlflow.parentRunId": parent, "avsiam.stage": stage, **tags}).info.run_id

    client.log_metric(child("stage_data"), "num_clips", 300)
    pretrain = child("pretrain", **{"avsiam.recipe": "pretrain_as2m", "avsiam.model": model})
    for key, value in RECIPE_PARAMS.items():
        client.log_param(pretrain, key, value)
    client.log_metric(pretrain, "gpu_hours", 300.0)
    evaluate_ids = {}
    for recipe, (metric, score, audio, visual, hours) in spec["evaluations"].items():
        finetune = child("finetune", **{"avsiam.recipe": recipe, "avsiam.model": model})
        client.log_param(finetune, "lr", "0.00005")
        client.log_metric(finetune, "gpu_hours", 20.0)
        evaluate = child("evaluate", **{"avsiam.recipe": recipe, "avsiam.model": model, "avsiam.dataset_digest": "d" * 64})
        for key, value in {metric: score, f"audio_only_{metric}": audio, f"visual_only_{metric}": visual}.items():
            client.log_metric(evaluate, key, value)
        if hours is not None:
            client.log_metric(evaluate, "pipeline_gpu_hours", hours)
        client.log_metric(parent, f"{recipe}.{metric}", score)  # the parent's headline: not an evaluate row
        evaluate_ids[recipe] = evaluate
    # A failed evaluation logs no score: nothing to compare.
    evaluate_ids["failed"] = child("evaluate", **{"avsiam.recipe": "finetune_as2m", "avsiam.model": model})
    client.log_metric(parent, "gpu_hours_total", 340.0)
    return evaluate_ids


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[tuple[str, str], str]]:
    """(tracking URI, evaluate run id by (model, recipe)) of a store with two pipelines."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("avsiam")
    run_ids = {}
    for model, spec in PIPELINES.items():
        run_ids.update({(model, recipe): run_id for recipe, run_id in _log_pipeline(client, experiment_id, model, spec).items()})
    return uri, run_ids


def run_compare(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``avsiam compare ARGV`` through the command's own parser."""
    parser = argparse.ArgumentParser()
    compare_command.register(parser.add_subparsers())
    args = parser.parse_args(["compare", *argv])
    code = args.handler(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_line(out: str, run_id: str) -> str:
    """The table row of ``run_id`` (shown by its short id)."""
    return next(line for line in out.splitlines() if run_id[:8] in line)


def test_rows_are_the_scored_evaluate_runs_sorted_by_model_size_then_recipe(store) -> None:
    uri, run_ids = store
    rows = compare_runs(uri)
    assert [(r["model"], r["recipe"]) for r in rows] == EXPECTED_ORDER
    large_as20k = rows[0]
    assert large_as20k["run_id"] == run_ids[("large", "finetune_as20k")]
    assert large_as20k["profile"] == "paper-large"
    assert (large_as20k["dataset"], large_as20k["metric"]) == ("AS-20K", "mAP")
    assert (large_as20k["score"], large_as20k["audio_only"], large_as20k["visual_only"]) == pytest.approx((0.4310, 0.3820, 0.2010))
    assert large_as20k["gpu_hours"] == pytest.approx(330.5)
    assert large_as20k["start_time"] == "2025-03-01T12:00:00+00:00"
    assert (rows[1]["metric"], rows[1]["score"]) == ("accuracy", pytest.approx(0.6655))
    assert rows[3]["gpu_hours"] is None


def test_table_shows_each_run_with_scores_in_percent(store, capsys) -> None:
    uri, run_ids = store
    code, out, _ = run_compare(capsys, "--tracking-uri", uri)
    assert code == 0
    lines = [table_line(out, run_ids[key]) for key in EXPECTED_ORDER]
    assert [out.index(line) for line in lines] == sorted(out.index(line) for line in lines)
    for cell in ("large", "finetune_as20k", "AS-20K mAP", "330.5", "43.10", "38.20", "20.10", "paper-large", "2025-03-01 12:00"):
        assert cell in lines[0]
    for cell in ("VGGSound acc", "66.55", "55.12", "44.70", "341.2"):
        assert cell in lines[1]
    assert "paper" not in out.splitlines()[2]  # the header: no paper columns without --paper
    assert run_ids[("large", "failed")][:8] not in out


def test_json_prints_the_rows(store, capsys) -> None:
    uri, run_ids = store
    code, out, _ = run_compare(capsys, "--tracking-uri", uri, "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["run_id"] for r in rows] == [run_ids[key] for key in EXPECTED_ORDER]
    assert rows[2]["score"] == pytest.approx(0.4480) and rows[2]["gpu_hours"] == pytest.approx(812.0)
    assert "paper_score" not in rows[0]


def test_paper_adds_the_reported_numbers_of_the_same_model_and_recipe(store, capsys) -> None:
    uri, run_ids = store
    _, out, _ = run_compare(capsys, "--tracking-uri", uri, "--json", "--paper")
    by_key = {(r["model"], r["recipe"]): r for r in json.loads(out)}
    assert (by_key[("large", "finetune_as20k")]["paper_score"], by_key[("large", "finetune_as20k")]["paper_v100_hours"]) == (0.441, 310.0)
    assert by_key[("huge", "finetune_vggsound")]["paper_score"] == 0.68
    _, out, _ = run_compare(capsys, "--tracking-uri", uri, "--paper")
    assert "paper V100-h" in out
    assert "44.10" in table_line(out, run_ids[("large", "finetune_as20k")])
    assert "800.0" in table_line(out, run_ids[("huge", "finetune_as20k")])


def test_plot_writes_a_png_and_prints_its_path(store, capsys, tmp_path: Path) -> None:
    uri, _ = store
    png = tmp_path / "plots" / "compare.png"
    code, out, _ = run_compare(capsys, "--tracking-uri", uri, "--plot", str(png))
    assert code == 0
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert f"plot: {png} (1 run(s) without pipeline_gpu_hours left out)" in out
    # Under --json the path goes to stderr: stdout stays one JSON document.
    code, out, err = run_compare(capsys, "--tracking-uri", uri, "--json", "--plot", str(png))
    assert code == 0 and len(json.loads(out)) == 4 and str(png) in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "huge"], [("huge", "finetune_as20k"), ("huge", "finetune_vggsound")]),
        (["--recipe", "finetune_vggsound"], [("large", "finetune_vggsound"), ("huge", "finetune_vggsound")]),
        (["--profile", "paper-large"], [("large", "finetune_as20k"), ("large", "finetune_vggsound")]),
        (["--filter", "metrics.mAP > 0.44"], [("huge", "finetune_as20k")]),
        (["--model", "large", "--recipe", "finetune_as20k"], [("large", "finetune_as20k")]),
    ],
)
def test_filters_select_runs(store, capsys, argv: list[str], expected: list[tuple[str, str]]) -> None:
    uri, _ = store
    code, out, _ = run_compare(capsys, "--tracking-uri", uri, "--json", *argv)
    assert code == 0
    assert [(r["model"], r["recipe"]) for r in json.loads(out)] == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiment", "nope"], "no experiment named 'nope'"),
        (["--model", "base"], "no scored evaluate run in experiment 'avsiam' matches: tags.`avsiam.stage` = 'evaluate' and "
                              "tags.`avsiam.model` = 'base'"),
        (["--profile", "demo"], "and parent tags.`avsiam.profile` = 'demo'"),
        (["--filter", "metrics.mAP >"], "error:"),
    ],
)
def test_nothing_to_compare_is_a_message_and_exit_status_1(store, capsys, argv: list[str], message: str) -> None:
    uri, _ = store
    code, out, err = run_compare(capsys, "--tracking-uri", uri, *argv)
    assert code == 1 and out == ""
    assert err.startswith("avsiam compare: error: ") and message in err


def test_tracking_uri_comes_from_the_environment(store, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, run_ids = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, out, _ = run_compare(capsys, "--json", "--model", "large")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == [run_ids[("large", r)] for r in PIPELINES["large"]["evaluations"]]


@pytest.mark.parametrize(("argv", "status", "expected"), [([], 0, "43.10"), (["--experiment", "nope"], 1, "no experiment named 'nope'")])
def test_console_script(store, argv: list[str], status: int, expected: str) -> None:
    uri, _ = store
    result = subprocess.run([sys.executable, "-m", "avsiam.cli.main", "compare", *argv], capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert result.returncode == status, result.stderr
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
