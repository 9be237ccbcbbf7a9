"""Which transfer syntax a WADO-RS retrieve answers in, from its Accept header (PS3.18 8.7.3). Pure.

- No ``transfer-syntax`` parameter: Explicit VR Little Endian, the standard's default.
- ``transfer-syntax=*``: each instance as stored.
- A named syntax: the stored one if it is that; between the uncompressed syntaxes (implicit and
  explicit little endian, deflated explicit) the server transcodes; anything else cannot be met.
- Several media ranges, with q-values: the most preferred one that can be met; none -> 406.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED_LE
from pydicom.uid import ExplicitVRLittleEndian as EXPLICIT_LE
from pydicom.uid import ImplicitVRLittleEndian as IMPLICIT_LE

TRANSCODABLE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})
AS_STORED = "*"


@dataclass(frozen=True)
class Acceptable:
    """One media range of an Accept header."""

    media_type: str  # "multipart/related" or "application/dicom" (or a wildcard)
    part_type: str  # multipart: the type parameter ("application/dicom"); else ""
    transfer_syntax: str  # a UID, "*" or "" (not given: the default)
    q: float


def _params(item: str) -> tuple[str, dict[str, str]]:
    media, *rest = (p.strip() for p in item.split(";"))
    params = {}
    for p in rest:
        key, _, value = p.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return media.lower(), params


@functools.lru_cache(maxsize=256)
def parse_accept(header: str) -> tuple[Acceptable, ...]:
    """The media ranges of an Accept header, most preferred first (stable for equal q).

    Cached: a client sends the same header with every request, and parsing it was a few percent of a
    WADO-RS instance download's time on the event loop (py-spy under bench/retrieve_ab.py's load).
    """
    out = []
    for item in header.split(","):
        if not item.strip():
            continue
        media, params = _params(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 0.0
        out.append(Acceptable(media, params.get("type", "").lower(), params.get("transfer-syntax", ""), q))
    return tuple(sorted((a for a in out if a.q > 0), key=lambda a: -a.q))


def can_serve(wanted: str, stored: str) -> bool:
    """Whether an instance stored in ``stored`` can be answered in ``wanted`` ("*" = as stored)."""
    return wanted in (AS_STORED, stored) or (wanted in TRANSCODABLE and stored in TRANSCODABLE)


@dataclass(frozen=True)
class Choice:
    """How to answer: as one multipart/related body of application/dicom parts, or one bare file."""

    multipart: bool
    transfer_syntax: str  # a UID or "*" (each instance as stored)


def choose(accept: str, stored: list[str], single: bool) -> Choice | None:
    """The answer for instances stored in ``stored`` syntaxes; None when no media range can be met (406).

    ``single``: an instance-level request, which may also be answered as a bare ``application/dicom``.
    """
    ranges = parse_accept(accept) or (Acceptable("multipart/related", "application/dicom", "", 1.0),)
    for a in ranges:
        multipart = a.media_type == "multipart/related" and a.part_type in ("application/dicom", "")
        bare = single and a.media_type in ("application/dicom", "application/*", "*/*")
        if a.media_type in ("*/*",) and not single:
            multipart = True
        if not (multipart or bare):
            continue
        wanted = a.transfer_syntax or EXPLICIT_LE
        if all(can_serve(wanted, s) for s in stored):
            return Choice(multipart=multipart, transfer_syntax=wanted)
    return None
