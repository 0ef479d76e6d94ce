"""The project's digests: of local files, read in blocks (the integrity checks of transfers,
the weights digests of the pipeline's manifests), and of data in memory (cache keys)."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from pathlib import Path

_BLOCK = 8 << 20


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of the file: ``crc32`` (big-endian, as S3 encodes it), or a hashlib name."""
    if algorithm == "crc32":
        value = 0
        for block in _blocks(Path(path)):
            value = zlib.crc32(block, value)
        return f"{value:08x}"
    digest = hashlib.new(algorithm, usedforsecurity=False)  # MD5 here is an integrity check; FIPS builds allow it so
    for block in _blocks(Path(path)):
        digest.update(block)
    return digest.hexdigest()


def data_digest(data: str | bytes, algorithm: str = "sha256") -> str:
    """:func:`file_digest` of bytes held in memory (a str is hashed as UTF-8): an object read
    whole, cache keys, job names, the digest of a submitted script or manifest."""
    raw = data.encode() if isinstance(data, str) else data
    if algorithm == "crc32":
        return f"{zlib.crc32(raw):08x}"
    return hashlib.new(algorithm, raw, usedforsecurity=False).hexdigest()


def _blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            yield block
