"""A moto S3 server for tests: one loopback subprocess per session, emptied before each test.

``moto_server`` yields the server's URL; ``s3_env`` points the standard AWS environment
(dummy credentials, ``AWS_ENDPOINT_URL``) at it, so code under test builds its clients as in
production. The server runs in its own process because moto reads some settings
(``S3_UPLOAD_PART_MIN_SIZE``) when it is imported, and so that it shares no state with
``mock_aws`` decorators elsewhere in the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from avsiam.launch.local import free_port

SERVER_ENV = {
    # AWS's 5 MiB floor on non-final parts would refuse MLflow's proxied multipart with KB chunks;
    # boto3 itself never sends a part under 5 MiB, so the floor tests nothing of ours.
    "S3_UPLOAD_PART_MIN_SIZE": "256",
    # moto derives the in-memory buffer of each key from the part floor (floor - 1 KiB): keep
    # small objects in memory instead of spilling every one to disk.
    "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(16 << 20),
}
_STARTUP_TIMEOUT_S = 60


def _post(url: str, body: bytes = b"") -> None:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def _wait_until_ready(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {url} not ready after {_STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto server (S3, IAM, ...) running for the whole session."""
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    url = f"http://127.0.0.1:{free_port()}"
    # moto's request recorder (off until a test starts it: see recorded_requests) writes here.
    recording = log_path.with_name("recording.jsonl")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV, "MOTO_RECORDER_FILEPATH": str(recording)},
        )
    try:
        _wait_until_ready(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(moto_server, monkeypatch, tmp_path) -> str:
    """The standard AWS environment aimed at an emptied ``moto_server``; returns its URL."""
    _post(f"{moto_server}/moto-api/reset")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    # A developer's ~/.aws must not leak into the tests (profiles, endpoints, real keys).
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


@contextmanager
def recorded_requests(server: str) -> Iterator[list[tuple[str, str]]]:
    """Record every request the moto ``server`` receives inside the block; the list yielded is
    filled with ``(method, path)`` pairs (path without the query) when the block ends."""
    _post(f"{server}/moto-api/recorder/reset-recording")
    _post(f"{server}/moto-api/recorder/start-recording")
    requests: list[tuple[str, str]] = []
    try:
        yield requests
    finally:
        _post(f"{server}/moto-api/recorder/stop-recording")
        with urllib.request.urlopen(f"{server}/moto-api/recorder/download-recording", timeout=30) as response:
            text = response.read().decode()
        # moto's server threads append an entry and its newline in two writes, so entries of
        # concurrent requests can share a line: split on the JSON objects themselves.
        decoder, position = json.JSONDecoder(), 0
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            if position == len(text):
                break
            entry, position = decoder.raw_decode(text, position)
            requests.append((entry["method"], urllib.parse.unquote(urllib.parse.urlsplit(entry["url"]).path)))
