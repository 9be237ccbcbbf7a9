"""Reading a stored instance back out, for whoever serves it (DIMSE C-GET/C-MOVE; DICOMweb): from the first
placement that holds it, in chunks, verified against its digest before its last chunk is handed on."""

from __future__ import annotations

from collections.abc import Iterator

import blake3

from shared.storage.objectstore import Backends, CorruptObject, ObjectMissing, ObjectStore

CHUNK = 1024 * 1024


class Unavailable(Exception):
    """No placement holds the object, or the one read does not match its digest."""


def _first_holding(backends: Backends, digest: str, placements: list[str], length: int
                   ) -> tuple[ObjectStore, bytes, int]:
    """(store, its first ``length`` bytes, size) of the first placement that holds the object (blocking)."""
    last: Exception | None = None
    for name in placements:
        try:
            store = backends.get(name)
            head, size = store.read_range(digest, 0, length)
            return store, head, size
        except (ObjectMissing, OSError, KeyError) as exc:
            last = exc
    raise Unavailable(f"object {digest} in none of {placements}: {last}")


def locate(backends: Backends, digest: str, placements: list[str]) -> tuple[ObjectStore, int]:
    """(store, size) of the first placement that holds the object ``digest`` (blocking)."""
    store, _, size = _first_holding(backends, digest, placements, 0)
    return store, size


def open_verified(backends: Backends, digest: str, placements: list[str], chunk: int = CHUNK
                  ) -> tuple[int, Iterator[tuple[bytes, bool]]]:
    """(size, :func:`verified_chunks`) of the object from the first placement that holds it (blocking).

    The first chunk is read while locating the object, so an object of one chunk (most instances)
    costs one open and one read, not a size probe and then the read.
    """
    store, head, size = _first_holding(backends, digest, placements, chunk)
    return size, verified_chunks(store, digest, size, chunk, head)


def verified_chunks(store: ObjectStore, digest: str, size: int, chunk: int = CHUNK, head: bytes = b""
                    ) -> Iterator[tuple[bytes, bool]]:
    """(bytes, is last) of the object, ``chunk`` bytes at a time (blocking); ``head``: its first bytes, already read.

    Each chunk is handed on one step late, so the last comes only once the whole object has matched
    its digest: a receiver never gets a complete object with wrong bytes. A mismatch (or a short
    object) raises :class:`CorruptObject` instead of yielding the last chunk.
    """
    hasher, offset, held = blake3.blake3(), 0, None
    while offset < size:
        if head:
            data, head = head, b""
        else:
            data, _ = store.read_range(digest, offset, chunk)
        if not data:
            break
        hasher.update(data)
        offset += len(data)
        if held is not None:
            yield held, False
        held = data
    if offset != size or hasher.hexdigest() != digest:
        raise CorruptObject(f"object {digest} in {store.name!r} does not match its digest ({offset} of {size} bytes)")
    yield held or b"", True
