"""Evaluation: metrics, retrieval and the evaluation report."""

from avsiam.eval.metrics import (
    accuracy,
    average_precision_per_class,
    mean_average_precision,
    per_class_table,
)
from avsiam.eval.retrieval import retrieval_recall

__all__ = [
    "accuracy",
    "average_precision_per_class",
    "mean_average_precision",
    "per_class_table",
    "retrieval_recall",
]
