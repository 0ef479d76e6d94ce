"""The evaluation report: ``results.json`` (the task metric of the multimodal head, plus the
audio-only and visual-only heads) and ``per_class.csv`` (per-class AP of every head)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from avsiam.eval.metrics import accuracy, average_precision_per_class, mean_average_precision

# Result names of the finetuning heads: the multimodal head is the headline number.
HEAD_PREFIX = {"multimodal": "", "audio": "audio_only", "visual": "visual_only"}


RESULTS_NAME = "results.json"


class EvaluationResults(BaseModel):
    """``results.json``, written by ``avsiam evaluate`` and read by the flow and the gate: the
    headline ``metric`` (mAP, accuracy, or retrieval recall) and its value under that name,
    beside the other scores (per head, recall@k), which vary with the task."""

    model_config = ConfigDict(extra="allow")

    metric: str
    split: str
    num_clips: int
    model: str | None = None
    recipe: str | None = None

    @property
    def headline(self) -> float:
        if not isinstance(self.model_extra.get(self.metric), (int, float)):
            raise ValueError(f"evaluation results without a value for their metric {self.metric!r}")
        return float(self.model_extra[self.metric])

    def scores(self) -> dict[str, float]:
        """Every numeric score (not the clip count): what is logged as metrics."""
        return {k: float(v) for k, v in self.model_extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / RESULTS_NAME
        path.write_text(self.model_dump_json(indent=1, exclude_none=True) + "\n")
        return path

    @classmethod
    def read(cls, out_dir: str | Path) -> EvaluationResults:
        return cls.model_validate_json((Path(out_dir) / RESULTS_NAME).read_text())


def metric_name(multi_label: bool) -> str:
    """AudioSet tasks are scored by mAP, VGGSound-style single-label tasks by accuracy."""
    return "mAP" if multi_label else "accuracy"


def score(probabilities: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    return mean_average_precision(probabilities, targets) if multi_label else accuracy(probabilities, targets)


def evaluation_results(probabilities: dict[str, np.ndarray], targets: np.ndarray, multi_label: bool) -> dict[str, Any]:
    """{metric: headline, "audio_only": {metric: ...}, "visual_only": {...}, flat aliases}.

    The headline is the multimodal head, or the only head of a single-modality model.
    """
    name = metric_name(multi_label)
    results: dict[str, Any] = {"metric": name, "num_clips": int(targets.shape[0])}
    headline = "multimodal" if "multimodal" in probabilities else next(iter(probabilities))
    for head, probs in probabilities.items():
        value = score(probs, targets, multi_label)
        if head == headline:
            results[name] = value
        if HEAD_PREFIX[head]:
            results[HEAD_PREFIX[head]] = {name: value}
            results[f"{HEAD_PREFIX[head]}_{name}"] = value
    return results


def write_report(
    out_dir: Path,
    results: EvaluationResults,
    probabilities: dict[str, np.ndarray],
    targets: np.ndarray,
    class_mids: tuple[str, ...],
    class_names: tuple[str, ...],
) -> tuple[Path, Path]:
    """Write results.json and per_class.csv; return their paths."""
    results_path = results.write(out_dir)
    with np.errstate(invalid="ignore"):
        ap = {head: average_precision_per_class(probabilities[head], targets) for head in HEAD_PREFIX if head in probabilities}
    positives = (targets > 0).sum(axis=0)
    per_class_path = out_dir / "per_class.csv"
    with per_class_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "mid", "display_name", "num_positives", *(f"ap_{h}" for h in ap)])
        for c, (mid, name) in enumerate(zip(class_mids, class_names)):
            writer.writerow([c, mid, name, int(positives[c]), *("" if np.isnan(v[c]) else f"{v[c]:.6f}" for v in ap.values())])
    return results_path, per_class_path
