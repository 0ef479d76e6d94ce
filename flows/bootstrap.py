"""``python -m flows.bootstrap``: prepare a self-hosted Prefect server for avsiam (idempotent).

* The process work pool ``avsiam-local`` that the deployments in prefect.yaml name:
  ``prefect deploy`` refuses a pool that does not exist.
* The automation that marks flow runs as Crashed when their heartbeats stop (a killed worker, a
  lost node, an evicted pod). Prefect Cloud has it built in; a self-hosted server does not, and
  without it such runs stay Running forever, holding the ``retrain`` deployment's concurrency
  slot (Prefect's guide "Detect zombie flows", docs/v3/advanced/detect-zombie-flows). A crashed ``avsiam/full`` run is
  then simply run again: its finished stages come from the cache and its training stage
  resumes from the checkpoint.

Run it once per server, against ``PREFECT_API_URL``; running it again changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from prefect import get_client
from prefect.automations import Automation
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

WORK_POOL = "avsiam-local"  # prefect.yaml's deployments run here
ZOMBIE_AUTOMATION = "avsiam: crash flow runs whose heartbeats stopped"
# Prefect's guidance: declare a run dead after missing about three heartbeats.
MISSED_HEARTBEATS = 3


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool ``name`` unless it exists; True when it was created."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def zombie_run_automation(heartbeat_seconds: int) -> Automation:
    """Crashed for every flow run that sent a heartbeat and then nothing (neither another
    heartbeat nor a terminal state) for ``MISSED_HEARTBEATS`` heartbeat periods."""
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="Marks flow runs whose heartbeats stopped as Crashed (created by flows/bootstrap.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS * heartbeat_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="No heartbeat for "
                                    f"{MISSED_HEARTBEATS * heartbeat_seconds} s: the flow run's process is gone.")],
    )


def ensure_zombie_run_automation(heartbeat_seconds: int | None = None) -> bool:
    """Create the zombie-run automation unless one of that name exists; True when created.

    ``heartbeat_seconds`` defaults to ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, the period the
    workers' flow runs send heartbeats at (set the same value on the workers)."""
    if heartbeat_seconds is None:
        heartbeat_seconds = get_current_settings().flows.heartbeat_frequency
    if not heartbeat_seconds:
        raise ValueError("PREFECT_FLOWS_HEARTBEAT_FREQUENCY is unset: flow runs send no heartbeats to watch")
    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return False
    except ValueError:  # Automation.read's "not found"
        zombie_run_automation(heartbeat_seconds).create()
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heartbeat-seconds", type=int, default=None,
                        help="flow-run heartbeat period (default: PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    args = parser.parse_args(argv)
    created = ensure_work_pool()
    print(f"work pool {WORK_POOL}: {'created' if created else 'exists'}")
    created = ensure_zombie_run_automation(args.heartbeat_seconds)
    print(f"automation {ZOMBIE_AUTOMATION!r}: {'created' if created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
