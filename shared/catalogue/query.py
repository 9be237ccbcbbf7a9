"""Queries over the catalogue: what QIDO-RS parameters and C-FIND identifiers ask, parsed and checked. Pure.

Matching follows PS3.4 C.2.2.2 as PS3.18 8.3.4 applies it to QIDO-RS:
- single value: equal (PN case-insensitively, on the alphabetic groups);
- ``*`` and ``?`` wildcards (a value of only ``*`` matches everything);
- ranges ``a-b``, ``a-``, ``-b`` for DA and TM;
- a list of UIDs (``\\`` or ``,`` between them), and, as common practice, a list of code strings
  (``ModalitiesInStudy=CT\\MR``: studies with either);
- ``fuzzymatching=true``: each word of a PN value matches the start of a word of the name, in any
  group, case-insensitively;
- an empty value: universal matching (the attribute is returned, nothing is filtered).
Anything else gets a :class:`QueryError` whose text says which parameter and why (HTTP 400, or a
C-FIND failure status).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.catalogue.attributes import (
    BY_TAG,
    INSTANCE,
    LEVEL_RANK,
    PATIENT,
    SERIES,
    STUDY,
    Attribute,
    resolve,
)
from shared.contract.uids import InvalidUID, validate_uid

ALL = "all"
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_INT = re.compile(r"^[+-]?\d+$")
_CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
# Ignored as QIDO parameters: a cache buster some clients add, and the standard's own
# request for a response character set (we always answer UTF-8 JSON).
_IGNORED = frozenset({"_", "charset"})


class QueryError(ValueError):
    """A query the catalogue cannot answer as asked: the text says which parameter and why."""


@dataclass(frozen=True)
class Match:
    """One matching key."""

    attribute: Attribute
    kind: str  # "single", "wildcard", "range", "list"
    values: tuple  # single/wildcard: (text,); range: (low or None, high or None); list: the values


@dataclass(frozen=True)
class Query:
    """A parsed query at one level, within an optional study (and series) scope."""

    level: str
    matches: tuple[Match, ...] = ()
    include: frozenset[str] | str = frozenset()  # tags to return besides the defaults, or ALL
    returned: frozenset[str] = frozenset()  # tags named with an empty value (universal matching)
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    study_uid: str | None = None
    series_uid: str | None = None


def queryable_at(attribute: Attribute, level: str) -> bool:
    """Whether an attribute can be a matching key of a query at ``level``: its own level or above."""
    if attribute.column is None:
        return False
    if level == PATIENT:
        return attribute.level == STUDY and attribute.keyword.startswith("Patient")
    return LEVEL_RANK[attribute.level] <= LEVEL_RANK[level]


def match_for(attribute: Attribute, value: str, name: str) -> Match:
    """The matching key ``name`` (an attribute given the value ``value``), checked; :class:`QueryError` says why not."""
    vr = attribute.vr
    if vr in ("DA", "TM"):
        pattern = _DATE if vr == "DA" else _TIME
        kind, form = ("date", "YYYYMMDD") if vr == "DA" else ("time", "HHMMSS")
        text = value.replace(":", "") if vr == "TM" else value
        if "-" in text:
            low, _, high = text.partition("-")
            low, high = low.strip(), high.strip()
            for part in (low, high):
                if part and not pattern.match(part):
                    raise QueryError(f"{name}: {value!r} is neither a {kind} {form} nor a range {form}-{form}")
            if not low and not high:
                raise QueryError(f"{name}: a range needs at least one end")
            if low and high and low > high:
                raise QueryError(f"{name}: range {value!r} ends before it starts")
            return Match(attribute, "range", (low or None, high or None))
        if not pattern.match(text):
            raise QueryError(f"{name}: {value!r} is neither a {kind} {form} nor a range {form}-{form}")
        return Match(attribute, "single", (text,))
    if vr == "UI":
        uids = tuple(u.strip() for u in re.split(r"[\\,]", value) if u.strip())
        for uid in uids:
            try:
                validate_uid(uid, name)
            except InvalidUID as exc:
                raise QueryError(f"{name}: {uid!r} is not a UID ({exc})") from None
        return Match(attribute, "list" if len(uids) > 1 else "single", uids)
    if vr in ("IS", "US"):
        if not _INT.match(value.strip()):
            raise QueryError(f"{name}: {value!r} is not an integer")
        return Match(attribute, "single", (str(int(value.strip())),))  # strip: what _INT matched (fuzzed: "1\x1d")
    if vr == "CS" and "\\" in value:
        return Match(attribute, "list", tuple(v.strip() for v in value.split("\\") if v.strip()))
    text = value.strip() if vr != "PN" else value.strip().lower()
    if "\\" in text:
        raise QueryError(f"{name}: a list of values is only accepted for UIDs and code strings")
    if "*" in text or "?" in text:
        return Match(attribute, "wildcard", (text,))
    return Match(attribute, "single", (text,))


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise QueryError(f"{name}: {value!r} is neither true nor false")
    return lowered == "true"


def _count(name: str, value: str, maximum: int | None = None) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):  # isdigit alone takes "²", which int() refuses (fuzzed)
        raise QueryError(f"{name}: {value!r} is not a non-negative integer")
    number = int(text)  # int() strips less than str.strip() ("1\x1d", fuzzed)
    if maximum is not None and number > maximum:
        raise QueryError(f"{name}: {number} is above the largest this server allows ({maximum})")
    return number


def parse_qido(level: str, params: list[tuple[str, str]], study_uid: str | None = None,
               series_uid: str | None = None, max_offset: int = 1_000_000) -> Query:
    """A QIDO-RS request's query parameters (in order, repeated keys allowed) as a :class:`Query`."""
    matches: list[Match] = []
    include: set[str] | str = set()
    returned: set[str] = set()
    fuzzy, limit, offset = False, None, 0
    seen: set[str] = set()
    for key, value in params:
        if key in _IGNORED:
            continue
        if key in _CONTROL:
            if key == "includefield":
                for item in (v.strip() for v in value.split(",")):
                    if not item:
                        continue
                    if item == ALL:
                        include = ALL
                        continue
                    resolved = resolve(item)
                    if resolved is None:
                        raise QueryError(f"includefield: {item!r} is neither a DICOM keyword nor a tag")
                    if include != ALL:
                        include.add(resolved[0])
            elif key == "fuzzymatching":
                fuzzy = _flag(key, value)
            elif key == "limit":
                limit = _count(key, value)
            else:
                offset = _count(key, value, max_offset)
            continue
        if "." in key:
            raise QueryError(f"{key}: matching on attributes inside sequences is not supported")
        resolved = resolve(key)
        if resolved is None:
            raise QueryError(f"{key}: neither a DICOM keyword nor a tag")
        tag = resolved[0]
        if tag in seen:
            raise QueryError(f"{key}: given more than once")
        seen.add(tag)
        attribute = BY_TAG.get(tag)
        if attribute is None or not queryable_at(attribute, level):
            keys = ", ".join(sorted(a.keyword for a in BY_TAG.values() if queryable_at(a, level)))
            raise QueryError(f"{key}: not a matching key of a {level.lower()} query here (matching keys: {keys})")
        if (attribute.keyword == "StudyInstanceUID" and study_uid) or \
                (attribute.keyword == "SeriesInstanceUID" and series_uid):
            raise QueryError(f"{key}: already given in the path")
        if value.strip() == "" or value.strip() == "*":
            returned.add(tag)
            continue
        matches.append(match_for(attribute, value, key))
    return Query(level=level, matches=tuple(matches), include=include if include == ALL else frozenset(include),
                 returned=frozenset(returned), fuzzy=fuzzy, limit=limit, offset=offset, study_uid=study_uid,
                 series_uid=series_uid)


def like_pattern(text: str) -> str:
    """A DICOM wildcard value as a SQL LIKE pattern with ``\\`` as the escape character."""
    out = []
    for ch in text:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


__all__ = ["ALL", "INSTANCE", "Match", "PATIENT", "Query", "QueryError", "SERIES", "STUDY", "like_pattern", "match_for",
           "parse_qido", "queryable_at"]
