"""DICOM UID validation and the escaping that lets a UID travel in a NATS subject or a file name.

A UID (PS3.5 9.1) is at most 64 characters of digits and dots, with no empty components. Anything
else is rejected here, before it can reach a path (``../``) or a subject (``*``, ``>``, spaces).
"""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LEN = 64


class InvalidUID(ValueError):
    """A value that is not a valid DICOM UID."""


def validate_uid(value: object, name: str = "UID") -> str:
    """Return ``value`` as a clean UID string or raise :class:`InvalidUID` saying why."""
    if value is None:
        raise InvalidUID(f"{name} is missing")
    uid = str(value).rstrip("\x00").strip()
    if not uid:
        raise InvalidUID(f"{name} is empty")
    if len(uid) > MAX_UID_LEN:
        raise InvalidUID(f"{name} is longer than {MAX_UID_LEN} characters")
    if not _UID_RE.match(uid):
        raise InvalidUID(f"{name} {uid[:80]!r} is not digits and dots")
    return uid


def uid_token(uid: str) -> str:
    """Encode a validated UID as one NATS subject token (``.`` is the token separator)."""
    return validate_uid(uid).replace(".", "_")


def token_uid(token: str) -> str:
    """Decode a subject token made by :func:`uid_token` back to the UID."""
    return validate_uid(token.replace("_", "."))
