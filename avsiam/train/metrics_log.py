"""Per-step metrics: ``metrics.jsonl`` (one JSON object per optimizer step) and step timing."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch


class JsonlLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_after_step: int | None = None) -> None:
        self.path = path
        if resume_after_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_after_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_after_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def peak_memory_mb(on_cpu: bool) -> float:
    """Peak accelerator memory (GPU) or peak resident memory of this process (CPU), in MiB."""
    if not on_cpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_age_seconds() -> float:
    """Seconds since this process started: asked as the training loop begins, the start-up a
    launch costs before training (imports, process group, engine, data index, model). Linux's start time
    (``/proc/self/stat``, clock ticks since boot) against ``CLOCK_BOOTTIME``, exact to a tick;
    psutil's ``create_time`` adds the boot time, which Linux gives in whole seconds."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")


class StepTimer:
    """Wall time of each optimizer step and the part of it spent waiting for data."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.wait = 0.0

    def data_ready(self) -> None:
        """Call when a batch arrives: the time since the last compute ended was data wait."""
        now = time.perf_counter()
        self.wait += now - self.mark
        self.mark = now

    def compute_done(self) -> None:
        self.mark = time.perf_counter()

    def lap(self) -> tuple[float, float]:
        """(step seconds, data-wait seconds) of the step that just finished."""
        step, wait = time.perf_counter() - self.start, self.wait
        self.restart()
        return step, wait

    def restart(self) -> None:
        """Start timing the next step now: bookkeeping between steps (logging, checkpoints,
        validation) is not charged to the step."""
        self.start = self.mark = time.perf_counter()
        self.wait = 0.0
