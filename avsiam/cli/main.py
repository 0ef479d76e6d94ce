"""Entry point of the ``avsiam`` console script.

Each subcommand lives in its own module with ``register(subparsers)``, which adds the
subcommand's parser and sets ``handler`` to the function that runs it. Library errors that
describe bad input (configuration, formats, decoding) are printed as one clear message and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from avsiam import __version__
from avsiam.cli import (
    compare_command,
    data_commands,
    launch_command,
    plan_command,
    predict_command,
    presets_command,
    serve_command,
    tracking_command,
    train_commands,
)
from avsiam.config import ConfigError
from avsiam.data.formats import FormatError

COMMANDS = (presets_command, data_commands, train_commands, launch_command, compare_command, plan_command, predict_command,
            serve_command, tracking_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsiam",
        description="AVSiam training workflow: data staging, DeepSpeed training, evaluation, orchestration.",
    )
    parser.add_argument("--version", action="version", version=f"avsiam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _log_to_stderr() -> None:
    """The library's INFO messages (resuming, weight loading, tracking) reach the terminal or
    the orchestrator's log; third-party loggers keep their own levels."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("avsiam")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, FormatError, FileNotFoundError) as exc:
        print(f"avsiam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
