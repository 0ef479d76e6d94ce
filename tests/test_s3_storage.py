"""S3 helpers against a real moto server on loopback (``s3_env``, from tests/s3_fixtures.py)."""

import hashlib
import os
import time
import urllib.parse
import urllib.request

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from avsiam.storage import s3
from avsiam.storage.s3 import (
    PARTIAL_SUFFIX,
    StorageError,
    check_access,
    download_object,
    fingerprint,
    list_objects,
    parse_s3_uri,
    s3_client,
    sync_tree_to_s3,
    upload_file,
)

BUCKET = "avsiam-test"
MiB = 1 << 20


@pytest.fixture
def bucket(s3_env):
    """An empty bucket on the moto server; returns a client for arranging objects."""
    client = s3_client()
    client.create_bucket(Bucket=BUCKET)
    return client


def _body(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _leftover_partials(root) -> list:
    return [p for p in root.rglob(f"*{PARTIAL_SUFFIX}")]


def _recording_client(monkeypatch, event: str, handler) -> None:
    """Make every client the module builds call ``handler`` on ``event`` (e.g. to inject faults)."""
    build = s3.s3_client

    def client_with_handler(**kwargs):
        client = build(**kwargs)
        client.meta.events.register(event, handler)
        return client

    monkeypatch.setattr(s3, "s3_client", client_with_handler)


def _multipart_without_digest(key: str, parts: list[bytes]) -> None:
    """An object as an older tool uploads it: multipart, no checksum, no sha256 metadata."""
    plain = boto3.session.Session().client(
        "s3", config=Config(request_checksum_calculation="when_required", s3={"addressing_style": "path"})
    )
    upload_id = plain.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    done = [
        {"PartNumber": n, "ETag": plain.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=n, Body=part)["ETag"]}
        for n, part in enumerate(parts, start=1)
    ]
    plain.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done})


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("bucket/prefix", "https://bucket/x", "s3://", "s3:///prefix", "s3://b/x"):
        with pytest.raises(ValueError, match="S3 URI|bucket name"):
            parse_s3_uri(bad)


def test_client_takes_the_endpoint_from_the_environment_and_goes_path_style(s3_env, monkeypatch):
    client = s3_client()
    assert client.meta.endpoint_url == s3_env and client.meta.config.s3["addressing_style"] == "path"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "amazonaws.com" in s3_client().meta.endpoint_url and not (s3_client().meta.config.s3 or {}).get("addressing_style")


def test_download_object_verifies_and_resumes(bucket, tmp_path):
    files = {"a.bin": os.urandom(3000), "sub/b.bin": b"b" * 10}
    for rel, data in files.items():
        bucket.put_object(Bucket=BUCKET, Key=f"ds/{rel}", Body=data)
    dest = tmp_path / "dest"

    assert all(download_object(f"s3://{BUCKET}/ds/{rel}", dest / rel) for rel in files)
    assert {rel: (dest / rel).read_bytes() for rel in files} == files
    assert not any(download_object(f"s3://{BUCKET}/ds/{rel}", dest / rel) for rel in files)  # present: no transfer

    (dest / "a.bin").write_bytes(files["a.bin"][:1000])  # truncated by a killed copy
    (dest / "sub/b.bin").write_bytes(b"B" * 10)  # same size, other bytes: only the digest tells
    assert all(download_object(f"s3://{BUCKET}/ds/{rel}", dest / rel) for rel in files)
    assert {rel: (dest / rel).read_bytes() for rel in files} == files
    assert not _leftover_partials(dest)


def test_checksum_mismatch_is_an_error_and_nothing_lands(bucket, tmp_path):
    bucket.put_object(Bucket=BUCKET, Key="ds/bad.bin", Body=b"payload", Metadata={"sha256": "0" * 64})
    with pytest.raises(StorageError, match="ChecksumMismatchError.*sha256"):
        download_object(f"s3://{BUCKET}/ds/bad.bin", tmp_path / "bad.bin", retries=0)
    assert not (tmp_path / "bad.bin").exists() and not _leftover_partials(tmp_path)


