"""Helpers shared by test modules: the ``avsiam`` command in a subprocess, staging a synthetic
dataset with the library."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from avsiam.data.staging import StagingRequest, stage_dataset


def avsiam(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run ``avsiam ARGS`` as users do; with ``check``, fail the test with its output tail."""
    proc = subprocess.run([sys.executable, "-m", "avsiam.cli.main", *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"avsiam {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage_synthetic(ds, out: Path, clips_per_shard: int = 8, workers: int = 1) -> Path:
    """Stage a ``generate_synthetic_dataset`` result into ``out`` with the library's staging
    (shards in this process, or in ``workers`` processes); returns the staged folder."""
    labels = [ds.train_segments_csv, ds.eval_segments_csv] if ds.multi_label else [ds.labels_csv]
    request = StagingRequest(labels=labels, out=out, videos=ds.videos_dir, classes_csv=ds.class_labels_indices_csv,
                             clips_per_shard=clips_per_shard)
    if workers == 1:
        stage_dataset(request)
        return out
    # spawn, not fork: this process holds torch threads, which do not survive a fork.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        stage_dataset(request, map_shards=pool.map)
    return out
