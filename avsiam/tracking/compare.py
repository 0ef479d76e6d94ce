"""Compare the evaluations of pipeline runs, as the paper's Tables 1-2 do, from the MLflow store.

Each pipeline run logs one ``evaluate`` child run per finetuning recipe (flows/stages.py): the
task metric of the multimodal head (``mAP`` for the multi-label AudioSet recipes, ``accuracy``
for VGGSound), the same metric of the audio-only and visual-only heads, and
``pipeline_gpu_hours`` (pretrain + finetune GPU-hours of the evaluated weights). A row here is
one such run. Scores stay fractions in the rows, as logged; the table and the plot show
percentages, as the paper does.

The profile is a tag of the parent run only, so it is read from the parents, and the profile
filter is applied after the search. Evaluate runs without a task metric (failed, or still
running) have no score to compare and are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or CI machines
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from rich.table import Table  # noqa: E402

from avsiam.config import RECIPES, SIZES  # noqa: E402
from avsiam.config.paper import PAPER_SCORES, main_table_v100_hours  # noqa: E402
from avsiam.tracking.mlflow_tracker import PARENT_RUN_TAG, redact_credentials  # noqa: E402

EXPERIMENT = "avsiam"
EVALUATE_FILTER = "tags.`avsiam.stage` = 'evaluate'"
TASK_METRICS = ("mAP", "accuracy")  # multi-label, single-label: avsiam.eval.report.metric_name
SEARCH_PAGE_SIZE = 1000
SHORT_RUN_ID = 8

# The dataset each finetuning recipe targets, named as in the paper's tables.
RECIPE_DATASET = {"finetune_as20k": "AS-20K", "finetune_as2m": "AS-2M", "finetune_vggsound": "VGGSound"}

SCORE_KEYS = (("score", "multimodal"), ("audio_only", "audio-only"), ("visual_only", "visual-only"))


class CompareError(Exception):
    """Nothing to compare: the experiment is missing, or no evaluate run matches the filters."""


def compare_runs(
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    *,
    model: str | None = None,
    recipe: str | None = None,
    profile: str | None = None,
    filter_string: str | None = None,
) -> list[dict[str, Any]]:
    """One row per scored evaluate run of ``experiment``, sorted by model size, then recipe,
    then start time. ``tracking_uri`` defaults to MLflow's own resolution (MLFLOW_TRACKING_URI,
    else its local default); ``filter_string`` is an MLflow search filter ANDed to the others."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        uri = redact_credentials(tracking_uri or mlflow.get_tracking_uri())
        raise CompareError(f"no experiment named '{experiment}' in the tracking store {uri}")
    search = evaluate_filter(model, recipe, filter_string)
    runs = [run for run in _search_all(client, found.experiment_id, search) if _task_metric(run)]
    parents = _parents(client, found.experiment_id, runs)
    rows = [_row(run, parents.get(run.data.tags.get(PARENT_RUN_TAG, ""))) for run in runs]
    rows = [row for row in rows if profile is None or row["profile"] == profile]
    if not rows:
        wanted = search + (f" and parent tags.`avsiam.profile` = '{profile}'" if profile else "")
        raise CompareError(f"no scored evaluate run in experiment '{experiment}' matches: {wanted}")
    return sorted(rows, key=_row_order)


def evaluate_filter(model: str | None, recipe: str | None, filter_string: str | None) -> str:
    """The MLflow filter for evaluate runs of ``model`` and ``recipe``, ANDed with ``filter_string``."""
    clauses = [EVALUATE_FILTER]
    clauses += [f"tags.`{tag}` = '{value}'" for tag, value in (("avsiam.model", model), ("avsiam.recipe", recipe)) if value]
    # MLflow filters are conjunctions without parentheses, so the user's clauses join as they are.
    clauses += [filter_string] if filter_string else []
    return " and ".join(clauses)


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Run]:
    """Every run the filter matches: search_runs returns one page at a time."""
    page_token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=SEARCH_PAGE_SIZE, page_token=page_token)
        yield from page
        page_token = page.token
        if not page_token:
            return


def _parents(client: MlflowClient, experiment_id: str, runs: list[Run]) -> dict[str, Run]:
    """The parent runs of ``runs`` by run id, fetched in one search rather than one call per run."""
    ids = sorted({run.data.tags[PARENT_RUN_TAG] for run in runs if PARENT_RUN_TAG in run.data.tags})
    if not ids:
        return {}
    listed = ", ".join(f"'{run_id}'" for run_id in ids)
    return {run.info.run_id: run for run in _search_all(client, experiment_id, f"attributes.run_id IN ({listed})")}


def _task_metric(run: Run) -> str | None:
    return next((name for name in TASK_METRICS if name in run.data.metrics), None)


