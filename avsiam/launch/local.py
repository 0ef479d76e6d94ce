"""The local backend: N ranks on this node through the deepspeed launcher."""

from __future__ import annotations

import base64
import json
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
    """argv that runs ``avsiam <entry_args>`` on ``nproc`` local ranks (LOCAL_RANK from env).

    It is DeepSpeed's per-node launcher (``deepspeed.launcher.launch``), the one the
    ``deepspeed`` command runs for a single node after building its ``--world_info`` (the
    devices of each host, base64 JSON). Started directly it spares one interpreter importing
    DeepSpeed, 4-5 s per launch here; the ranks, their environment, signal handling and exit
    codes are the launcher's as before."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [
        sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", "--master_addr=127.0.0.1",
        f"--master_port={master_port or free_port()}", "--no_local_rank", "--module", ENTRY_MODULE, *entry_args,
    ]
