"""``avsiam serve``: the serve-based setup. One long-running process registers the ``full`` and
``retrain`` deployments declared in ``prefect.yaml`` (same parameters, schedule and
concurrency limit) and runs their flow runs itself, without a work pool or worker."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import avsiam_pipeline

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def deployments_from_prefect_yaml(path: Path = PREFECT_YAML) -> list:
    declared = yaml.safe_load(path.read_text())["deployments"]
    out = []
    for d in declared:
        limit = d.get("concurrency_limit")
        concurrency = None
        if isinstance(limit, dict):
            concurrency = ConcurrencyLimitConfig(limit=limit["limit"],
                                                 collision_strategy=ConcurrencyLimitStrategy(limit.get("collision_strategy", "ENQUEUE")))
        schedule = (d.get("schedules") or [{}])[0]
        out.append(avsiam_pipeline.to_deployment(
            name=d["name"], description=d.get("description"), parameters=d.get("parameters") or {}, tags=d.get("tags"),
            cron=schedule.get("cron"), concurrency_limit=concurrency or limit,
        ))
    return out


def serve_deployments() -> None:
    # Schedules keep running when this process restarts: do not pause them on shutdown.
    serve(*deployments_from_prefect_yaml(), pause_on_shutdown=False)
