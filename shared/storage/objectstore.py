"""The storage interface every backend implements, and the registry that opens them by kind.

Objects are content-addressed: the key is the blake3 hex digest of the bytes, so a write is
idempotent (the same bytes land on the same key) and a read can verify what it got. Adding a
backend kind is adding one module and one line in :data:`_KINDS`.

Every backend implements the whole :class:`ObjectStore` interface; what only some can do beyond
it is declared in its ``capabilities`` (see :class:`Capability`), so callers ask the backend
rather than guess from its type or its attributes.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

import blake3

from shared.config import BackendConfig, Config

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class CorruptObject(Exception):
    """Bytes read back do not match their digest."""


class ObjectMissing(KeyError):
    """No object under that digest."""


@dataclass(frozen=True)
class StoredObject:
    """One object as a listing sees it: its digest, size and when it was last written or touched (epoch s)."""

    digest: str
    size: int
    mtime: float


def content_digest(data: bytes | bytearray | memoryview) -> str:
    """blake3 hex digest, the key of an object (multi-threaded for large inputs)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO) if len(data) > 4 * 1024 * 1024 else blake3.blake3()
    h.update(data)
    return h.hexdigest()


def check_digest(digest: str) -> str:
    """Validate a digest before it becomes a file name or an object name."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ValueError(f"not a blake3 hex digest: {str(digest)[:80]!r}")
    return digest


def check_expected(backend: str, digest: str, expected: str | None, size: int) -> None:
    """CorruptObject when the bytes a writer took (``digest``) are not those it was opened for (``expected``)."""
    if expected is not None and digest != expected:
        raise CorruptObject(f"backend {backend!r}: the {size} bytes written hash to {digest}, not to {expected}: "
                            f"nothing committed")


class Capability(StrEnum):
    """What a backend can do beyond the :class:`ObjectStore` interface."""

    # Per-study index objects (the :class:`StudyIndex` methods): a study can be listed, and the SQLite
    # index rebuilt, from the backend alone.
    STUDY_INDEX = "study_index"


Write = tuple[str, bytes | bytearray | memoryview, dict[str, str] | None]  # (digest, data, meta) of one put


@runtime_checkable
class ObjectStore(Protocol):
    """A durable, content-addressed object store."""

    name: str
    capabilities: frozenset[Capability]

    def put(self, digest: str, data: bytes | bytearray | memoryview, meta: dict[str, str] | None = None) -> None:
        """Store ``data`` under ``digest``; durable when it returns. Idempotent."""

    def put_many(self, items: Iterable[Write]) -> list[Exception | None]:
        """:meth:`put` for several objects; one outcome per item (None: durable), in order.

        ``items`` may be a generator, consumed as the backend takes the writes: a backend that can keeps
        them in flight together; :func:`put_each` is the plain loop.
        """

    def remove(self, digest: str) -> None:
        """Remove an object if present (tests and tools such as ``policies check``: the store never deletes)."""

    def objects(self) -> Iterator[StoredObject]:
        """Every whole object of the backend (a full listing: for the staging releaser, not for a request path).

        A put of an object that already exists counts as a write: it refreshes ``mtime`` (the releaser's
        guard against removing bytes a resend of the same instance has just claimed).
        """

    def remove_unless_touched(self, digest: str, not_after: float) -> bool:
        """Remove the object only if nothing wrote or touched it after ``not_after`` (epoch s); True if removed.

        Atomic against a concurrent put of the same digest: either the put sees the object gone and writes
        it again, or this sees the put's touch and keeps it.
        """

    def get(self, digest: str) -> bytes:
        """The object's bytes, verified against the digest (raises CorruptObject / ObjectMissing)."""

    def read_range(self, digest: str, offset: int, length: int) -> tuple[bytes, int]:
        """(up to ``length`` bytes from ``offset``, the object's whole size), not verified against the digest:
        for the head of a large object (its metadata) and ranged reads; a whole read is :meth:`get`."""

    def exists(self, digest: str) -> bool:
        """Whether an object is stored under ``digest``."""

    def location(self, digest: str) -> str:
        """A URI naming where the object lives (for events and operators)."""

    def prepare_writer(self) -> None:
        """Make what puts need ready before the first one (a writer calls it at start-up; may do nothing)."""

    def writer(self, limit: int, digest: str | None = None) -> ObjectWriter:
        """An object to be written as its bytes arrive (see :class:`ObjectWriter`); keeps at most ``limit`` bytes.

        ``digest``: what the bytes must hash to, where the caller knows it (a copy of a stored object): the
        commit then refuses other bytes (CorruptObject, nothing committed), and a backend that names an
        object's parts after its digest can write them before the last byte arrives."""

    def close(self) -> None:
        """Release connections."""


