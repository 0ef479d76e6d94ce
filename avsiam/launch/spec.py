"""What every backend launches: ``avsiam <entry_args>`` on N nodes x G GPUs, with extra
environment variables, writing into one run folder."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from avsiam.storage.digest import data_digest

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def output_dir_of(entry_args: Sequence[str]) -> Path | None:
    """The run folder named by ``--output`` in the avsiam arguments, if any."""
    for i, arg in enumerate(entry_args):
        if arg == "--output" and i + 1 < len(entry_args):
            return Path(entry_args[i + 1])
        if arg.startswith("--output="):
            return Path(arg.split("=", 1)[1])
    return None


@dataclass(frozen=True)
class LaunchSpec:
    entry_args: tuple[str, ...]
    nodes: int = 1
    gpus_per_node: int = 1
    output_dir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.entry_args:
            raise ValueError("nothing to launch: give the avsiam arguments after `--`, e.g. -- train pretrain ...")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"nodes and gpus per node must be at least 1, got {self.nodes} x {self.gpus_per_node}")
        bad = [k for k in self.env if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"not an environment variable name: {', '.join(map(repr, bad))}")

    @classmethod
    def create(cls, entry_args: Sequence[str], *, nodes: int = 1, gpus_per_node: int = 1,
               output_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> LaunchSpec:
        """A spec whose run folder defaults to the ``--output`` of the avsiam arguments."""
        out = Path(output_dir) if output_dir is not None else output_dir_of(entry_args)
        return cls(tuple(map(str, entry_args)), nodes, gpus_per_node, out, dict(env or {}))

    def run_folder(self, backend: str) -> Path:
        if self.output_dir is None:
            raise ValueError(f"the {backend} backend keeps its state in the run folder: pass --output in the avsiam arguments")
        return self.output_dir

    def process_env(self) -> dict[str, str]:
        """This process's environment plus the spec's variables (for launchers run here)."""
        return {**os.environ, **self.env}


def job_name_for(output_dir: Path) -> str:
    """A stable scheduler job name for a run folder (an RFC 1035 label: Kubernetes needs one).

    Stable, so a retry finds the job it submitted before; the digest keeps two run folders
    with the same last component apart.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", output_dir.name.lower()).strip("-")[:40] or "run"
    return f"avsiam-{slug}-{data_digest(str(output_dir))[:8]}"


def digest_of(obj: object) -> str:
    """sha256 of a script or manifest: a re-attached job must run exactly what we would submit."""
    return data_digest(obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True))
