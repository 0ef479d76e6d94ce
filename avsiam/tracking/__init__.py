"""Experiment tracking: rank 0 logs the resolved config, metrics and artifacts to MLflow."""

from avsiam.tracking.flatten import MAX_PARAM_VALUE_LENGTH, flatten_params
from avsiam.tracking.mlflow_tracker import (
    PARAM_CHANGED_TAG_PREFIX,
    SPOOL_NAME,
    NullTracker,
    Tracker,
    make_tracker,
    redact_credentials,
)

__all__ = [
    "MAX_PARAM_VALUE_LENGTH",
    "PARAM_CHANGED_TAG_PREFIX",
    "SPOOL_NAME",
    "NullTracker",
    "Tracker",
    "flatten_params",
    "make_tracker",
    "redact_credentials",
]
