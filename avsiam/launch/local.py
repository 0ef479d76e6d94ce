"""The local backend: N ranks on this node through the deepspeed launcher."""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

ENTRY_MODULE = "avsiam.cli.main"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> str:
    """The ``deepspeed`` script of this environment (beside the running interpreter)."""
    script = Path(sys.executable).parent / "deepspeed"
    if not script.exists():
        raise FileNotFoundError(f"the deepspeed launcher is not installed beside {sys.executable}")
    return str(script)


def deepspeed_command(nproc: int, entry_args: Sequence[str], master_port: int | None = None) -> list[str]:
    """argv that runs ``avsiam <entry_args>`` on ``nproc`` local ranks (LOCAL_RANK from env)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    return [
        deepspeed_launcher(), "--num_gpus", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(master_port or free_port()), "--no_local_rank", "--module", ENTRY_MODULE, *entry_args,
    ]
