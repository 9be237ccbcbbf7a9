"""The per-study index objects of the filesystem store (``Capability.STUDY_INDEX``), as RADOS keeps them in omaps.

One append-only file per index object under ``<root>/index/``: records of (key, value) with a CRC, the
last record of a key winning. A batch appends one write per study and then ``fdatasync``\\ s each file
it touched (one sync per study per batch, next to the objects' own), and the folder once when a file
is new. A crash can leave a torn last record: the reader stops at the first record that does not
check out, and the store, which writes entries before the catalogue rows and redelivers what it had
not acknowledged, writes it again. Entries are never removed; a study's file grows only by
redeliveries and replacements (read folding them: a few KB per instance).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from shared.storage.fs_wal import fsync_dir

_HEAD = struct.Struct(">II")  # key length, value length; then key, value, CRC-32 of both
_NAME = re.compile(r"^[0-9A-Za-z._-]{1,255}$")  # NAME_MAX; a study index name is a prefix and uid_name's 200 at most


def _checked(oid: str) -> str:
    if not _NAME.match(oid) or oid.startswith("."):
        raise ValueError(f"not a safe index object name: {oid[:80]!r}")
    return oid


def encode_records(values: dict[str, bytes]) -> bytes:
    """The records appending ``values`` to an index file."""
    out = bytearray()
    for key, value in values.items():
        k = key.encode()
        out += _HEAD.pack(len(k), len(value)) + k + value + struct.pack(">I", zlib.crc32(k + value))
    return bytes(out)


def decode_records(raw: bytes) -> dict[str, bytes]:
    """Every key's last value in an index file's bytes, up to the first record that is torn or corrupt."""
    out: dict[str, bytes] = {}
    pos, end = 0, len(raw)
    while pos + _HEAD.size <= end:
        klen, vlen = _HEAD.unpack_from(raw, pos)
        stop = pos + _HEAD.size + klen + vlen + 4
        if stop > end:
            break
        body = raw[pos + _HEAD.size: stop - 4]
        if struct.unpack_from(">I", raw, stop - 4)[0] != zlib.crc32(body):
            break
        out[body[:klen].decode()] = bytes(body[klen:])
        pos = stop
    return out


class FileStudyIndex:
    """Index objects as files in ``folder`` (the :class:`~shared.storage.objectstore.StudyIndex` methods)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def omap_set_many(self, writes: list[tuple[str, dict[str, bytes]]]) -> list[Exception | None]:
        """Append each object's keys, then make every file touched durable; one outcome per object."""
        outcomes: list[Exception | None] = []
        created = False
        fds: list[int] = []
        try:
            for oid, values in writes:
                try:
                    path = self.folder / _checked(oid)
                    created = created or not path.exists()
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    fds.append(fd)
                    os.write(fd, encode_records(values))  # one write: concurrent appenders do not interleave
                    outcomes.append(None)
                except (OSError, ValueError) as exc:
                    outcomes.append(exc)
            for fd in fds:
                os.fdatasync(fd)
            if created:
                fsync_dir(str(self.folder))
        except OSError as exc:  # the sync failed: nothing of the batch is known durable
            outcomes = [exc] * len(writes)
        finally:
            for fd in fds:
                os.close(fd)
        return outcomes

    def omap_get(self, oid: str) -> dict[str, bytes]:
        """Every key/value of one index object (empty when it does not exist)."""
        try:
            return decode_records((self.folder / _checked(oid)).read_bytes())
        except FileNotFoundError:
            return {}

    def object_names(self, prefix: str = "") -> Iterator[str]:
        """Names of the index objects that start with ``prefix``."""
        for entry in os.scandir(self.folder):
            if entry.is_file() and entry.name.startswith(prefix):
                yield entry.name
