"""S3 (or an S3-compatible store) for data staging and checkpoint sync.

Clients come from the standard AWS environment: the credential chain, ``AWS_DEFAULT_REGION``,
and the endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` or the shared config file,
which botocore (>= 1.31) reads itself. A custom endpoint (MinIO, Ceph, moto) is addressed
path-style. A URI ``s3://bucket/prefix`` names a folder: the objects whose keys start with
``prefix/``.

Integrity: every object is checked against the strongest digest it carries, before it gets
its final local name.

1. ``x-amz-meta-sha256``: written by :func:`upload_file` and :func:`sync_tree_to_s3` on every
   object, single-part or multipart.
2. The ETag, where it is the MD5 of the content: single-part uploads not encrypted with
   SSE-KMS or SSE-C.
3. A full-object ``ChecksumSHA256`` or ``ChecksumCRC32``, as recent AWS SDKs and CLIs attach.
   A multipart object's checksum counts only when S3 says ``ChecksumType: FULL_OBJECT``: a
   composite checksum hashes the part checksums, not the content.
4. Otherwise only the size, e.g. a multipart upload by an older tool. Such a download logs a
   warning naming the object.

Resume: a local file that already has the object's size and digest is skipped; checking it
costs a local hash and no transfer. Downloads go to ``<name>.partial`` and are renamed only
once verified. A killed run therefore never leaves a truncated file under a real name, and
the next run overwrites the partial file. ``download_file`` is not used because it writes its
own randomly named temporary file, which a killed run leaves behind, and renames it before it
can be verified; ``download_fileobj`` is the same managed transfer into a file of our naming.

Retries: botocore retries throttling, 5xx responses and connection errors (standard mode).
On top of that, each object is retried with backoff as a whole (HEAD, transfer,
verification). This covers checksum mismatches and an object replaced between its HEAD and
its GET. Missing objects and refused credentials or access are not retried.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError
from tqdm import tqdm

from avsiam.storage.digest import data_digest, file_digest

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
SHA256_METADATA = "sha256"  # S3 serves it as the x-amz-meta-sha256 header
PARTIAL_SUFFIX = ".partial"
WRITE_PROBE_NAME = ".avsiam-write-check"
RETRY_BACKOFF_S = 0.5
_TRANSFER_CONCURRENCY = 4  # threads per large object, for each of the `workers` objects in flight
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_MISSING = {"404", "NoSuchKey", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "AllAccessDisabled"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
# Retrying cannot help: the object or bucket is gone, access is refused, or the object is archived.
_PERMANENT = _MISSING | _DENIED | _BAD_CREDENTIALS | {"InvalidObjectState"}

T = TypeVar("T")
R = TypeVar("R")


class StorageError(RuntimeError):
    """S3 cannot be used or a transfer failed. The message names the URI or bucket and the
    endpoint, never credentials."""


class NoSuchObjectError(StorageError):
    """The object a URI names does not exist."""


class ChecksumMismatchError(StorageError):
    """Downloaded bytes differ from the object's recorded size or digest."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # without the quotes S3 puts around it


@dataclass
class SyncReport:
    uploaded: int = 0
    unchanged: int = 0  # S3 already held the same content


def s3_client(
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connect_timeout: float = 10,
    read_timeout: float = 60,
    max_pool_connections: int = 64,
):
    """An S3 client from the standard AWS environment, with botocore's standard retry mode.

    botocore finds the endpoint itself (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the
    shared config file); any endpoint that is not AWS's is addressed path-style.
    """
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    # A session per client: boto3's default session must not be shared between threads.
    session = boto3.session.Session()
    client = session.client("s3", config=config)
    if _is_aws_endpoint(client.meta.endpoint_url):
        return client
    # S3-compatible stores serve every bucket from one host; virtual-host style would resolve <bucket>.<host>.
    return session.client("s3", config=config.merge(Config(s3={"addressing_style": "path"})))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, prefix)``; the prefix has no trailing slash."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an S3 URI: expected s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_NAME.match(bucket):
        raise ValueError(f"{uri!r}: {bucket!r} is not a bucket name (letters, digits, '.', '-', '_'; at least 3)")
    return bucket, prefix.rstrip("/")


