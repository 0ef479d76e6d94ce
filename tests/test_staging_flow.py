"""Staging as users run it: `avsiam stage`, i.e. the Prefect staging flow with one task per shard on
a real local Ray cluster; killed mid-way and run again; from a Moto S3 prefix into S3."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import avsiam
from s3_fixtures import recorded_requests

from avsiam.data.index import load_index
from avsiam.storage.s3 import list_objects, s3_client

pytestmark = pytest.mark.slow

SUMMARY = re.compile(r"staged (\d+) clips in (\d+) shards \((\d+) built, (\d+) reused; (\d+) clips decoded, (\d+) copied\)")


def stage_args(ds, out, *extra):
    return ["stage", "--videos", ds.videos_dir, "--labels", ds.labels_csv, "--out", out, "--workers", 2,
            "--clips-per-shard", 8, *extra]


def session_members(sid: int) -> list[int]:
    """Processes of session ``sid``: Ray puts its workers in process groups of their own, not sessions."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after the command: state, ppid, pgrp, session; zombies are dead
            members.append(int(stat.parent.name))
    return members


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session, as a lost machine would, and wait until none is left."""
    deadline = time.monotonic() + 60
    while members := session_members(sid):
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes {members} survive SIGKILL"
        time.sleep(0.1)


def summary(stdout: str) -> dict[str, int]:
    found = SUMMARY.search(stdout)
    assert found, stdout[-2000:]
    return dict(zip(["clips", "shards", "built", "reused", "decoded", "copied"], map(int, found.groups())))


def test_killed_staging_on_ray_keeps_finished_shards_and_ends_as_in_process_staging(synthetic_single, staged_single, tmp_path):
    out = tmp_path / "staged"
    cmd = [sys.executable, "-m", "avsiam.cli.main", *map(str, stage_args(synthetic_single, out))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list((out / "shards").glob("*.json"))) < 2:
        assert proc.poll() is None, "staging ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kill_session(proc.pid)  # the CLI, its Prefect server and the Ray cluster it started, workers included
    proc.wait()
    assert not (out / "index.json").exists()
    finished = {p.stem: json.loads(p.read_text()) for p in (out / "shards").glob("*.json")}
    assert 2 <= len(finished) < 6

    again = summary(avsiam(*stage_args(synthetic_single, out)).stdout)
    # Every shard the killed run finished is reused, not decoded again; the rest is decoded once.
    assert again["reused"] == len(finished) and again["built"] == 6 - len(finished)
    assert again["decoded"] == 40 - sum(len(r["samples"]) for r in finished.values())
    # The Ray path writes exactly what the in-process path wrote (same shards, same digest).
    assert load_index(out).dataset_digest == load_index(staged_single).dataset_digest


def test_staging_from_s3_reads_only_the_listed_clips_and_writes_the_shards_to_s3(synthetic_single, s3_env):
    """(Training from S3 shards is tests/test_production.py's first scenario.)"""
    client = s3_client()
    client.create_bucket(Bucket="avsiam-data")
    videos = sorted(synthetic_single.videos_dir.iterdir())
    absent = videos[0].name  # named by the labels, never uploaded
    for path in videos[1:]:
        client.upload_file(str(path), "avsiam-data", f"raw/videos/{path.name}")
    client.put_object(Bucket="avsiam-data", Key="raw/videos/unlisted_000001.mp4", Body=os.urandom(200_000))
    client.upload_file(str(synthetic_single.labels_csv), "avsiam-data", "raw/labels.csv")

    with recorded_requests(s3_env) as requests:
        proc = avsiam("stage", "--videos", "s3://avsiam-data/raw/videos", "--labels", "s3://avsiam-data/raw/labels.csv",
                      "--out", "s3://avsiam-data/staged", "--workers", 2, "--clips-per-shard", 8)
    result = summary(proc.stdout)
    assert (result["clips"], result["decoded"]) == (39, 39)
    # Each shard task fetched its own clips: every listed clip once, nothing unlisted, no bucket walk.
    clip_gets = sorted(path.rsplit("/", 1)[1] for method, path in requests if method == "GET" and "/raw/videos/" in path)
    assert clip_gets == sorted(p.name for p in videos[1:])
    assert not any("unlisted" in path for _, path in requests)

    index = load_index("s3://avsiam-data/staged")
    assert {o.key.rsplit("/", 1)[1] for o in list_objects("s3://avsiam-data/staged/shards") if o.key.endswith(".tar")} \
        == {s.name for s in index.shards}
    quarantine = client.get_object(Bucket="avsiam-data", Key="staged/quarantine.csv")["Body"].read().decode()
    assert absent[:-4] in quarantine and "missing file" in quarantine
