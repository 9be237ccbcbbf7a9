"""How an object is laid out in RADOS: object names, chunk plans and the manifest. Pure, no I/O.

An object up to ``chunk_bytes`` is one RADOS object named by its digest. A larger one (an OSD refuses objects
over ``osd_max_object_size``, 128 MiB by default, and single writes over ``osd_max_write_size``, 90 MiB) is
stored as chunks ``<digest>.<n>`` plus a manifest under ``<digest>``, written last: the head object
exists only once every chunk is durable, so "exists" keeps meaning "complete".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.contract.uids import name_uid, uid_name

XATTR_PREFIX = "dicomflow."
LAYOUT_WHOLE = "whole"
LAYOUT_CHUNKED = "chunked"
MANIFEST_VERSION = 1
STUDY_INDEX_PREFIX = "dicomflow.study."


@dataclass(frozen=True)
class Chunk:
    """One chunk of a large object."""

    name: str
    offset: int
    size: int
    digest: str = ""


def chunk_name(digest: str, n: int) -> str:
    """The RADOS object name of chunk ``n`` of the object ``digest``."""
    return f"{digest}.{n:05d}"


def plan_chunks(digest: str, size: int, chunk_bytes: int) -> list[Chunk]:
    """The chunks of an object of ``size`` bytes; empty when it fits in one RADOS object."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    if size <= chunk_bytes:
        return []
    return [Chunk(chunk_name(digest, n), off, min(chunk_bytes, size - off))
            for n, off in enumerate(range(0, size, chunk_bytes))]


def encode_manifest(digest: str, size: int, chunks: list[Chunk]) -> bytes:
    """The manifest stored under the object's own name when it is chunked."""
    return json.dumps({"version": MANIFEST_VERSION, "digest": digest, "size": size,
                       "chunks": [[c.name, c.offset, c.size, c.digest] for c in chunks]},
                      separators=(",", ":")).encode()


def decode_manifest(raw: bytes, digest: str) -> tuple[int, list[Chunk]]:
    """(size, chunks) from a manifest; ValueError when it is not a consistent manifest of ``digest``."""
    try:
        m = json.loads(raw)
        size = int(m["size"])
        chunks = [Chunk(str(n), int(o), int(s), str(d)) for n, o, s, d in m["chunks"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable manifest of {digest}: {exc}") from None
    if m.get("digest") != digest:
        raise ValueError(f"manifest under {digest} names {m.get('digest')!r}")
    expected = 0
    for c in chunks:
        if c.offset != expected or c.size <= 0:
            raise ValueError(f"manifest of {digest}: chunk {c.name} at {c.offset} does not continue at {expected}")
        expected += c.size
    if expected != size:
        raise ValueError(f"manifest of {digest}: chunks cover {expected} of {size} bytes")
    return size, chunks


def xattrs_for(digest: str, size: int, layout: str, meta: dict[str, str] | None) -> dict[str, bytes]:
    """The extended attributes of a head object: digest, size, layout and the caller's metadata (UIDs)."""
    attrs = {f"{XATTR_PREFIX}{k}": str(v).encode() for k, v in (meta or {}).items()}
    attrs.update({f"{XATTR_PREFIX}digest": digest.encode(), f"{XATTR_PREFIX}size": str(size).encode(),
                  f"{XATTR_PREFIX}layout": layout.encode()})
    return attrs


def study_index_name(study_uid: str) -> str:
    """The RADOS object whose omap lists one study's instances (SOPInstanceUID -> entry)."""
    return f"{STUDY_INDEX_PREFIX}{uid_name(study_uid)}"


# The value of a study index key whose instance was deleted: index objects are only ever written (the
# filesystem's are append-only files), so a deletion is a tombstone that readers skip, and a reindex does
# not bring the instance back.
TOMBSTONE = b""


def index_key(tenant: str, sop_uid: str) -> str:
    """The study index key of an instance: its SOP Instance UID, qualified by its tenant (bare for the empty
    tenant, as versions before tenants wrote it)."""
    return f"{tenant}/{sop_uid}" if tenant else sop_uid


def study_of_index(name: str) -> str:
    """The StudyInstanceUID of an index object named by :func:`study_index_name`."""
    return name_uid(name[len(STUDY_INDEX_PREFIX):])
