"""The local backend's ranks: N processes of ``avsiam <args>`` on this node.

By default (``--launcher direct``) the calling process starts the ranks itself, with the
environment a launcher would give them; DeepSpeed's per-node launcher and torchrun remain
selectable. Measured here with 2 CPU ranks of a trivial module: DeepSpeed's launcher, an
interpreter of its own that imports DeepSpeed before it starts a rank and polls them once a
second, added 7 s to every launch (ranks up after 4 s, launcher gone 3 s after them);
torchrun starts faster but ends a failed run with status 1 and a
traceback of its own, where a diverged run must end with its 3 and its one message.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENTRY_MODULE = "avsiam.cli.main"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environments(nproc: int, master_port: int, inherited: Mapping[str, str]) -> list[dict[str, str]]:
    """What each of ``nproc`` ranks on this node adds to ``inherited``: the variables of
    torch.distributed's ``env://`` rendezvous (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, and torchrun's LOCAL_WORLD_SIZE), DeepSpeed's LOCAL_SIZE (its CPU accelerator
    counts devices by it and uses its shared-memory allreduce only when it equals the world
    size), and, unless ``inherited`` sets it, OMP_NUM_THREADS: an equal share of this
    process's cores. Left unset, every rank's torch takes all the cores: 2 ranks ran 4 threads
    on this machine's 2 cores and the demo's pretraining loop took 18 % longer (183 s vs 155 s)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    shared = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "LOCAL_SIZE": str(nproc),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}
    if "OMP_NUM_THREADS" not in inherited:
        shared["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    return [{"RANK": str(rank), "LOCAL_RANK": str(rank), **shared} for rank in range(nproc)]


def rank_argv(entry_args: Sequence[str]) -> list[str]:
    """One rank: this interpreter, unbuffered so its lines reach the log as they are written."""
    return [sys.executable, "-u", "-m", ENTRY_MODULE, *entry_args]


def deepspeed_launcher() -> str:
    """The ``deepspeed`` script of this environment (beside the running interpreter)."""
    script = Path(sys.executable).parent / "deepspeed"
    if not script.exists():
        raise FileNotFoundError(f"the deepspeed launcher is not installed beside {sys.executable}")
    return str(script)


def deepspeed_command(nproc: int, entry_args: Sequence[str], master_port: int | None = None) -> list[str]:
    """argv that runs ``avsiam <entry_args>`` on ``nproc`` local ranks through DeepSpeed's
    per-node launcher (``deepspeed.launcher.launch``), the one the ``deepspeed`` command runs
    for a single node after building its ``--world_info`` (the devices of each host, base64
    JSON); started directly it spares one more interpreter importing DeepSpeed."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [
        sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", "--master_addr=127.0.0.1",
        f"--master_port={master_port or free_port()}", "--no_local_rank", "--module", ENTRY_MODULE, *entry_args,
    ]
