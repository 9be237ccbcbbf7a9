"""Which partition a study lands on.

The server assigns partitions itself through the stream's subject transform
``{{partition(P,1)}}``: FNV-1a 32-bit over the bytes of the study token, modulo P (measured, see
the notes). :func:`partition_of` reproduces it so that tools and tests can predict placement
without asking the server.
"""

from __future__ import annotations

from shared.contract.uids import uid_token

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """FNV-1a 32-bit hash, as nats-server's ``partition()`` transform computes it."""
    h = _FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(study_uid: str, partitions: int) -> int:
    """The partition number (0..partitions-1) the server gives every instance of ``study_uid``."""
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    return fnv1a_32(uid_token(study_uid).encode()) % partitions
