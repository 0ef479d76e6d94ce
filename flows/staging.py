"""Staging as a map of shard tasks on Ray, through Prefect.

The ``avsiam-stage`` flow plans the staging (label files read and checked, sources identified
from metadata, clips assigned to shards; :func:`avsiam.data.staging.plan_staging`), runs
one Prefect task per shard on a Ray cluster through prefect-ray's ``RayTaskRunner``, and
writes the index once every shard has finished. Each task reads its own clips straight from
the source (a folder on a shared filesystem, or its S3 objects), so the flow host never
downloads or decodes the corpus; its progress is a Prefect progress artifact.

Where the tasks run: with no ``address`` a temporary local Ray cluster on this machine's CPUs
(``workers`` of them; the embedded default of ``make demo`` and ``avsiam stage``), shut down
when the flow ends; with ``address="auto"`` (inside a cluster) or ``ray://head:10001`` an
existing cluster, whose workers run the same image and reach the Prefect API and the data.
The flow hands its Prefect API URL to the Ray workers, so their task runs report to the same
server (an ephemeral one included) instead of each starting a server of its own.

Resumption needs no Prefect cache: each shard's record lives beside the shard, so a task whose
shard is already complete returns at once, whichever orchestrator (or none) ran it before, and
a shard deleted or damaged behind the index's back is rebuilt rather than trusted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner
from pydantic import BaseModel

from avsiam.data.sources import local_copy
from avsiam.data.staging import ShardResult, ShardSpec, StagingRequest, finalize_staging, plan_staging, stage_shard

# The object store holds task arguments and results (shard specs and records: ~0.3 MB per
# 1,000 clips), not media; Ray's default of 30 % of RAM would reserve GBs of /dev/shm.
LOCAL_OBJECT_STORE_BYTES = 1 << 30


class StagingSummary(BaseModel):
    """What the staging flow returns: small, typed, and enough for the stages after it."""

    location: str  # the staged dataset: folder or s3:// prefix
    dataset_digest: str
    num_clips: int
    splits: dict[str, int]
    multi_label: bool
    shards: int
    shards_built: int
    shards_reused: int
    decoded: int
    copied: int
    quarantined: int
    staged_with_warning: int  # e.g. silent clips kept with silent_audio="warn"; listed in quarantine.csv
    fetched_objects: int
    fetched_bytes: int
    shard_seconds: float  # wall-clock of the shard tasks, first submitted to last finished
    cpu_seconds: float  # CPU time of the shard tasks, summed
    example_video: str | None = None  # one staged clip's video (a test clip if any)


class AvsiamRayTaskRunner(RayTaskRunner):
    """prefect-ray's task runner, telling the Ray workers where this flow's Prefect API is.

    Workers of a local cluster inherit this process's environment, but an ephemeral Prefect
    server has no ``PREFECT_API_URL`` in it, and workers of a remote cluster have their own;
    without the URL every worker would start a Prefect server of its own.
    """

    def __enter__(self):
        url = str(get_client(sync_client=True).api_url)
        runtime_env = dict(self.init_kwargs.get("runtime_env") or {})
        env_vars = {"PREFECT_API_URL": url, **(runtime_env.get("env_vars") or {})}
        self.init_kwargs = {**self.init_kwargs, "runtime_env": {**runtime_env, "env_vars": env_vars}}
        return super().__enter__()


def ray_task_runner(address: str | None = None, workers: int | None = None) -> AvsiamRayTaskRunner:
    """A temporary local cluster of ``workers`` CPUs (default: all), or the cluster at ``address``."""
    if address:
        return AvsiamRayTaskRunner(address=address)
    init_kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    if workers:
        init_kwargs["num_cpus"] = workers
    return AvsiamRayTaskRunner(init_kwargs=init_kwargs)


@task(name="stage_shard", task_run_name="stage_shard-{spec.slot}", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def stage_shard_task(spec: ShardSpec) -> ShardResult:
    """One shard: reused when complete, else built from its own clips (transient S3 errors retried)."""
    return stage_shard(spec)


@flow(name="avsiam-stage", log_prints=True)
def stage_flow(request: StagingRequest) -> StagingSummary:
    """Stage the clips ``request.labels`` name into ``request.out`` (a folder or s3:// prefix)."""
    log = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="avsiam-labels-") as tmp:
        local = request.model_copy(update={
            "labels": [str(local_copy(f, Path(tmp))) for f in request.labels],
            "classes_csv": str(local_copy(request.classes_csv, Path(tmp))) if request.classes_csv else None,
        })
        plan = plan_staging(local, description=", ".join(request.labels))
    total = len(plan.shards)
    log.info("%d clips in %d shards of up to %d clips -> %s", plan.num_clips, total, request.clips_per_shard, plan.store.location)
    progress = create_progress_artifact(0.0, key="avsiam-staging", description=f"shards staged into {plan.store.location}")
    results: list[ShardResult] = []
    started = time.perf_counter()
    for future in as_completed(stage_shard_task.map(plan.shards)):
        result = future.result()
        results.append(result)
        how = "reused" if result.reused else f"{result.decoded} decoded, {result.copied} copied"
        log.info("[%d/%d] %s: %d clips (%s), %d quarantined, %d staged with a warning", len(results), total,
                 result.name, len(result.samples), how, len(result.quarantined), len(result.warnings))
        update_progress_artifact(progress, 100.0 * len(results) / total)
    shard_seconds = time.perf_counter() - started
    staged = finalize_staging(plan, results)
    index = staged.index
    log.info("staged %d clips (%d decoded, %d copied from earlier shards), %d quarantined, %d staged with a warning; "
             "%d shards built, %d reused in %.1f s (%.2f CPU-s per decoded clip); dataset digest %s", len(index.clips),
             staged.decoded, staged.copied, len(staged.quarantined), len(staged.warnings), staged.shards_built, staged.shards_reused, shard_seconds,
             staged.cpu_seconds / max(1, staged.decoded), index.dataset_digest)
    return StagingSummary(
        location=index.location, dataset_digest=index.dataset_digest, num_clips=len(index.clips), splits=index.split_counts(),
        multi_label=index.multi_label, shards=len(index.shards), shards_built=staged.shards_built,
        shards_reused=staged.shards_reused, decoded=staged.decoded, copied=staged.copied, quarantined=len(staged.quarantined),
        staged_with_warning=len(staged.warnings), fetched_objects=staged.fetched_objects, fetched_bytes=staged.fetched_bytes, shard_seconds=shard_seconds,
        cpu_seconds=staged.cpu_seconds, example_video=staged.example_video,
    )


def run_staging(request: StagingRequest, *, address: str | None = None, workers: int | None = None) -> StagingSummary:
    """Run :func:`stage_flow` with its shard tasks on Ray (see the module docstring)."""
    return stage_flow.with_options(task_runner=ray_task_runner(address, workers))(request)
