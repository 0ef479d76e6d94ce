"""The finetuned model as an MLflow pyfunc model: what the registry holds and
``mlflow models serve`` serves.

The model's artifacts are the run's ``weights.safetensors``, its resolved recipe
(``config.yaml``) and its class list; its code is ``pyfunc_model.py`` (MLflow's "models from
code", no pickle), which imports this package: serve it with ``--env-manager local`` from an
environment where avsiam is installed. Its input is a
DataFrame with one row per clip: ``video`` (a path or ``s3://`` URI the server can read) or
``video_bytes`` (the mp4 itself, base64-encoded; a string column, not MLflow's ``binary``,
so that one request may mix both kinds of rows). It returns one record per row,
the records of ``avsiam predict --json`` (:mod:`avsiam.eval.labeling`); ``params={"top_k": k}``.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from avsiam import __version__
from avsiam.data.index import CLASSES_NAME
from avsiam.eval.labeling import DEFAULT_TOP_K, RECIPE_NAME, ClipLabeler, check_top_k, clip_name

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "video", required=False), ColSpec("string", "video_bytes", required=False)]),
    params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]),
)
# What the pyfunc needs at load time; avsiam itself is installed, not pinned (not on an index).
PIP_REQUIREMENTS = ("torch", "torchaudio", "torchvision", "timm", "av", "safetensors", "pydantic", "pyyaml", "boto3")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class ClipLabelModel(mlflow.pyfunc.PythonModel):
    """Labels clips with the model its artifacts hold (see the module docstring)."""

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        self.labeler = ClipLabeler.from_files(artifacts["weights"], artifacts["recipe"], artifacts["classes"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        top_k = check_top_k(int((params or {}).get("top_k", DEFAULT_TOP_K)))
        return [self._label_row(row, i, top_k) for i, row in enumerate(model_input.to_dict("records"))]

    def _label_row(self, row: dict[str, Any], number: int, top_k: int) -> dict[str, Any]:
        video, data = row.get("video"), row.get("video_bytes")
        if _present(data):
            name = f"video_bytes[{number}]"
            try:
                media = base64.b64decode(data, validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                return {"clip": name, "file": name, "error": f"{name}: not base64-encoded bytes ({exc})"}
            with tempfile.TemporaryDirectory(prefix="avsiam-clip-") as tmp:
                path = Path(tmp) / "clip.mp4"
                path.write_bytes(media)
                return self.labeler.label(path, name, name, top_k)
        if not _present(video):
            name = f"row[{number}]"
            return {"clip": name, "file": name, "error": "the row has neither a video nor video_bytes"}
        video = str(video)
        if not video.startswith("s3://"):
            return self.labeler.label(video, clip_name(video), video, top_k)
        from avsiam.storage.s3 import NoSuchObjectError, download_object

        with tempfile.TemporaryDirectory(prefix="avsiam-clip-") as tmp:
            path = Path(tmp) / video.rsplit("/", 1)[-1]
            try:
                download_object(video, path)
            except NoSuchObjectError:
                return {"clip": clip_name(video), "file": video, "error": f"{video}: no such object"}
            return self.labeler.label(path, clip_name(video), video, top_k)


def save_clip_model(run_dir: Path, path: Path, example_video: str | None = None) -> Path:
    """Write the pyfunc model of the finetuning run in ``run_dir`` (its weights, config.yaml
    and class list) to the folder ``path``; ``example_video``: one clip for the input example
    (MLflow runs the model on it once, which checks the saved model loads and predicts)."""
    import shutil

    if path.exists():
        shutil.rmtree(path)  # a re-run of the stage: write it again
    artifacts = {"weights": str(run_dir / "weights.safetensors"), "recipe": str(run_dir / RECIPE_NAME),
                 "classes": str(run_dir / CLASSES_NAME)}
    mlflow.pyfunc.save_model(
        path, python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts=artifacts, signature=SIGNATURE,
        input_example=pd.DataFrame({"video": [example_video]}) if example_video else None,
        pip_requirements=list(PIP_REQUIREMENTS), metadata={"avsiam_version": __version__},
    )
    # MLflow copied the weights into the model folder: link them instead (one copy on disk
    # of multi-GB weights); the folder is on the run folder's file system.
    copied = path / "artifacts" / "weights.safetensors"
    copied.unlink()
    os.link(artifacts["weights"], copied)
    return path