def check_access(uri: str, *, write: bool = False) -> None:
    """Raise :class:`StorageError` unless the credentials can list ``uri`` and, with ``write``,
    create an object under it. The message says which failed: no credentials, refused
    credentials, bucket missing, access denied, or endpoint unreachable.

    Runs before any stage, so it uses short timeouts and one retry: an unreachable endpoint
    fails in seconds, not after minutes of backoff.
    """
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(max_attempts=2, connect_timeout=5, read_timeout=15)
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=_folder(prefix), MaxKeys=1)
        if write:
            _probe_write(client, bucket, prefix)
    except Exception as exc:  # every failure becomes one message naming the bucket and the endpoint
        raise StorageError(_explain(exc, uri, _endpoint_name(client))) from None


def list_objects(uri: str) -> list[ObjectInfo]:
    """Every object under the folder ``uri``, in key order."""
    return _list(s3_client(), uri)


def download_object(uri: str, path: str | Path, *, retries: int = 3) -> bool:
    """Download the object ``uri`` to ``path``, verified and atomic. Returns False when
    ``path`` already held the object, so nothing was transferred.

    Raises :class:`NoSuchObjectError` when the object does not exist.
    """
    bucket, key = _object_location(uri)
    client = s3_client()
    bar = _ByteProgress(0, uri, enabled=False)
    try:
        status, verified = _fetch_with_retries(client, bucket, key, Path(path), retries, bar)
    except Exception as exc:  # every failure becomes one message naming the URI and the endpoint
        error = NoSuchObjectError if _error_code(exc) in _MISSING else StorageError
        raise error(_explain(exc, uri, _endpoint_name(client))) from None
    if not verified:
        log.warning("%s carries no digest (multipart, no checksum): checked by its size only", uri)
    return status == "downloaded"


def upload_file(path: str | Path, uri: str, *, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD) -> None:
    """Upload ``path`` to the object ``uri``, recording its sha256 as ``x-amz-meta-sha256``.

    Files above ``multipart_threshold`` go in parts of that size, with S3's minimum of 5 MiB.
    """
    bucket, key = _object_location(uri)
    client = s3_client()
    try:
        _upload(client, Path(path), bucket, key, _upload_config(multipart_threshold), None)
    except Exception as exc:  # every failure becomes one message naming the URI and the endpoint
        raise StorageError(f"uploading {path}: {_explain(exc, uri, _endpoint_name(client))}") from None


def read_object(uri: str) -> bytes:
    """The content of a small object (an index, a shard record), checked against its digest.

    Raises :class:`NoSuchObjectError` when the object does not exist.
    """
    bucket, key = _object_location(uri)
    client = s3_client()
    try:
        response = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        data = response["Body"].read()
    except Exception as exc:  # every failure becomes one message naming the URI and the endpoint
        error = NoSuchObjectError if _error_code(exc) in _MISSING else StorageError
        raise error(_explain(exc, uri, _endpoint_name(client))) from None
    expected = _expected_digest(response)
    if expected is not None:
        algorithm, digest = expected
        actual = data_digest(data, algorithm)
        if actual != digest:
            raise ChecksumMismatchError(f"{uri}: downloaded bytes differ from the object: {algorithm} {actual} != {digest}")
    return data


def object_size(uri: str) -> int | None:
    """The size of the object ``uri`` (one HEAD), or None when it does not exist."""
    bucket, key = _object_location(uri)
    client = s3_client()
    try:
        return client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as exc:  # every failure becomes one message naming the URI and the endpoint
        if _error_code(exc) in _MISSING:
            return None
        raise StorageError(_explain(exc, uri, _endpoint_name(client))) from None


def write_object(uri: str, data: bytes) -> None:
    """Store ``data`` as the object ``uri`` in one PUT, recording its sha256."""
    bucket, key = _object_location(uri)
    client = s3_client()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={SHA256_METADATA: data_digest(data)})
    except Exception as exc:  # every failure becomes one message naming the URI and the endpoint
        raise StorageError(f"writing {_explain(exc, uri, _endpoint_name(client))}") from None


