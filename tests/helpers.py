"""Helpers shared by test modules: the ``avsiam`` command in a subprocess, staging a synthetic
dataset the way users do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from avsiam.data.staging import stage_dataset


def avsiam(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run ``avsiam ARGS`` as users do; with ``check``, fail the test with its output tail."""
    proc = subprocess.run([sys.executable, "-m", "avsiam.cli.main", *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"avsiam {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage_synthetic(ds, out: Path) -> Path:
    """Stage a ``generate_synthetic_dataset`` result into ``out``; returns its manifest.json."""
    labels = [ds.train_segments_csv, ds.eval_segments_csv] if ds.multi_label else [ds.labels_csv]
    stage_dataset(labels, out, videos_dir=ds.videos_dir, classes_csv=ds.class_labels_indices_csv, workers=2, progress=False)
    return out / "manifest.json"