def test_each_digest_kind_is_checked_and_size_only_is_reported(bucket, tmp_path, caplog):
    content = b"a" * 1000 + b"b" * 500
    bucket.put_object(Bucket=BUCKET, Key="ds/md5.bin", Body=content)  # single part: ETag = MD5
    crc = bucket.create_multipart_upload(Bucket=BUCKET, Key="ds/crc.bin", ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
    parts = [bucket.upload_part(Bucket=BUCKET, Key="ds/crc.bin", UploadId=crc["UploadId"], PartNumber=n, Body=body)
             for n, body in ((1, content[:1000]), (2, content[1000:]))]
    bucket.complete_multipart_upload(Bucket=BUCKET, Key="ds/crc.bin", UploadId=crc["UploadId"], MultipartUpload={"Parts": [
        {"PartNumber": n, "ETag": p["ETag"], "ChecksumCRC32": p["ChecksumCRC32"]} for n, p in enumerate(parts, start=1)]})
    _multipart_without_digest("ds/size-only.bin", [content[:1000], content[1000:]])
    for name in ("md5.bin", "crc.bin"):  # same size, other bytes: replaced only because a digest is checked
        (tmp_path / name).write_bytes(b"x" * len(content))

    with caplog.at_level("WARNING", logger="avsiam.storage.s3"):
        assert all(download_object(f"s3://{BUCKET}/ds/{name}", tmp_path / name) for name in ("md5.bin", "crc.bin", "size-only.bin"))
    assert all((tmp_path / name).read_bytes() == content for name in ("md5.bin", "crc.bin", "size-only.bin"))
    assert [r.getMessage() for r in caplog.records] == [f"s3://{BUCKET}/ds/size-only.bin carries no digest (multipart, no "
                                                        "checksum): checked by its size only"]


def test_a_transient_failure_is_retried(bucket, tmp_path, monkeypatch):
    bucket.put_object(Bucket=BUCKET, Key="ds/a.bin", Body=b"abc")
    failures = []

    def fail_first_get(**_):
        if not failures:
            failures.append("GetObject")
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "GetObject")

    _recording_client(monkeypatch, "before-call.s3.GetObject", fail_first_get)
    monkeypatch.setattr(s3, "RETRY_BACKOFF_S", 0.01)
    assert download_object(f"s3://{BUCKET}/ds/a.bin", tmp_path / "a.bin", retries=1)
    assert failures == ["GetObject"] and (tmp_path / "a.bin").read_bytes() == b"abc"


def test_download_object_names_a_missing_object(bucket, tmp_path):
    with pytest.raises(s3.NoSuchObjectError, match=f"s3://{BUCKET}/nothing.csv does not exist at http://127.0.0.1"):
        download_object(f"s3://{BUCKET}/nothing.csv", tmp_path / "nothing.csv")


def test_multipart_upload_round_trips_and_is_recognised_unchanged(bucket, tmp_path):
    data = os.urandom(5 * MiB + 1000)  # boto3 never cuts parts under 5 MiB: this makes two
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "shard.pt").write_bytes(data)
    upload_file(tmp_path / "up" / "shard.pt", f"s3://{BUCKET}/ckpt/shard.pt", multipart_threshold=MiB)
    head = bucket.head_object(Bucket=BUCKET, Key="ckpt/shard.pt")
    assert head["ETag"].strip('"').endswith("-2") and head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()

    assert download_object(f"s3://{BUCKET}/ckpt/shard.pt", tmp_path / "down" / "shard.pt")
    assert (tmp_path / "down" / "shard.pt").read_bytes() == data
    synced = sync_tree_to_s3(tmp_path / "up", f"s3://{BUCKET}/ckpt", multipart_threshold=MiB, progress=False)
    assert (synced.uploaded, synced.unchanged) == (0, 1)


def _checkpoint_tree(root, tag: str) -> None:
    files = {
        f"{tag}/mp_rank_00_model_states.pt": tag.encode() * 100,
        f"{tag}/zero_pp_rank_0_optim_states.pt": b"o" * 500,
        "latest": tag.encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_sync_uploads_only_changed_files_and_latest_last(bucket, tmp_path, monkeypatch):
    put_keys = []
    _recording_client(monkeypatch, "before-parameter-build.s3.PutObject", lambda params, **_: put_keys.append(params["Key"]))
    ckpt = tmp_path / "checkpoints"
    _checkpoint_tree(ckpt, "step1")
    first = sync_tree_to_s3(ckpt, f"s3://{BUCKET}/run/checkpoints", workers=2, progress=False)
    assert (first.uploaded, first.unchanged) == (3, 0) and put_keys[-1] == "run/checkpoints/latest"

    assert (sync_tree_to_s3(ckpt, f"s3://{BUCKET}/run/checkpoints", progress=False).uploaded) == 0

    put_keys.clear()
    (ckpt / "step1" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"O" * 500)  # same size, new content
    _checkpoint_tree(ckpt, "step2")
    third = sync_tree_to_s3(ckpt, f"s3://{BUCKET}/run/checkpoints", workers=2, progress=False)
    assert (third.uploaded, third.unchanged) == (4, 1) and put_keys[-1] == "run/checkpoints/latest"
    assert _body(bucket, "run/checkpoints/step1/zero_pp_rank_0_optim_states.pt") == b"O" * 500
    assert _body(bucket, "run/checkpoints/latest") == b"step2"


def test_sync_failure_raises_and_keeps_latest_back(bucket, tmp_path, monkeypatch):
    def refuse_optimizer_states(params, **_):
        if params["Key"].endswith("optim_states.pt"):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "injected"}}, "PutObject")

    _recording_client(monkeypatch, "before-parameter-build.s3.PutObject", refuse_optimizer_states)
    _checkpoint_tree(tmp_path, "step1")
    with pytest.raises(StorageError, match="1 of 3 files failed to sync .*zero_pp_rank_0_optim_states.pt"):
        sync_tree_to_s3(tmp_path, f"s3://{BUCKET}/ckpt", progress=False)
    assert [o.key for o in list_objects(f"s3://{BUCKET}/ckpt")] == ["ckpt/step1/mp_rank_00_model_states.pt"]


