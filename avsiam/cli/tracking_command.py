"""``avsiam tracking sync RUN_DIR...``: deliver the tracking records an MLflow outage left behind.

A training run or a pipeline flow that lost its MLflow server keeps its records in
``tracking_spool.jsonl`` files in its folders and re-sends them while it runs and when it
ends. When the server came back only after that, this command sends them (every spool at or
under each RUN_DIR; parent runs before their children): to
``MLFLOW_TRACKING_URI``, which must be the server the records were logged for (without it, the
server they name, where that URI holds no credentials). Exit status 1 while any folder still
has undelivered records (the server is still down); run it again later.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tracking", help="tracking maintenance (deliver records spooled during an MLflow outage)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sync = actions.add_parser("sync", help="send the spooled records of run folders to MLflow", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sync.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                      help="a training or evaluation output folder, or a pipeline's output folder (every spool under it)")
    sync.set_defaults(handler=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    from avsiam.config import ConfigError
    from avsiam.tracking.mlflow_tracker import SyncError, spooled_folders, sync_spools

    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: not a folder")
    folders = spooled_folders(args.run_dirs)
    if not folders:
        print("nothing to send: no tracking spool in " + ", ".join(map(str, args.run_dirs)))
        return 0
    try:
        results = sync_spools(folders)
    except SyncError as exc:
        raise ConfigError(str(exc)) from None
    pending = 0
    for folder, (sent, left) in results.items():
        pending += left
        state = "all delivered" if not left else f"{left} still spooled (MLflow unreachable, or a parent run not created yet)"
        print(f"{folder}: sent {sent} records, {state}")
    if pending:
        print(f"avsiam tracking: {pending} records could not be delivered yet; run this again later", file=sys.stderr)
    return 1 if pending else 0
