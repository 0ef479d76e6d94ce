"""One entry point for every way to run ``avsiam <args>`` on N nodes x G GPUs.

``launch("slurm", ["train", "pretrain", ...], nodes=8, gpus_per_node=8, partition="v100")``
is what the Prefect flow calls and what ``avsiam launch`` runs. Each backend is a small
frozen dataclass of its own options with two methods: ``render(spec)``, exactly what would be
run or submitted (the ``--dry-run`` output), and ``run(spec, log_line=, wall_clock_limit_s=)``,
which runs or submits it and waits for the exit code.
"""

from __future__ import annotations

import shlex
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

from avsiam.launch.hostfile import HostfileBackend
from avsiam.launch.kubernetes import KubernetesBackend
from avsiam.launch.local import ENTRY_MODULE, deepspeed_command, free_port, rank_argv, rank_environments
from avsiam.launch.slurm import SlurmBackend
from avsiam.launch.spec import LaunchSpec
from avsiam.launch.supervisor import run_supervised

# How the local backend starts the ranks: itself (``direct``), through DeepSpeed's or torch's
# launcher, or (one rank: an evaluation, the flow's single-process steps) as this interpreter
# without a launcher's environment.
LOCAL_LAUNCHERS = ("direct", "deepspeed", "torchrun", "python")


class Backend(Protocol):
    def render(self, spec: LaunchSpec) -> str: ...

    def run(self, spec: LaunchSpec, *, log_line: Callable[[str], None], wall_clock_limit_s: float | None) -> int: ...


def torchrun_launcher() -> str:
    """The ``torchrun`` script of this environment (beside the running interpreter)."""
    script = Path(sys.executable).parent / "torchrun"
    if not script.exists():
        raise FileNotFoundError(f"torchrun is not installed beside {sys.executable}")
    return str(script)


@dataclass(frozen=True)
class LocalBackend:
    launcher: str = "direct"
    master_port: int | None = None  # default: a free port

    def __post_init__(self) -> None:
        if self.launcher not in LOCAL_LAUNCHERS:
            raise ValueError(f"--launcher {self.launcher!r}: the local backend takes one of {', '.join(LOCAL_LAUNCHERS)}")

    def processes(self, spec: LaunchSpec) -> list[tuple[list[str], dict[str, str]]]:
        """What runs: each process's argv and the variables it gets beyond this environment and the spec's."""
        if spec.nodes != 1:
            raise ValueError("the local backend runs on this node only: --nodes 1 (or the hostfile, slurm or kubernetes backend)")
        if self.launcher == "direct":
            envs = rank_environments(spec.gpus_per_node, self.master_port or free_port(), spec.process_env())
            return [(rank_argv(spec.entry_args), env) for env in envs]
        if self.launcher == "deepspeed":
            return [(deepspeed_command(spec.gpus_per_node, spec.entry_args, self.master_port), {})]
        if self.launcher == "python":
            if spec.gpus_per_node != 1:
                raise ValueError("--launcher python runs one process: --gpus-per-node 1 (or --launcher direct)")
            return [([sys.executable, "-m", ENTRY_MODULE, *spec.entry_args], {})]
        return [([torchrun_launcher(), "--nnodes", "1", "--nproc_per_node", str(spec.gpus_per_node), "--master_addr", "127.0.0.1",
                  "--master_port", str(self.master_port or free_port()), "--module", ENTRY_MODULE, *spec.entry_args], {})]

    def render(self, spec: LaunchSpec) -> str:
        return "".join(shlex.join([*(f"{k}={v}" for k, v in env.items()), *argv]) + "\n" for argv, env in self.processes(spec))

    def run(self, spec: LaunchSpec, *, log_line: Callable[[str], None] = print, wall_clock_limit_s: float | None = None) -> int:
        base = spec.process_env()
        return run_supervised([(argv, {**base, **env}) for argv, env in self.processes(spec)], log_line=log_line,
                              wall_clock_limit_s=wall_clock_limit_s)


BackendName = Literal["local", "hostfile", "slurm", "kubernetes"]
BACKENDS: dict[BackendName, type] = {
    "local": LocalBackend, "hostfile": HostfileBackend, "slurm": SlurmBackend, "kubernetes": KubernetesBackend,
}


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _typed(cls: type, option: str, value: Any) -> Any:
    """An option given as text (a Prefect form, a YAML profile) as the type of its field."""
    if not isinstance(value, str):
        return value
    hint = typing.get_type_hints(cls)[option]
    kinds = set(typing.get_args(hint)) or {hint}
    if bool in kinds:
        return value.strip().lower() in ("1", "true", "yes")
    for kind in (int, float, Path):
        if kind in kinds:
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"{_flag(option)}: {value!r} is not a number") from None
    return value


def make_backend(name: str, **options) -> Backend:
    """The backend called ``name`` with its options; an option it does not take is an error
    that names the command-line flag (``--partition does not apply to the local backend``)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    cls = BACKENDS[name]
    foreign = sorted(set(options) - {f.name for f in fields(cls)})
    if foreign:
        raise ValueError(f"{', '.join(map(_flag, foreign))} does not apply to the {name} backend")
    return cls(**{option: _typed(cls, option, value) for option, value in options.items()})


def launch(
    backend: str,
    entry_args: Sequence[str],
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    output_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    log_line: Callable[[str], None] = print,
    wall_clock_limit_s: float | None = None,
    dry_run: bool = False,
    **backend_options,
) -> int:
    """Run ``avsiam <entry_args>`` through ``backend`` and return its exit code.

    ``output_dir`` is the run folder: the cluster backends keep their state there (the Slurm job
    id) and derive the job name from it. Callers that know it pass it; for ``avsiam launch``,
    where a user gives only the avsiam arguments, it defaults to their ``--output``. With ``dry_run``
    the argv, sbatch script or manifest goes to ``log_line``, line by line, and nothing runs.
    """
    spec = LaunchSpec.create(entry_args, nodes=nodes, gpus_per_node=gpus_per_node, output_dir=output_dir, env=env)
    chosen = make_backend(backend, **backend_options)
    if dry_run:
        for line in chosen.render(spec).splitlines():
            log_line(line)
        return 0
    return chosen.run(spec, log_line=log_line, wall_clock_limit_s=wall_clock_limit_s)
