"""WebDataset shards: the staged form of a dataset.

A shard is a POSIX ustar archive in WebDataset's layout (the format OpenCLIP and LAION-CLAP
train from): one sample per clip, as consecutive members sharing the sample's key,

* ``<key>.wav``: the clip's audio, 16 kHz mono 16-bit PCM;
* ``<key>.0.jpg`` ... ``<key>.9.jpg``: its 10 frames, 224 x 224 JPEG;
* ``<key>.json``: the clip id, split, labels (class ids), the source and its identity, and a
  CRC-32 of every media member.

The key is the clip id with ``.`` written as ``,``: WebDataset splits a member name at its
first dot into key and extension, AudioSet ids (``00W1lcxW-WU_40.000``) contain one, and clip
ids never contain a comma. ``webdataset.WebDataset`` and ``wids`` read the shards as they are.

Training reads a sample by the byte range the dataset index records for it
(:class:`ShardReader`): one ``pread`` of the sample's members from a shard file held open,
never a directory walk or a per-clip file. Every member read is checked against its CRC-32
and its tar header checksum, so a corrupt or truncated shard is an error naming the shard and
the clip, never a silently wrong tensor.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset

from avsiam.data.errors import DecodeError
from avsiam.data.video import NUM_FRAMES
from avsiam.storage.digest import file_digest

AUDIO_MEMBER = "wav"
FRAME_MEMBERS = tuple(f"{i}.jpg" for i in range(NUM_FRAMES))
META_MEMBER = "json"
MEDIA_MEMBERS = (AUDIO_MEMBER, *FRAME_MEMBERS)
BLOCK = tarfile.BLOCKSIZE  # 512: every tar header and every member's padded data


class ShardError(DecodeError):
    """A shard is missing, truncated or corrupt; the message names the shard and the clip."""


def sample_key(clip_id: str) -> str:
    """The WebDataset key of a clip: its id with ``.`` written as ``,`` (see the module docstring)."""
    return clip_id.replace(".", ",")


@dataclass(frozen=True)
class WrittenShard:
    """A shard file just written: its size, sha256 and each sample's byte range."""

    path: Path
    bytes: int
    sha256: str
    ranges: tuple[tuple[int, int], ...]  # (offset, size) per sample, in writing order


def write_shard(path: Path, samples: Iterable[tuple[Mapping[str, bytes], Mapping[str, Any]]]) -> WrittenShard:
    """Write ``(media, meta)`` samples to a new shard at ``path``.

    ``media`` maps every name of :data:`MEDIA_MEMBERS` to its bytes; ``meta`` is the sample's
    JSON (it must hold ``id``); the CRC-32 of each media member is added to it. The archive
    bytes depend only on the samples (fixed mtime, owner and mode), so re-staging the same
    clips gives the same shard and the same digest.
    """
    with path.open("wb") as fh:
        writer = webdataset.TarWriter(fh, encoder=False, mtime=0, user="avsiam", group="avsiam", mode=0o444)
        for media, meta in samples:
            missing = set(MEDIA_MEMBERS) - set(media)
            if missing:
                raise ValueError(f"{path}: sample {meta.get('id')!r} lacks members {sorted(missing)}")
            crc = {name: zlib.crc32(media[name]) for name in MEDIA_MEMBERS}
            document = json.dumps({**meta, "crc32": crc}, sort_keys=True).encode()
            writer.write({"__key__": sample_key(meta["id"]), **{name: media[name] for name in MEDIA_MEMBERS}, META_MEMBER: document})
        writer.close()
    ranges = tuple((offset, size) for _key, offset, size in scan_shard(path))
    return WrittenShard(path, path.stat().st_size, file_digest(path), ranges)


