"""The evaluation report: ``results.json`` (the task metric of the multimodal head, plus the
audio-only and visual-only heads) and ``per_class.csv`` (per-class AP of every head)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from avsiam.eval.metrics import accuracy, average_precision_per_class, mean_average_precision

# Result names of the finetuning heads: the multimodal head is the headline number.
HEAD_PREFIX = {"multimodal": "", "audio": "audio_only", "visual": "visual_only"}


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
    results: dict[str, Any],
    probabilities: dict[str, np.ndarray],
    targets: np.ndarray,
    class_mids: tuple[str, ...],
    class_names: tuple[str, ...],
) -> tuple[Path, Path]:
    """Write results.json and per_class.csv; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=1) + "\n")
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
