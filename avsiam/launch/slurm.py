"""The Slurm backend: render an sbatch script, submit it, follow the job to its end.

The script (``infra/slurm/train.sbatch.j2``) runs one srun task per node, and each task runs
``torchrun --nnodes $SLURM_NNODES --nproc_per_node G --rdzv_backend c10d`` with the
rendezvous on the allocation's first node. torchrun rather than ``deepspeed --no_ssh``: the
c10d rendezvous needs only the first host name, where ``deepspeed --no_ssh`` would also need
a hostfile listing every node in the same order on every node plus a per-task node rank; and
torchrun passes the SIGTERM of ``scancel`` on to its ranks. The ranks read LOCAL_RANK/RANK
from the environment as usual, and DeepSpeed takes over from there.

The job id is recorded in ``<run folder>/slurm_job.json`` together with the script's digest:
a retry (a Prefect retry, a restarted worker) re-attaches to that job while it is pending or
running instead of submitting a second one, and refuses to if the job runs another script.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from avsiam.launch.hostfile import write_atomically
from avsiam.launch.jobs import JobStatus, LogTail, follow
from avsiam.launch.local import ENTRY_MODULE
from avsiam.launch.runner import CommandRunner, SubprocessRunner
from avsiam.launch.spec import LaunchSpec, digest_of, job_name_for

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "slurm" / "train.sbatch.j2"
STATE_FILE = "slurm_job.json"
SCRIPT_FILE = "slurm_job.sbatch"

# Job states after which the job will not run again (squeue(1), sacct(1) "JOB STATE CODES").
FINISHED_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "REVOKED", "TIMEOUT",
})
# sbatch reads #SBATCH lines itself, not through a shell: a newline would end the directive
# and start a command, and its quote handling is not the shell's. Such values are refused.
_UNSAFE_IN_DIRECTIVE = re.compile(r"[\x00-\x1f\x7f'\"\\]")


def directive_value(value: object) -> str:
    """A value for an ``#SBATCH`` line: checked, then quoted when it has spaces."""
    text = str(value)
    if _UNSAFE_IN_DIRECTIVE.search(text):
        raise ValueError(f"{text!r} cannot go into an #SBATCH line (quotes, backslashes and control characters are refused)")
    return shlex.quote(text)