def delete_objects(uris: Sequence[str]) -> None:
    """Delete the objects ``uris`` (of one bucket), 1,000 per request; absent ones are no error."""
    if not uris:
        return
    locations = [_object_location(uri) for uri in uris]
    buckets = {bucket for bucket, _ in locations}
    if len(buckets) != 1:
        raise ValueError(f"delete_objects takes objects of one bucket, got {sorted(buckets)}")
    bucket = buckets.pop()
    client = s3_client()
    keys = [key for _, key in locations]
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        try:
            response = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        except Exception as exc:  # every failure becomes one message naming the URI and the endpoint
            raise StorageError(f"deleting {_explain(exc, f's3://{bucket}/{batch[0]}', _endpoint_name(client))}") from None
        if response.get("Errors"):
            first = response["Errors"][0]
            raise StorageError(f"s3://{bucket}: {len(response['Errors'])} objects could not be deleted, e.g. "
                               f"{first.get('Key')}: {first.get('Code')}")


def sync_tree_to_s3(
    local_dir: str | Path,
    uri: str,
    *,
    workers: int = 4,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    upload_last: Sequence[str] = ("latest",),
    progress: bool = True,
) -> SyncReport:
    """Upload each file under ``local_dir`` to the same relative key under ``uri``, unless S3
    already holds the same content. Content is the same when the size matches and either the
    ETag equals the file's MD5 or the recorded sha256 equals its own. Nothing is ever deleted.

    ``upload_last`` names relative paths that go only after every other file has arrived.
    DeepSpeed's ``latest`` names the newest complete tag, so a reader of the S3 copy never
    follows it to a tag still in transit. Raises :class:`StorageError` naming the files that
    failed; the ``upload_last`` files are then not sent. Sync a tree nobody is writing to.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (nothing to sync to {uri})")
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()
    remote = {o.key: o for o in _list(client, uri)}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bar = _ByteProgress(sum((root / rel).stat().st_size for rel in files), uri, progress)
    sync = partial(_sync_file, client, bucket, _folder(prefix), root, remote, _upload_config(multipart_threshold), bar)
    report = SyncReport()
    try:
        for batch in ([f for f in files if f not in upload_last], [f for f in files if f in upload_last]):
            uploaded, failures = _run_parallel(sync, batch, workers)
            if failures:
                listed = "; ".join(f"{rel}: {why}" for rel, why in sorted(failures.items())[:5])
                where = f"{uri} at {_endpoint_name(client)}"
                raise StorageError(f"{len(failures)} of {len(files)} files failed to sync to {where}: {listed}")
            report.uploaded += sum(uploaded.values())
            report.unchanged += len(uploaded) - sum(uploaded.values())
    finally:
        bar.close()
    log.info("%s -> %s: %d uploaded, %d unchanged", root, uri, report.uploaded, report.unchanged)
    return report


def fingerprint(uri: str, *, include: Callable[[str], bool] | None = None) -> str:
    """sha256 of the listing under ``uri``: relative key, size and ETag of each object that
    passes ``include``. It changes when any of those objects is added, removed or rewritten,
    and costs only the listing."""
    folder = _folder(parse_s3_uri(uri)[1])
    digest = hashlib.sha256()
    for obj in list_objects(uri):
        rel = obj.key[len(folder) :]
        if include is None or include(rel):
            digest.update(json.dumps([rel, obj.size, obj.etag]).encode() + b"\n")
    return digest.hexdigest()


# -- addressing -------------------------------------------------------------------------------


def _is_aws_endpoint(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _endpoint_name(client) -> str:
    """The client's endpoint URL without any ``user:password@`` part."""
    parts = urlsplit(client.meta.endpoint_url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _folder(prefix: str) -> str:
    return f"{prefix}/" if prefix else ""


def _object_location(uri: str) -> tuple[str, str]:
    bucket, key = parse_s3_uri(uri)
    if not key or uri.endswith("/"):
        raise ValueError(f"{uri!r} names a folder, not an object")
    return bucket, key


def _list(client, uri: str) -> list[ObjectInfo]:
    bucket, prefix = parse_s3_uri(uri)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_folder(prefix))
        return [ObjectInfo(o["Key"], o["Size"], o["ETag"].strip('"')) for page in pages for o in page.get("Contents", [])]
    except Exception as exc:  # every failure becomes one message naming the URI and the endpoint
        raise StorageError(f"listing {_explain(exc, uri, _endpoint_name(client))}") from None


