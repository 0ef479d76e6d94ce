"""A folder of files that is either a local directory or an S3 prefix, with one interface.

Staged datasets live in such a folder (``index.json``, the clip table, ``shards/``), so the
same staging and training code writes and reads them on a shared filesystem or in S3:

* :meth:`Store.read_bytes` / :meth:`Store.write_bytes` for small files (atomic on disk; an S3
  PUT is atomic by nature);
* :meth:`Store.put_file` moves (disk) or uploads (S3) a finished local file under its final
  name, so a reader never sees half a shard;
* :meth:`Store.sizes` lists a subfolder in one call per 1,000 objects (S3) or one ``scandir``;
* :meth:`Store.local_path` gives a local file to read: the file itself on disk, or, for S3, a
  copy in the node-local cache (``AVSIAM_CACHE_DIR``, default ``~/.cache/avsiam``). Only
  immutable objects may be read this way (staged shards and clip tables carry their content
  key in their name), so a cached copy is never stale. Ranks and DataLoader workers of one
  node share the cache; a file lock makes exactly one of them download each object.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

from avsiam.storage import s3
from avsiam.storage.digest import data_digest

CACHE_ENV = "AVSIAM_CACHE_DIR"


class MissingFileError(FileNotFoundError):
    """A file the caller expected in the store is not there; the message names its location."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "avsiam")


class Store:
    """Base: a folder addressed by relative POSIX paths (``shards/train-000000-....tar``)."""

    location: str

    def uri(self, rel: str) -> str:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, rel: str, local: Path) -> None:
        raise NotImplementedError

    def sizes(self, folder: str) -> dict[str, int]:
        """``{relative path: size}`` of the files directly or indirectly under ``folder``."""
        raise NotImplementedError

    def size(self, rel: str) -> int | None:
        """The size of file ``rel``, or None when there is none."""
        raise NotImplementedError

    def delete(self, rels: Iterable[str]) -> None:
        raise NotImplementedError

    def local_path(self, rel: str) -> Path:
        raise NotImplementedError

    def readable_copy(self, rel: str, scratch: Path) -> Path:
        """A local file with the content of ``rel`` for one-off reading: the file itself on disk,
        a download into the folder ``scratch`` for S3 (not the shared cache)."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def uri(self, rel: str) -> str:
        return str(self.root / rel)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            raise MissingFileError(f"{self.root / rel} does not exist") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + s3.PARTIAL_SUFFIX)
        partial.write_bytes(data)
        partial.replace(path)

    def put_file(self, rel: str, local: Path) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, path)

    def sizes(self, folder: str) -> dict[str, int]:
        base = self.root / folder
        if not base.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def size(self, rel: str) -> int | None:
        try:
            return (self.root / rel).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, rels: Iterable[str]) -> None:
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)

    def local_path(self, rel: str) -> Path:
        return self.root / rel

    def readable_copy(self, rel: str, scratch: Path) -> Path:
        return self.root / rel


class S3Store(Store):
    def __init__(self, uri: str) -> None:
        s3.parse_s3_uri(uri)  # a malformed URI fails here, naming itself
        self.location = uri.rstrip("/")

    def uri(self, rel: str) -> str:
        return f"{self.location}/{rel}"

    def read_bytes(self, rel: str) -> bytes:
        try:
            return s3.read_object(self.uri(rel))
        except s3.NoSuchObjectError as exc:
            raise MissingFileError(str(exc)) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        s3.write_object(self.uri(rel), data)

    def put_file(self, rel: str, local: Path) -> None:
        s3.upload_file(local, self.uri(rel))
        local.unlink()

    def sizes(self, folder: str) -> dict[str, int]:
        prefix = s3.parse_s3_uri(self.location)[1]
        strip = len(prefix) + 1 if prefix else 0
        return {o.key[strip:]: o.size for o in s3.list_objects(self.uri(folder))}

    def size(self, rel: str) -> int | None:
        return s3.object_size(self.uri(rel))

    def delete(self, rels: Iterable[str]) -> None:
        s3.delete_objects([self.uri(rel) for rel in rels])

    def readable_copy(self, rel: str, scratch: Path) -> Path:
        path = scratch / rel.replace("/", "_")
        try:
            s3.download_object(self.uri(rel), path)
        except s3.NoSuchObjectError as exc:
            raise MissingFileError(str(exc)) from None
        return path

    def local_path(self, rel: str) -> Path:
        """The node-local cached copy of an immutable object, downloaded (verified) on first use."""
        uri = self.uri(rel)
        bucket, key = s3.parse_s3_uri(uri)
        # One cache folder per endpoint: two stores (AWS, a MinIO) may hold buckets of one name.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "aws"
        path = cache_dir() / "s3" / data_digest(endpoint)[:12] / bucket / key
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():  # another rank or worker may have fetched it while we waited
                try:
                    s3.download_object(uri, path)
                except s3.NoSuchObjectError as exc:
                    raise MissingFileError(str(exc)) from None
        return path


def open_store(location: str | Path) -> Store:
    """The store of ``location``: ``s3://bucket/prefix`` or a local folder."""
    text = str(location)
    return S3Store(text) if text.startswith("s3://") else LocalStore(text)