class StudyIndex(Protocol):
    """The per-study index objects of a backend that declares :attr:`Capability.STUDY_INDEX` (key -> value maps)."""

    def omap_set_many(self, writes: list[tuple[str, dict[str, bytes]]]) -> list[Exception | None]:
        """Set keys of several index objects (creating them), in flight together; one outcome per object."""

    def omap_get(self, oid: str) -> dict[str, bytes]:
        """Every key/value of one index object (empty when it does not exist)."""

    def object_names(self, prefix: str = "") -> Iterator[str]:
        """Names of the backend's objects that start with ``prefix``."""


def put_each(store: ObjectStore, items: Iterable[Write]) -> list[Exception | None]:
    """:meth:`ObjectStore.put_many` as one put after the other, for backends that gain nothing from batching."""
    results: list[Exception | None] = []
    for digest, data, meta in items:
        try:
            store.put(digest, data, meta)
            results.append(None)
        except Exception as exc:
            results.append(exc)
        data = None  # before the next item is read: one instance's bytes held at a time
    return results


@runtime_checkable
class ObjectWriter(Protocol):
    """An object written piece by piece as its bytes arrive, hashed on the way.

    Nothing is visible under the object's digest before :meth:`commit`, which makes it durable as
    :meth:`ObjectStore.put` does. Bytes beyond the writer's limit are counted in ``size`` but not kept,
    so a sender that goes on past the limit costs no memory or disk. An I/O error is kept in
    ``failure`` instead of raised, so the receiver can read the rest of the data set and answer it.
    """

    size: int  # bytes offered so far, kept or not
    failure: Exception | None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``."""

    def contents(self) -> bytes | bytearray | memoryview:
        """The bytes written so far (read-only; valid until commit or close)."""

    def digest(self) -> str:
        """The blake3 digest of the bytes written so far."""

    def commit(self, meta: dict[str, str] | None = None) -> str:
        """Make the object durable under its digest (idempotent like put) and close; returns the digest.

        Raises CorruptObject, committing nothing, when the writer was opened with a digest the bytes do not match.
        """

    def close(self) -> None:
        """Release the writer; an object not committed is discarded. Idempotent."""


class BufferedWriter:
    """The :class:`ObjectWriter` of a backend that only stores whole objects: bytes are kept in memory."""

    def __init__(self, store: ObjectStore, limit: int, digest: str | None = None):
        self._store = store
        self._limit = limit
        self._expected = digest
        self._buf = bytearray()
        self._hash = blake3.blake3()
        self.size = 0
        self.failure: Exception | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        if self.size <= self._limit:
            self._buf += data
            self._hash.update(data)
        elif self._buf:
            self._buf = bytearray()

    def contents(self) -> bytearray:
        return self._buf

    def digest(self) -> str:
        return self._hash.hexdigest()

    def commit(self, meta: dict[str, str] | None = None) -> str:
        if self.size > self._limit:
            raise ValueError(f"{self.size} bytes exceed the writer's limit of {self._limit}")
        digest = self.digest()
        try:
            check_expected(self._store.name, digest, self._expected, self.size)
            self._store.put(digest, self._buf, meta)  # put takes a bytearray: no copy of the whole instance
        finally:
            self.close()
        return digest

    def close(self) -> None:
        self._buf = bytearray()


_KINDS = {"fs": "shared.storage.fs_store:FileObjectStore", "rados": "shared.storage.rados_store:RadosObjectStore"}


def open_backend(name: str, cfg: BackendConfig, data_dir: Path) -> ObjectStore:
    """Open the backend ``name`` of kind ``cfg.kind``."""
    module, _, cls = _KINDS[cfg.kind].partition(":")
    return getattr(importlib.import_module(module), cls)(name, cfg, data_dir)


class Backends:
    """The configured backends of one process, opened lazily and kept open."""

    def __init__(self, config: Config):
        self.config = config
        self._open: dict[str, ObjectStore] = {}

    def get(self, name: str) -> ObjectStore:
        """The backend called ``name``."""
        store = self._open.get(name)
        if store is None:
            cfg = self.config.storage.backends.get(name)
            if cfg is None:
                raise KeyError(f"unknown storage backend {name!r}")
            store = open_backend(name, cfg, Path(self.config.data_dir))
            self._open[name] = store
        return store

    def close(self) -> None:
        for store in self._open.values():
            store.close()
        self._open.clear()
