"""``avsiam serve``: run the ``full`` and ``retrain`` deployments from this process (Prefect's
serve-based setup; needs a Prefect server: PREFECT_API_URL)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the avsiam/full and avsiam/retrain deployments (no worker needed)",
                       description=__doc__)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Orchestration lives in flows/, outside the library: imported only for this command.
    from flows.serve import serve_deployments

    serve_deployments()
    return 0