def _template_environment(folder: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(folder), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["directive"] = directive_value
    return env


def _exit_code(state: str, exit_field: str) -> int:
    """sacct's ExitCode is ``code:signal``; a failed job whose code is 0 still failed."""
    if state == "COMPLETED":
        return 0
    code = exit_field.split(":")[0]
    return int(code) if code.isdigit() and int(code) else 1


@dataclass(frozen=True)
class SlurmBackend:
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None  # sbatch --time, e.g. 72:00:00 or 3-00:00:00
    job_name: str | None = None  # default: derived from the run folder
    env_file: str | None = None  # sourced on the batch host; srun exports it to every task
    cpus_per_task: int | None = None  # one task per node: the node's CPUs for data loading
    torchrun: str = "torchrun"  # on the compute nodes (sbatch exports the submitter's PATH)
    master_port: int = 29500
    poll_interval_s: float = 30.0  # squeue/sacct load slurmctld/slurmdbd: poll gently
    template: Path = DEFAULT_TEMPLATE
    runner: CommandRunner = field(default_factory=SubprocessRunner)

    # -- rendering -------------------------------------------------------------------------

    def render(self, spec: LaunchSpec) -> str:
        out = spec.run_folder("slurm")
        template = Path(self.template)
        if not template.is_file():
            raise FileNotFoundError(f"the sbatch template {template} is missing (it lives in infra/slurm of the repository)")
        return _template_environment(template.parent).get_template(template.name).render(
            job_name=self.job_name or job_name_for(out), nodes=spec.nodes, gpus_per_node=spec.gpus_per_node,
            partition=self.partition, account=self.account, time_limit=self.time_limit,
            cpus_per_task=self.cpus_per_task, log_path=out / "slurm-%j.out", env_file=self.env_file,
            env=dict(spec.env), torchrun=self.torchrun, master_port=self.master_port, entry_module=ENTRY_MODULE,
            entry_args=spec.entry_args,
        )

    # -- talking to Slurm ------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus | None:
        """squeue while the job is queued or running; sacct for how it ended."""
        queue = self.runner.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"])
        queued = queue.stdout.split()[0] if queue.returncode == 0 and queue.stdout.strip() else None
        if queued and queued not in FINISHED_STATES:
            return JobStatus(queued, True)
        acct = self.runner.run(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id,
                                "--format", "State,ExitCode"])
        rows = acct.stdout.strip().splitlines() if acct.returncode == 0 else []
        if rows:
            state_field, _, exit_field = rows[-1].partition("|")
            state = state_field.split()[0] if state_field.strip() else "UNKNOWN"  # "CANCELLED by 1000"
            if state not in FINISHED_STATES:
                return JobStatus(state, True)
            return JobStatus(state, False, _exit_code(state, exit_field))
        if queued:  # finished, and this cluster keeps no accounting
            return JobStatus(queued, False, 0 if queued == "COMPLETED" else 1)
        return None

    def submit(self, spec: LaunchSpec, script: str, log_line: Callable[[str], None]) -> str:
        out = spec.run_folder("slurm")
        out.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
        path = out / SCRIPT_FILE
        write_atomically(path, script)
        done = self.runner.run(["sbatch", "--parsable", str(path)])
        job_id = done.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
        if done.returncode != 0 or not job_id:
            raise RuntimeError(f"sbatch failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        record = {"job_id": job_id, "script_sha256": digest_of(script),
                  "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_atomically(out / STATE_FILE, json.dumps(record, indent=1) + "\n")
        log_line(f"submitted slurm job {job_id} ({path})")
        return job_id

    def recorded_job(self, spec: LaunchSpec) -> Mapping[str, str] | None:
        path = spec.run_folder("slurm") / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def running_job(self, spec: LaunchSpec, script: str, log_line: Callable[[str], None]) -> str | None:
        """The recorded job id when that job is still pending or running (and runs ``script``)."""
        record = self.recorded_job(spec)
        if record is None:
            return None
        job_id = record["job_id"]
        current = self.status(job_id)
        if current is None or not current.active:
            return None
        if record.get("script_sha256") != digest_of(script):
            raise RuntimeError(f"slurm job {job_id} ({current.state}) runs a different script in {spec.output_dir}; "
                               f"scancel {job_id} or use another output folder")
        log_line(f"re-attaching to slurm job {job_id} ({current.state})")
        return job_id

    def cancel(self, spec: LaunchSpec, log_line: Callable[[str], None] = print) -> None:
        """scancel the recorded job (also for a Prefect on_cancellation hook, where the
        follower runs in a worker thread and cannot catch the signal itself)."""
        record = self.recorded_job(spec)
        if record is not None:
            self._scancel(record["job_id"], log_line)

    def _scancel(self, job_id: str, log_line: Callable[[str], None]) -> None:
        done = self.runner.run(["scancel", job_id])
        log_line(f"scancel {job_id}: " + ("ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()}"))

    # -- the backend -----------------------------------------------------------------------

    def run(self, spec: LaunchSpec, *, log_line: Callable[[str], None] = print, wall_clock_limit_s: float | None = None) -> int:
        script = self.render(spec)
        job_id = self.running_job(spec, script, log_line) or self.submit(spec, script, log_line)
        return follow(
            f"slurm job {job_id}", lambda: self.status(job_id), lambda: self._scancel(job_id, log_line),
            log_line=log_line, poll_interval_s=self.poll_interval_s, wall_clock_limit_s=wall_clock_limit_s,
            log_tail=LogTail(spec.run_folder("slurm") / f"slurm-{job_id}.out"),
        )
