"""Run a launcher command as a supervised process group.

The launcher (``deepspeed``, ``torchrun``) starts in its own session, so signals and kills
reach every rank it spawned, never just the launcher: on SIGTERM/SIGINT to this process, on a
wall-clock limit, or on any exception here, the whole group gets SIGTERM, then SIGKILL after
a grace period. Output is streamed line by line to ``log_line`` (e.g. a Prefect logger).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence


class WallClockLimitExceeded(RuntimeError):
    pass


def _kill_group(proc: subprocess.Popen, grace_seconds: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_supervised(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    log_line: Callable[[str], None] = print,
    wall_clock_limit_s: float | None = None,
    grace_seconds: float = 20.0,
) -> int:
    """Run ``argv`` (a list: never a shell) to completion; return its exit code."""
    proc = subprocess.Popen(
        list(argv), env=dict(env) if env is not None else None, cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )
    pump = threading.Thread(target=lambda: [log_line(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    pump.start()
    forwarded: dict[int, object] = {}

    def forward(signum, _frame):
        _kill_group(proc, grace_seconds)
        raise KeyboardInterrupt(f"signal {signum}: training process group stopped")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            forwarded[sig] = signal.signal(sig, forward)
    deadline = None if wall_clock_limit_s is None else time.monotonic() + wall_clock_limit_s
    try:
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(proc, grace_seconds)
                raise WallClockLimitExceeded(f"training exceeded its wall-clock limit of {wall_clock_limit_s:.0f} s")
            time.sleep(0.2)
        return proc.returncode
    finally:
        _kill_group(proc, grace_seconds)
        pump.join(timeout=5)
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