def _probe_write(client, bucket: str, prefix: str) -> None:
    """Create and remove an empty object under ``prefix``: proof that uploads will be accepted."""
    key = _folder(prefix) + WRITE_PROBE_NAME
    client.put_object(Bucket=bucket, Key=key, Body=b"")
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        # Syncs never delete, so a store that refuses deletes (object lock, no s3:DeleteObject) still works.
        log.warning("could not remove the write probe s3://%s/%s (%s); it is an empty object", bucket, key, _error_code(exc))


# -- errors -----------------------------------------------------------------------------------


def _error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def _reason(exc: BaseException) -> str:
    """One line for a failed object (the report's reason)."""
    if isinstance(exc, ClientError):
        return f"{_error_code(exc)}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": ")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return f"connection failed ({type(exc).__name__})"  # its text would repeat the endpoint URL
    return f"{type(exc).__name__}: {exc}"


def _explain(exc: BaseException, uri: str, endpoint: str) -> str:
    """What went wrong with ``uri``, naming the bucket and the endpoint; never credentials."""
    bucket = parse_s3_uri(uri)[0]
    code = _error_code(exc)
    if isinstance(exc, NoCredentialsError):
        return f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or use a role)"
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return f"{uri}: cannot reach the S3 endpoint {endpoint} ({type(exc).__name__})"
    if code == "NoSuchBucket":
        return f"{uri}: bucket {bucket!r} does not exist at {endpoint}"
    if code in _MISSING:
        return f"{uri} does not exist at {endpoint}"
    if code in _BAD_CREDENTIALS:
        return f"{uri}: {endpoint} rejected the AWS credentials ({code}); check AWS_ACCESS_KEY_ID and the secret, or AWS_PROFILE"
    if code in _DENIED:
        operation = getattr(exc, "operation_name", "the request")
        return f"{uri}: access denied to bucket {bucket!r} at {endpoint} ({operation}); the credentials lack the permission"
    return f"{uri} at {endpoint}: {_reason(exc)}"


# -- transfers --------------------------------------------------------------------------------


def _run_parallel(task: Callable[[T], R], items: Iterable[T], workers: int) -> tuple[dict[T, R], dict[T, str]]:
    """Run ``task`` over ``items`` on ``workers`` threads: (results, failure reasons) by item."""
    results: dict[T, R] = {}
    failures: dict[T, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(task, item): item for item in items}
        for future in as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except Exception as exc:  # one item's failure must not stop the others: it is reported
                failures[futures[future]] = _reason(exc)
    return results, failures


