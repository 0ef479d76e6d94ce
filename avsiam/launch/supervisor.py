"""Run launched processes (a launcher such as ``deepspeed`` or ``torchrun``, or the ranks
themselves) as one supervised unit.

Each process starts in its own session, so signals and kills reach everything it spawned
(a launcher's ranks, a rank's DataLoader workers), never just the process itself. The first
process to exit with a non-zero status ends the unit: the others get SIGTERM, then SIGKILL
after a grace period, and its status is returned (a diverged run's 3, a bad input's 2), as a
launcher returns its failed rank's. On SIGTERM/SIGINT to this process, on a wall-clock limit,
or on any exception here, every process is stopped the same way. Output is streamed line by
line to ``log_line`` (e.g. a Prefect logger).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

# What to run: argv (a list: never a shell) and its whole environment (None: this process's).
Command = tuple[Sequence[str], Mapping[str, str] | None]


class WallClockLimitExceeded(RuntimeError):
    pass


def _stop_all(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM to every group at once (so ranks blocked on each other go down together), then
    one shared grace period, then SIGKILL to whatever is left."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def run_supervised(
    commands: Sequence[Command],
    *,
    cwd: str | None = None,
    log_line: Callable[[str], None] = print,
    wall_clock_limit_s: float | None = None,
    grace_seconds: float = 20.0,
    poll_seconds: float = 0.1,
) -> int:
    """Run ``commands`` side by side to completion: 0 when all exit 0, else the status of the
    first to fail."""
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    forwarded: dict[int, object] = {}

    def forward(signum, _frame):  # the processes are stopped on the way out (finally)
        raise KeyboardInterrupt(f"signal {signum}: training process group stopped")

    try:
        for argv, env in commands:
            proc = subprocess.Popen(
                list(argv), env=dict(env) if env is not None else None, cwd=cwd, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            )
            procs.append(proc)
            pumps.append(threading.Thread(target=lambda p=proc: [log_line(line.rstrip("\n")) for line in p.stdout], daemon=True))
            pumps[-1].start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                forwarded[sig] = signal.signal(sig, forward)
        deadline = None if wall_clock_limit_s is None else time.monotonic() + wall_clock_limit_s
        while True:
            codes = [proc.poll() for proc in procs]
            failed = next((code for code in codes if code not in (None, 0)), None)
            if failed is not None:
                return failed
            if all(code == 0 for code in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise WallClockLimitExceeded(f"training exceeded its wall-clock limit of {wall_clock_limit_s:.0f} s")
            time.sleep(poll_seconds)
    finally:
        _stop_all(procs, grace_seconds)
        for pump in pumps:
            pump.join(timeout=5)
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
