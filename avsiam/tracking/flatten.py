"""Nested configurations as MLflow params: dotted keys, string values of bounded length.

A leaf that is a string is kept as it is; every other leaf (numbers, booleans, ``None``,
lists, tuples) is written as JSON, so ``betas=(0.95, 0.999)`` becomes ``"[0.95, 0.999]"``,
``None`` becomes ``"null"`` and every value but a string reads back with ``json.loads``.
Lists are leaves, not indexed keys: a list of mask ratios is one param, compared as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import BaseModel

# MLflow 3 accepts 6000 characters, but older tracking servers reject anything over 500 and
# the server may be older than the client; a config value is far shorter than that anyway.
MAX_PARAM_VALUE_LENGTH = 500
TRUNCATION_MARKER = "...[truncated]"


def truncate(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` characters, ending with a marker when it was cut."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def param_value(value: object) -> str:
    """One leaf as a param string: a string as it is, anything else as JSON, then truncated."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return truncate(text, MAX_PARAM_VALUE_LENGTH)


def flatten_params(obj: Mapping[str, object] | BaseModel, prefix: str = "") -> dict[str, str]:
    """``obj`` as ``{"arch.embed_dim": "768", ...}``: nested mappings and models joined by dots.

    ``prefix`` is prepended to every key (``prefix="cfg"`` gives ``"cfg.lr"``). An empty
    nested mapping is the leaf ``"{}"``, so that its key does not silently disappear.
    """
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    if not isinstance(obj, Mapping):
        raise TypeError(f"flatten_params needs a mapping or a pydantic model, got {type(obj).__name__}")
    flat: dict[str, str] = {}
    for key, value in obj.items():
        _flatten_into(flat, value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _flatten_into(flat: dict[str, str], value: object, key: str) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping) and value:
        for child_key, child in value.items():
            _flatten_into(flat, child, f"{key}.{child_key}")
    else:
        flat[key] = param_value(value)
