"""The hostfile backend: multi-node training through the DeepSpeed launcher.

Two modes:

* ssh (default): this node runs ``deepspeed --hostfile FILE --launcher pdsh`` and the launcher
  starts the ranks on every host of FILE over passwordless ssh. DeepSpeed forwards the
  MLFLOW_*, NCCL_* and PYTHON* variables, plus those listed in ``.deepspeed_env``, to the
  remote nodes.
* ``--no-ssh``: one ``deepspeed --no_ssh --node_rank R`` per node, each started by something
  else (a Kubernetes pod, an srun task, the multi-node test). The hostfile then only names
  the nodes and their slots, so without ``--hostfile`` one is written into the run folder.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avsiam.launch.local import ENTRY_MODULE, deepspeed_launcher
from avsiam.launch.spec import LaunchSpec
from avsiam.launch.supervisor import run_supervised

MULTINODE_LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")


def hostfile_text(nodes: int, gpus_per_node: int) -> str:
    """A hostfile for --no_ssh launches, where host names are labels that fix node order."""
    return "".join(f"node-{i} slots={gpus_per_node}\n" for i in range(nodes))


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` so a reader never sees half a file (every node may write the same one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class HostfileBackend:
    hostfile: Path | None = None
    launcher: str = "pdsh"
    no_ssh: bool = False
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = 29500

    def __post_init__(self) -> None:
        if self.launcher not in MULTINODE_LAUNCHERS:
            raise ValueError(f"--launcher {self.launcher!r}: the hostfile backend takes one of {', '.join(MULTINODE_LAUNCHERS)}")
        if self.no_ssh and (self.node_rank is None or not self.master_addr):
            raise ValueError("--no-ssh starts one node: give its --node-rank and the --master-addr of node 0")
        if not self.no_ssh and self.node_rank is not None:
            raise ValueError("--node-rank only applies with --no-ssh")
        if not self.no_ssh and self.hostfile is None:
            raise ValueError("the hostfile backend needs --hostfile FILE (lines of `host slots=N`), or --no-ssh")

    def hostfile_for(self, spec: LaunchSpec) -> Path:
        return Path(self.hostfile) if self.hostfile else spec.run_folder("hostfile --no-ssh") / "deepspeed_hostfile"

    def command(self, spec: LaunchSpec) -> list[str]:
        """argv of the deepspeed launcher on this node."""
        if self.no_ssh and not 0 <= self.node_rank < spec.nodes:
            raise ValueError(f"--node-rank {self.node_rank} is outside 0..{spec.nodes - 1}")
        argv = [deepspeed_launcher(), "--hostfile", str(self.hostfile_for(spec)), "--num_nodes", str(spec.nodes),
                "--num_gpus", str(spec.gpus_per_node), "--master_port", str(self.master_port)]
        if self.master_addr:
            argv += ["--master_addr", self.master_addr]
        argv += ["--no_ssh", "--node_rank", str(self.node_rank)] if self.no_ssh else ["--launcher", self.launcher]
        return [*argv, "--no_local_rank", "--module", ENTRY_MODULE, *spec.entry_args]

    def render(self, spec: LaunchSpec) -> str:
        return shlex.join(self.command(spec)) + "\n"

    def run(self, spec: LaunchSpec, *, log_line: Callable[[str], None] = print, wall_clock_limit_s: float | None = None) -> int:
        argv = self.command(spec)
        if self.hostfile is None:
            write_atomically(self.hostfile_for(spec), hostfile_text(spec.nodes, spec.gpus_per_node))
        return run_supervised([(argv, spec.process_env())], log_line=log_line, wall_clock_limit_s=wall_clock_limit_s)
