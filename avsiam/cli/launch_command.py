"""``avsiam launch``: run an avsiam command on N nodes x G GPUs through a launcher or a scheduler.

  avsiam launch --backend local --gpus-per-node 2 -- train pretrain --model tiny --data D --output O
  avsiam launch --backend hostfile --hostfile hosts --nodes 2 --gpus-per-node 8 -- train pretrain ...
  avsiam launch --backend hostfile --no-ssh --node-rank 1 --master-addr node0 --nodes 2 ... -- ...
  avsiam launch --backend slurm --nodes 8 --gpus-per-node 8 --partition v100 --time-limit 72:00:00 -- ...
  avsiam launch --backend kubernetes [--k8s-api pytorchjob] --nodes 8 --gpus-per-node 8 -- ...

Everything after ``--`` is the avsiam command each rank runs. --dry-run prints the argv, the
sbatch script or the manifest instead of running it. Slurm and Kubernetes jobs are followed
to their end; SIGTERM or Ctrl-C cancels them (scancel, kubectl delete), and running the same
command again re-attaches to a job that is still pending or running.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avsiam.launch.backends import BACKENDS, launch


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _claim_mount(text: str) -> tuple[str, str]:
    claim, sep, path = text.partition(":")
    if not sep or not claim or not path.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected CLAIM:/mount/path, got {text!r}")
    return claim, path


def _backend_options(p: argparse.ArgumentParser) -> None:
    """Options of one backend or another; their dest is the backend's field name, and one
    given to a backend that does not take it is an error. None means "the backend's default"."""
    g = p.add_argument_group("local and hostfile backends")
    g.add_argument("--launcher",
                   help="local: direct (default: this command starts the ranks), deepspeed, torchrun, or python (one process, no launcher); hostfile: pdsh (default), openmpi, mvapich, mpich, impi, slurm")
    g.add_argument("--master-port", type=int,
                   help="rendezvous port (slurm: on the first node; default 29500, local: a free port)")
    g.add_argument("--hostfile", type=Path,
                   help="hostfile: lines of `host slots=N` (written into the run folder with --no-ssh when omitted)")
    g.add_argument("--no-ssh", action="store_true", default=None,
                   help="hostfile: start this node only (deepspeed --no_ssh), as pods and srun tasks do")
    g.add_argument("--node-rank", type=int, help="hostfile --no-ssh: this node's rank, 0..nodes-1")
    g.add_argument("--master-addr", help="hostfile: address of node 0")

    g = p.add_argument_group("slurm backend")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time-limit", metavar="TIME", help="sbatch --time, e.g. 72:00:00 or 3-00:00:00")
    g.add_argument("--env-file", help="file of KEY=VALUE lines sourced by the job on the first node and exported to every task")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per node (one task per node)")
    g.add_argument("--torchrun", help="torchrun on the compute nodes (default: torchrun on the job's PATH)")
    g.add_argument("--template", type=Path, help="sbatch template (default: infra/slurm/train.sbatch.j2)")

    g = p.add_argument_group("kubernetes backend")
    g.add_argument("--k8s-api", choices=["trainjob", "pytorchjob"],
                   help="Kubeflow Trainer v2 TrainJob (default) or Training Operator v1 PyTorchJob")
    g.add_argument("--namespace")
    g.add_argument("--image", help="training image (default avsiam:cu126)")
    g.add_argument("--runtime", help="ClusterTrainingRuntime of the TrainJob (default torch-distributed)")
    g.add_argument("--queue", help="Kueue LocalQueue (trainjob) or Volcano queue (pytorchjob); default avsiam")
    g.add_argument("--pvc", type=_claim_mount, action="append", metavar="CLAIM:/PATH",
                   help="shared volume to mount (repeatable; default avsiam-cache:/data and avsiam-runs:/runs)")
    g.add_argument("--cpu", help="CPU request per node, e.g. 64")
    g.add_argument("--memory", help="memory request per node, e.g. 480Gi")
    g.add_argument("--credentials-secret", metavar="SECRET",
                   help="a Secret in the namespace whose keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
                        "MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN (any of them) become the job's environment")

    g = p.add_argument_group("slurm and kubernetes backends")
    g.add_argument("--job-name", help="default: derived from the run folder (stable, so a retry finds the job)")
    g.add_argument("--poll-interval-s", type=float, help="seconds between scheduler polls (default 30)")


BACKEND_OPTIONS = (
    "launcher", "master_port", "hostfile", "no_ssh", "node_rank", "master_addr", "partition", "account", "time_limit",
    "env_file", "cpus_per_task", "torchrun", "template", "k8s_api", "namespace", "image", "runtime", "queue", "pvc",
    "cpu", "memory", "credentials_secret", "job_name", "poll_interval_s",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run an avsiam command on N nodes x G GPUs (local, hostfile, slurm, kubernetes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, choices=list(BACKENDS))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node")
    p.add_argument("--dry-run", action="store_true", help="print what would be run or submitted, and stop")
    p.add_argument("--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every rank (repeatable)")
    p.add_argument("--wall-clock-limit-s", type=float, metavar="SECONDS",
                   help="stop the run (kill the local group, scancel, kubectl delete) after this long")
    _backend_options(p)
    p.add_argument("entry_args", nargs="*", metavar="-- AVSIAM_ARGS", help="the avsiam command every rank runs")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in BACKEND_OPTIONS if getattr(args, name) is not None}
    if "pvc" in options:
        options["pvc"] = dict(options["pvc"])
    try:
        return launch(args.backend, args.entry_args, nodes=args.nodes, gpus_per_node=args.gpus_per_node, env=dict(args.env),
                      wall_clock_limit_s=args.wall_clock_limit_s, dry_run=args.dry_run, **options)
    except ValueError as exc:
        print(f"avsiam launch: error: {exc}", file=sys.stderr)
        return 2