def _row(run: Run, parent: Run | None) -> dict[str, Any]:
    metric = _task_metric(run)
    metrics, tags = run.data.metrics, run.data.tags
    recipe = tags.get("avsiam.recipe")
    return {
        "run_id": run.info.run_id,
        "parent_run_id": tags.get(PARENT_RUN_TAG),
        "model": tags.get("avsiam.model"),
        "recipe": recipe,
        "profile": parent.data.tags.get("avsiam.profile") if parent else None,
        "dataset": RECIPE_DATASET.get(recipe),
        "metric": metric,
        "gpu_hours": metrics.get("pipeline_gpu_hours"),
        "score": metrics[metric],
        "audio_only": metrics.get(f"audio_only_{metric}"),
        "visual_only": metrics.get(f"visual_only_{metric}"),
        "dataset_digest": tags.get("avsiam.dataset_digest"),
        "start_time": datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).isoformat(timespec="seconds"),
    }


def _row_order(row: dict[str, Any]) -> tuple:
    """Model sizes in size order (as the paper's tables), unknown ones after; recipes in preset order."""
    size = SIZES.index(row["model"]) if row["model"] in SIZES else len(SIZES)
    recipe = RECIPES.index(row["recipe"]) if row["recipe"] in RECIPES else len(RECIPES)
    return size, row["model"] or "", recipe, row["recipe"] or "", row["start_time"]


def with_paper_reference(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the paper's numbers for the same model and recipe (:func:`paper_reference`)."""
    return [{**row, **paper_reference(row["model"], row["recipe"])} for row in rows]


def paper_reference(model: str | None, recipe: str | None) -> dict[str, float | None]:
    """``paper_score`` (a fraction, like the run scores) and ``paper_v100_hours``; both None
    where the paper reports no such row (the tiny model, recipes of other datasets). The hours
    are the paper's pretraining cost on V100s: a reference point, not a number our
    ``pipeline_gpu_hours`` on other GPUs must match."""
    reported = PAPER_SCORES.get((model, recipe))
    if reported is None:
        return {"paper_score": None, "paper_v100_hours": None}
    return {"paper_score": round(reported / 100, 4), "paper_v100_hours": main_table_v100_hours(model)}


def render_table(rows: list[dict[str, Any]]) -> Table:
    """The rows as the paper's tables show them: scores in percent. The paper columns appear
    when the rows carry them (:func:`with_paper_reference`)."""
    paper = any("paper_score" in row for row in rows)
    table = Table(title="AVSiam evaluations (scores in %; GPU-hours: pretrain + finetune)")
    run_numbers = ("GPU-hours", *(label for _, label in SCORE_KEYS))
    paper_numbers = ("paper", "paper V100-h") if paper else ()
    for name in ("model", "recipe", "task", *run_numbers, "profile", "date", "run", *paper_numbers):
        table.add_column(name, no_wrap=True, justify="right" if name in run_numbers + paper_numbers else "left")
    for row in rows:
        cells = [row["model"] or "-", row["recipe"] or "-", task_name(row), _hours(row["gpu_hours"]),
                 *(_percent(row[key]) for key, _ in SCORE_KEYS), row["profile"] or "-",
                 row["start_time"][:16].replace("T", " "), row["run_id"][:SHORT_RUN_ID]]
        if paper:
            cells += [_percent(row.get("paper_score")), _hours(row.get("paper_v100_hours"))]
        table.add_row(*cells)
    return table


def task_name(row: dict[str, Any]) -> str:
    """The task as the paper's column headers name it, e.g. "AS-20K mAP" or "VGGSound acc"."""
    metric = "acc" if row["metric"] == "accuracy" else row["metric"]
    return f"{row['dataset']} {metric}" if row["dataset"] else metric


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _hours(value: float | None) -> str:
    """Paper-scale hours to one decimal; the demo's fractions of an hour with 3 significant digits."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 100 else f"{value:.3g}"


def scatter_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """GPU-hours vs multimodal score (%), one point per run labelled "model/recipe", one marker
    per task metric (mAP and accuracy do not share a scale). Runs without pipeline_gpu_hours
    have no x position and are left out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for metric, marker in zip(TASK_METRICS, ("o", "s")):
        points = [row for row in rows if row["metric"] == metric and row["gpu_hours"] is not None]
        if not points:
            continue
        ax.scatter([row["gpu_hours"] for row in points], [100 * row["score"] for row in points], marker=marker, label=metric)
        for row in points:
            ax.annotate(f"{row['model']}/{row['recipe']}", (row["gpu_hours"], 100 * row["score"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GPU-hours (pretrain + finetune)")
    ax.set_ylabel("multimodal score (%)")
    ax.set_title("AVSiam: compute vs score")
    if ax.collections:
        ax.legend(title="metric")
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