def scan_shard(path: Path) -> Iterator[tuple[str, int, int]]:
    """``(key, offset, size)`` of each sample of a shard file, from its tar headers alone."""
    with path.open("rb") as fh:
        key, start, end = None, 0, 0
        for name, header_offset, data_size in _headers(lambda offset: os.pread(fh.fileno(), BLOCK, offset), str(path)):
            member_key = name.split(".", 1)[0]
            if member_key != key:
                if key is not None:
                    yield key, start, end - start
                key, start = member_key, header_offset
            end = header_offset + BLOCK + _padded(data_size)
        if key is not None:
            yield key, start, end - start


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _headers(read_block: Callable[[int], bytes], where: str) -> Iterator[tuple[str, int, int]]:
    """``(member name, header offset, data size)`` of every member until the end-of-archive block."""
    offset = 0
    while True:
        block = read_block(offset)
        if len(block) < BLOCK or block == bytes(BLOCK):
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ShardError(where, f"bad tar header at byte {offset} ({exc})") from None
        yield info.name, offset, info.size
        offset += BLOCK + _padded(info.size)


@dataclass(frozen=True)
class Sample:
    """One sample's members, read from its byte range; media are checked as they are taken."""

    where: str  # "<shard>: clip <id>", for error messages
    members: dict[str, bytes]
    meta: dict[str, Any]

    def media(self, name: str) -> bytes:
        data = self.members[name]
        if zlib.crc32(data) != self.meta["crc32"][name]:
            raise ShardError(self.where, f"member {name} fails its CRC-32 check: the shard is corrupt; stage the dataset again")
        return data


def parse_sample(data: bytes, shard: str, clip_id: str) -> Sample:
    """Split a sample's bytes into its members and check it is the sample of ``clip_id``."""
    where = f"{shard}: clip {clip_id}"
    expected = sample_key(clip_id)
    view = memoryview(data)
    members: dict[str, bytes] = {}
    for name, offset, size in _headers(lambda at: bytes(view[at : at + BLOCK]), where):
        key, _, member = name.partition(".")
        if key != expected:
            raise ShardError(where, f"holds member {name!r} where the index puts clip {clip_id!r}: the shard or the index is corrupt")
        if offset + BLOCK + size > len(data):
            raise ShardError(where, f"member {name} is cut short: the shard is truncated")
        members[member] = bytes(view[offset + BLOCK : offset + BLOCK + size])
    missing = [m for m in (*MEDIA_MEMBERS, META_MEMBER) if m not in members]
    if missing:
        raise ShardError(where, f"the sample lacks members {missing}: the shard or the index is corrupt")
    try:
        meta = json.loads(members[META_MEMBER])
    except ValueError as exc:
        raise ShardError(where, f"its {META_MEMBER} member is not JSON ({exc}): the shard is corrupt") from None
    if meta.get("id") != clip_id or not isinstance(meta.get("crc32"), dict):
        raise ShardError(where, f"its {META_MEMBER} member describes clip {meta.get('id')!r}: the shard or the index is corrupt")
    return Sample(where, members, meta)


class ShardReader:
    """Reads sample byte ranges from shard files, keeping recently used files open.

    ``resolve(shard)`` gives the local file of shard number ``shard`` (the file itself, or
    its node-local cached copy) and a name for messages. Open files are per process, so a
    reader copied into forked DataLoader workers opens its own.
    """

    def __init__(self, resolve: Callable[[int], tuple[Path, str]], max_open: int = 64) -> None:
        self.resolve, self.max_open = resolve, max_open
        self._files: OrderedDict[int, tuple[int, str]] = OrderedDict()
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> tuple[bytes, str]:
        """The ``size`` bytes at ``offset`` of shard ``shard``, and the shard's name."""
        fd, name = self._open(shard)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ShardError(name, f"holds {offset + len(data)} bytes where the index expects a sample up to byte "
                                   f"{offset + size}: the shard is truncated")
        return data, name

    def _open(self, shard: int) -> tuple[int, str]:
        if self._pid != os.getpid():  # forked: the parent's descriptors are shared, not ours
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        path, name = self.resolve(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(name, "the shard is missing; stage the dataset again") from None
        self._files[shard] = (fd, name)
        if len(self._files) > self.max_open:
            old_fd, _ = self._files.popitem(last=False)[1]
            os.close(old_fd)
        return fd, name

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd, _ in self._files.values():
                os.close(fd)
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Open descriptors do not travel to spawned workers; they reopen lazily.
        return {"resolve": self.resolve, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["resolve"], state["max_open"])

