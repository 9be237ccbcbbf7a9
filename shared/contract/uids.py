"""DICOM UID validation and the encodings that let any accepted UID travel in a NATS subject, a file or
object name, a key or a URL.

A conformant UID (PS3.5 9.1) is at most 64 characters of digits and dots, no empty component, no
leading zero in a component. Real modalities and anonymisers break that harmlessly (hex digests with
letters, 65+ characters, ``0123`` components) and mature receivers (dcmtk storescp, Orthanc) store
them, so by default only what cannot be made safe is refused (``strict=True`` wants PS3.5 9.1):

- ``/ * > \\ ,``, whitespace, control characters, the empty value: a path separator, the NATS
  wildcards, the value delimiter of DICOM and of QIDO-RS UID lists (two UIDs, not one), token and
  header separators;
- characters outside ASCII: a UI value is never decoded with a character set (PS3.5 6.1.2.3), so
  its text would depend on the reader;
- a value with no digit or letter (``..``), and one longer than :data:`MAX_LENIENT_UID_LEN`.

Everything accepted goes through one encoding per kind of place, each injective and reversible, and
the identity for the digits-and-dots UIDs that existed before (subjects, partitions, index objects
and file names keep their names):

- :func:`uid_token` (a subject token, a KV key): ``[0-9A-Za-z]`` kept, ``.`` -> ``_``, any other
  character -> ``-`` + two upper-case hex digits. ``_`` only ever comes from ``.`` and ``-`` only
  starts an escape, so two UIDs never share a token (``1.2`` and ``1_2`` did under ``.`` -> ``_``);
- :func:`uid_name` (a file or RADOS object name, an index key): the same with ``.`` kept;
- :func:`uid_url` (a URL path segment): percent-encoding.
"""

from __future__ import annotations

import re
from urllib.parse import quote

_CONFORMANT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UNSAFE = re.compile(r"[/*>\\,\x00-\x20\x7f]")
_ALNUM = re.compile(r"[0-9A-Za-z]")
_TOKEN_KEPT = re.compile(r"[0-9A-Za-z]")
_PLAIN = re.compile(r"[0-9A-Za-z.]+")  # nothing to escape: the common case, kept fast (every instance, thrice)
_ESCAPE = re.compile(r"-([0-9A-F]{2})")
MAX_UID_LEN = 64
MAX_LENIENT_UID_LEN = 128
# A file name is at most 255 bytes; an index object's name is a prefix plus this.
MAX_NAME_LEN = 200


class InvalidUID(ValueError):
    """A value that is not a UID we can accept."""


def validate_uid(value: object, name: str = "UID", strict: bool = False) -> str:
    """Return ``value`` as a clean UID string or raise :class:`InvalidUID` saying why.

    ``strict``: PS3.5 9.1 conformance (digits and dots, 64 characters, no leading zeros); otherwise
    anything that the encodings of this module make safe (see the module's docstring).
    """
    if value is None:
        raise InvalidUID(f"{name} is missing")
    uid = str(value).rstrip("\x00").strip()  # UI values are padded with NUL, some senders pad with spaces
    if not uid:
        raise InvalidUID(f"{name} is empty")
    if strict:
        if len(uid) > MAX_UID_LEN:
            raise InvalidUID(f"{name} is longer than {MAX_UID_LEN} characters")
        if not _CONFORMANT.match(uid):
            raise InvalidUID(f"{name} {uid[:80]!r} is not digits and dots without leading zeros (PS3.5 9.1)")
        return uid
    if len(uid) > MAX_LENIENT_UID_LEN:
        raise InvalidUID(f"{name} is longer than {MAX_LENIENT_UID_LEN} characters")
    if _PLAIN.fullmatch(uid) and not uid.strip("."):
        raise InvalidUID(f"{name} {uid[:80]!r} has no digit or letter")
    if _PLAIN.fullmatch(uid):
        return uid
    if not uid.isascii():
        raise InvalidUID(f"{name} {uid[:80]!r} has characters outside ASCII")
    if (bad := _UNSAFE.search(uid)) is not None:
        raise InvalidUID(f"{name} {uid[:80]!r} contains {bad.group()!r}, which no UID may hold")
    if not _ALNUM.search(uid):
        raise InvalidUID(f"{name} {uid[:80]!r} has no digit or letter")
    if len(uid_name(uid)) > MAX_NAME_LEN:
        raise InvalidUID(f"{name} {uid[:80]!r} is longer than {MAX_NAME_LEN} characters once escaped")
    return uid


def is_conformant(uid: str) -> bool:
    """Whether ``uid`` follows PS3.5 9.1 (what ``strict`` validation accepts)."""
    return len(uid) <= MAX_UID_LEN and _CONFORMANT.match(uid) is not None


def _escape(uid: str, dot: str) -> str:
    if _PLAIN.fullmatch(uid):
        return uid.replace(".", dot) if dot != "." else uid
    out = []
    for ch in uid:
        if _TOKEN_KEPT.match(ch):
            out.append(ch)
        elif ch == ".":
            out.append(dot)
        else:
            out.append("".join(f"-{b:02X}" for b in ch.encode()))
    return "".join(out)


def _unescape(text: str, dot: str) -> str:
    pieces, pos = [], 0
    for m in _ESCAPE.finditer(text):
        pieces.append(text[pos:m.start()].replace(dot, "."))
        pieces.append(chr(int(m.group(1), 16)))
        pos = m.end()
    pieces.append(text[pos:].replace(dot, "."))
    return "".join(pieces)


def uid_token(uid: str) -> str:
    """Encode a UID as one NATS subject token (``.`` is the token separator): ``1.2.3`` -> ``1_2_3``."""
    return _escape(validate_uid(uid), "_")


def token_uid(token: str) -> str:
    """Decode a subject token made by :func:`uid_token` back to the UID (refusing what it never makes)."""
    uid = validate_uid(_unescape(token, "_"))
    if _escape(uid, "_") != token:
        raise InvalidUID(f"{token[:80]!r} is not a UID token")
    return uid


def uid_name(uid: str) -> str:
    """Encode a UID as a file, object or key name: ``1.2.3`` stays ``1.2.3``, ``1.2.a/b`` cannot occur,
    ``1.2.a:b`` -> ``1.2.a-3Ab``. Never ``.`` or ``..``, never a separator."""
    return _escape(uid, ".")


def name_uid(name: str) -> str:
    """Decode a name made by :func:`uid_name` back to the UID (refusing what it never makes)."""
    uid = validate_uid(_unescape(name, "."))
    if uid_name(uid) != name:
        raise InvalidUID(f"{name[:80]!r} is not a UID name")
    return uid


def uid_url(uid: str) -> str:
    """A UID as one URL path segment (``?``, ``#``, ``%``, ``"`` and the like percent-encoded)."""
    return quote(uid, safe="")
