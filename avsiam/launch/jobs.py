"""Following a job that a cluster scheduler runs (Slurm, Kubernetes) from the process that
submitted it: poll until it ends, stream its log, and cancel it when this process is asked to
stop (SIGTERM, SIGINT/KeyboardInterrupt, Prefect's TerminationSignal) or runs past its
wall-clock limit.

A failure of the follower itself (a bug, a scheduler command that keeps failing) does *not*
cancel the job: the job keeps its GPUs, and a retry re-attaches to it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from avsiam.launch.supervisor import WallClockLimitExceeded


@dataclass(frozen=True)
class JobStatus:
    state: str  # the scheduler's own word: PENDING, RUNNING, COMPLETED, Complete, Failed, ...
    active: bool  # queued or running: still worth following
    exit_code: int = 0  # once inactive: 0 when the job succeeded


class LogTail:
    """The lines a job appended to its log file since the last call (shared filesystem)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("r", errors="replace") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:  # the job has not started yet
            return []
        *lines, self._partial = (self._partial + chunk).split("\n")
        return lines


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGTERM (what a Prefect worker or a process manager sends) raises KeyboardInterrupt
    here like SIGINT does, so the follower can cancel the job before it exits."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread; the caller cancels instead
        return

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _asked_to_stop(exc: BaseException) -> bool:
    # KeyboardInterrupt, SystemExit and Prefect's TerminationSignal are BaseExceptions only.
    return isinstance(exc, WallClockLimitExceeded) or not isinstance(exc, Exception)


def follow(
    label: str,
    status: Callable[[], JobStatus | None],
    cancel: Callable[[], None],
    *,
    log_line: Callable[[str], None],
    poll_interval_s: float,
    wall_clock_limit_s: float | None = None,
    log_tail: LogTail | None = None,
    max_unknown_polls: int = 10,
) -> int:
    """Poll ``status`` until the job is inactive and return its exit code.

    ``status`` returns None when the scheduler could not say (a failed command, a job that
    accounting has not recorded yet); that many polls in a row is an error.
    """
    deadline = None if wall_clock_limit_s is None else time.monotonic() + wall_clock_limit_s
    last_state, unknown = None, 0

    def drain() -> None:
        for line in log_tail.new_lines() if log_tail else ():
            log_line(line)

    with _stop_signals_raise():
        try:
            while True:
                drain()
                current = status()
                if current is None:
                    unknown += 1
                    if unknown >= max_unknown_polls:
                        raise RuntimeError(f"{label}: the scheduler has not reported its state for {unknown} polls")
                else:
                    unknown = 0
                    if current.state != last_state:
                        log_line(f"{label}: {current.state}")
                        last_state = current.state
                    if not current.active:
                        drain()
                        return current.exit_code
                if deadline is not None and time.monotonic() > deadline:
                    raise WallClockLimitExceeded(f"{label} exceeded its wall-clock limit of {wall_clock_limit_s:.0f} s")
                time.sleep(poll_interval_s)
        except BaseException as exc:
            if _asked_to_stop(exc):
                log_line(f"{label}: cancelling ({type(exc).__name__}: {exc})")
                cancel()
            raise