def test_fingerprint_follows_the_listing(bucket):
    uri = f"s3://{BUCKET}/ds"
    bucket.put_object(Bucket=BUCKET, Key="ds/a", Body=b"1")
    bucket.put_object(Bucket=BUCKET, Key="ds/b", Body=b"2")
    before = fingerprint(uri)
    assert fingerprint(uri) == before
    bucket.put_object(Bucket=BUCKET, Key="elsewhere", Body=b"x")
    assert fingerprint(uri) == before
    bucket.put_object(Bucket=BUCKET, Key="ds/b", Body=b"3")
    changed = fingerprint(uri)
    assert changed != before
    assert fingerprint(uri, include=lambda rel: rel == "a") == fingerprint(uri, include=lambda rel: rel == "a")
    bucket.put_object(Bucket=BUCKET, Key="ds/c", Body=b"new")
    assert fingerprint(uri) != changed


def test_check_access_passes_and_its_write_probe_leaves_nothing(bucket):
    check_access(f"s3://{BUCKET}/ckpt")
    check_access(f"s3://{BUCKET}/ckpt", write=True)
    assert list_objects(f"s3://{BUCKET}") == []


def test_check_access_names_a_missing_bucket_and_the_endpoint(s3_env):
    with pytest.raises(StorageError, match=f"bucket 'no-such-bucket' does not exist at {s3_env}"):
        check_access("s3://no-such-bucket/data")


def test_check_access_fails_fast_on_an_unreachable_endpoint(s3_env, monkeypatch):
    closed_port = urllib.parse.urlsplit(s3_env).port + 1  # nothing listens next to the server
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{closed_port}"):
        check_access(f"s3://{BUCKET}/data")
    assert time.monotonic() - start < 10


def test_check_access_without_credentials(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials found"):
        check_access(f"s3://{BUCKET}/data")


def _set_moto_auth(url: str, enabled: bool) -> None:
    """moto checks signatures and IAM policies once this many requests have been served."""
    body = b"0" if enabled else b"inf"
    headers = {"Content-Type": "text/plain"}
    request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=body, method="POST", headers=headers)
    urllib.request.urlopen(request, timeout=10).close()


def test_check_access_tells_refused_credentials_from_denied_access(bucket, s3_env, monkeypatch):
    iam = boto3.session.Session().client("iam")
    iam.create_user(UserName="no-policy")
    key = iam.create_access_key(UserName="no-policy")["AccessKey"]
    _set_moto_auth(s3_env, enabled=True)
    try:
        with pytest.raises(StorageError, match="rejected the AWS credentials") as unknown_key:
            check_access(f"s3://{BUCKET}/data")  # "testing" is no IAM key
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(StorageError, match="rejected the AWS credentials .SignatureDoesNotMatch"):
            check_access(f"s3://{BUCKET}/data")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(StorageError, match=f"access denied to bucket '{BUCKET}' at {s3_env}") as denied:
            check_access(f"s3://{BUCKET}/data")
    finally:
        _set_moto_auth(s3_env, enabled=False)
    for message in (str(unknown_key.value), str(denied.value)):
        assert key["AccessKeyId"] not in message and key["SecretAccessKey"] not in message and "testing" not in message


def test_file_digest_reads_in_blocks_what_hashlib_and_zlib_compute_whole(tmp_path, monkeypatch):
    import zlib

    from avsiam.storage import digest

    monkeypatch.setattr(digest, "_BLOCK", 7)  # many blocks, the last one partial
    data = os.urandom(100)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert digest.file_digest(path) == hashlib.sha256(data).hexdigest()
    assert digest.file_digest(path, "md5") == hashlib.md5(data).hexdigest()
    assert digest.file_digest(path, "crc32") == f"{zlib.crc32(data):08x}"
    # The same digests of bytes in memory; a str is hashed as its UTF-8 bytes.
    assert [digest.data_digest(data, a) for a in ("sha256", "md5", "crc32")] == [
        digest.file_digest(path, a) for a in ("sha256", "md5", "crc32")]
    assert digest.data_digest("clé") == hashlib.sha256("clé".encode()).hexdigest()