class _ByteProgress:
    """A byte progress bar that transfer threads update; a failed attempt takes its bytes back."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    @contextmanager
    def attempt(self) -> Iterator[Callable[[int], None]]:
        moved = 0

        def on_bytes(n: int) -> None:
            nonlocal moved
            with self._lock:
                moved += n
                self._bar.update(n)

        try:
            yield on_bytes
        except BaseException:
            self.add(-moved)
            raise

    def close(self) -> None:
        self._bar.close()


_DOWNLOAD_CONFIG = TransferConfig(
    multipart_threshold=DEFAULT_MULTIPART_THRESHOLD,
    multipart_chunksize=DEFAULT_MULTIPART_THRESHOLD,
    max_concurrency=_TRANSFER_CONCURRENCY,
)


def _upload_config(multipart_threshold: int) -> TransferConfig:
    # boto3 raises a part size under S3's 5 MiB minimum to 5 MiB itself.
    return TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_threshold,
        max_concurrency=_TRANSFER_CONCURRENCY,
    )


def _fetch_with_retries(client, bucket: str, key: str, path: Path, retries: int, bar: _ByteProgress) -> tuple[str, bool]:
    attempt = 0
    while True:
        try:
            return _fetch(client, bucket, key, path, bar)
        except Exception as exc:  # a failed attempt of any kind is retried unless retrying cannot help
            if attempt >= retries or _error_code(exc) in _PERMANENT:
                raise
            log.debug("s3://%s/%s: attempt %d failed (%s); retrying", bucket, key, attempt + 1, _reason(exc))
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
            attempt += 1


def _fetch(client, bucket: str, key: str, path: Path, bar: _ByteProgress) -> tuple[str, bool]:
    """One attempt: ("skipped"|"downloaded", whether a digest was checked)."""
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    size, expected = head["ContentLength"], _expected_digest(head)
    if path.is_file() and _mismatch(path, size, expected) is None:
        bar.add(size)
        return "skipped", expected is not None
    partial_path = path.with_name(path.name + PARTIAL_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with bar.attempt() as on_bytes:
            with partial_path.open("wb") as fh:
                client.download_fileobj(bucket, key, fh, Config=_DOWNLOAD_CONFIG, Callback=on_bytes)
            why = _mismatch(partial_path, size, expected)
            if why:
                raise ChecksumMismatchError(f"downloaded bytes differ from the object: {why}")
        os.replace(partial_path, path)
    except BaseException:
        partial_path.unlink(missing_ok=True)
        raise
    return "downloaded", expected is not None


def _sync_file(
    client,
    bucket: str,
    folder: str,
    root: Path,
    remote: dict[str, ObjectInfo],
    config: TransferConfig,
    bar: _ByteProgress,
    rel: str,
) -> bool:
    """Upload ``root/rel`` unless S3 holds the same content; True when it was uploaded."""
    path, key = root / rel, folder + rel
    if key in remote and _same_content(client, bucket, remote[key], path):
        bar.add(path.stat().st_size)
        return False
    with bar.attempt() as on_bytes:
        _upload(client, path, bucket, key, config, on_bytes)
    return True


def _same_content(client, bucket: str, remote: ObjectInfo, path: Path) -> bool:
    if remote.size != path.stat().st_size:
        return False
    if _MD5_HEX.match(remote.etag) and file_digest(path, "md5") == remote.etag:
        return True  # the listing alone proves it, without a request
    expected = _expected_digest(client.head_object(Bucket=bucket, Key=remote.key, ChecksumMode="ENABLED"))
    return expected is not None and _mismatch(path, remote.size, expected) is None


def _upload(client, path: Path, bucket: str, key: str, config: TransferConfig, on_bytes: Callable[[int], None] | None) -> None:
    metadata = {SHA256_METADATA: file_digest(path, "sha256")}
    client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": metadata}, Config=config, Callback=on_bytes)


# -- digests ----------------------------------------------------------------------------------


def _expected_digest(head: dict) -> tuple[str, str] | None:
    """(algorithm, hex digest) the object's content must have, strongest first; None when only
    the size can be checked (see the module docstring)."""
    recorded = head.get("Metadata", {}).get(SHA256_METADATA)
    if recorded:
        return "sha256", recorded.lower()
    etag = head["ETag"].strip('"')
    own_key = head.get("ServerSideEncryption", "").startswith("aws:kms") or "SSECustomerAlgorithm" in head
    if _MD5_HEX.match(etag) and not own_key:
        return "md5", etag
    full_object = head.get("ChecksumType") == "FULL_OBJECT" or "-" not in etag
    for algorithm, header in (("sha256", "ChecksumSHA256"), ("crc32", "ChecksumCRC32")):
        value = head.get(header, "")
        if full_object and value and "-" not in value:
            return algorithm, base64.b64decode(value).hex()
    return None


def _mismatch(path: Path, size: int, expected: tuple[str, str] | None) -> str | None:
    """Why ``path`` is not the object's content, or None when it is."""
    actual_size = path.stat().st_size
    if actual_size != size:
        return f"size {actual_size} != {size}"
    if expected is None:
        return None
    algorithm, digest = expected
    actual = file_digest(path, algorithm)
    return None if actual == digest else f"{algorithm} {actual} != {digest}"
