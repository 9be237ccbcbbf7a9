"""Reading a stored instance back out, for whoever serves it (DIMSE C-GET/C-MOVE; DICOMweb): from the first
placement that holds it, in chunks, verified against its digest before its last chunk is handed on."""

from __future__ import annotations

from collections.abc import Iterator

import blake3

from shared.storage.objectstore import Backends, CorruptObject, ObjectMissing, ObjectStore

CHUNK = 1024 * 1024


class Unavailable(Exception):
    """No placement holds the object, or the one read does not match its digest."""


def locate(backends: Backends, digest: str, placements: list[str]) -> tuple[ObjectStore, int]:
    """(store, size) of the first placement that holds the object ``digest`` (blocking)."""
    last: Exception | None = None
    for name in placements:
        try:
            store = backends.get(name)
            _, size = store.read_range(digest, 0, 0)
            return store, size
        except (ObjectMissing, OSError, KeyError) as exc:
            last = exc
    raise Unavailable(f"object {digest} in none of {placements}: {last}")


def verified_chunks(store: ObjectStore, digest: str, size: int, chunk: int = CHUNK) -> Iterator[tuple[bytes, bool]]:
    """(bytes, is last) of the object, ``chunk`` bytes at a time (blocking).

    Each chunk is handed on one step late, so the last comes only once the whole object has matched
    its digest: a receiver never gets a complete object with wrong bytes. A mismatch (or a short
    object) raises :class:`CorruptObject` instead of yielding the last chunk.
    """
    hasher, offset, held = blake3.blake3(), 0, None
    while offset < size:
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
