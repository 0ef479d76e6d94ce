"""The one seam through which the cluster backends run scheduler commands.

``sbatch``, ``squeue``, ``sacct``, ``scancel`` and ``kubectl`` all go through a
``CommandRunner``: production uses ``SubprocessRunner``; tests put fake executables on PATH,
so the real subprocess path runs, or inject another runner (e.g. one that adds
``--context`` or runs the commands over ssh on a login node).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str], *, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` (a list, never a shell string) to completion, capturing text output."""


@dataclass(frozen=True)
class SubprocessRunner:
    # A scheduler command that hangs (slurmctld overloaded, API server unreachable) must not
    # hang the follower forever: it counts as one failed poll instead.
    timeout_s: float = 120.0

    def run(self, argv: Sequence[str], *, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(list(argv), input=input_text, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]} timed out after {self.timeout_s:.0f} s")
