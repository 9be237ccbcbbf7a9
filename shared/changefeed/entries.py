"""The change feed's decisions, as plain functions over plain data: what a feed message means, who may see it,
which page a request asks for, what state an entry is in, and the entry as the Microsoft DICOM service shapes it.

The feed is the DICOM_CHANGES stream (:func:`shared.contract.subjects.changes_stream_config`): the server
copies every change event into it, so its stream sequence is the feed's ``Sequence``. One sequence serves
every tenant: a tenant reads only its own entries (the reader skips the others before anything leaves the
service), so a tenant's sequences have gaps where other tenants' changes are. The gaps say that something
happened elsewhere, never what; the Microsoft service's feed is one per service (or data partition) and has
no such gaps, but it has no tenants inside one feed either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import ValidationError

from shared.config import AccessConfig
from shared.contract import subjects as s
from shared.contract.events import InstanceDeleted, InstanceStored, StudyComplete
from shared.tenancy import tenant_of_instance

Action = Literal["create", "update", "delete"]
State = Literal["current", "replaced", "deleted"]
Kind = Literal["instance-stored", "instance-replaced", "instance-deleted", "study-complete", "study-updated"]

DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class Change:
    """One entry of the feed: what changed (a study, or one instance of it), how, for which tenant, when."""

    sequence: int
    kind: Kind
    action: Action
    tenant: str
    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    timestamp: datetime
    digest: str | None = None  # the instance version this entry is about (None: a study entry)

    @property
    def is_instance(self) -> bool:
        """Whether the entry names one instance (else a whole study)."""
        return self.sop_uid is not None


class NotAChange(ValueError):
    """A feed message that is no change event we know (a newer producer's kind, a damaged body): skipped."""


def _stored(sequence: int, data: bytes, access: AccessConfig) -> Change:
    ev = InstanceStored.model_validate_json(data)
    replaced = ev.replaced_digest is not None
    t = ev.tags
    return Change(sequence, "instance-replaced" if replaced else "instance-stored", "update" if replaced else "create",
                  ev.tenant or tenant_of_instance(access, ev.calling_ae, t.institution_name) or "",
                  t.study_uid, t.series_uid, t.sop_uid, ev.stored_at, ev.digest)


def _study(sequence: int, data: bytes, access: AccessConfig) -> Change:
    ev = StudyComplete.model_validate_json(data)
    # a study's tenant is its instances'; events of versions before StudyComplete.tenant: the same derivation the
    # store makes from the AE and InstitutionName
    tenant = ev.tenant or tenant_of_instance(access, ev.calling_ae, ev.institution_name) or ""
    kind: Kind = "study-complete" if ev.kind == "complete" else "study-updated"
    return Change(sequence, kind, "create" if kind == "study-complete" else "update", tenant, ev.study_uid, None,
                  None, ev.completed_at)


def _deleted(sequence: int, data: bytes, access: AccessConfig) -> Change:
    ev = InstanceDeleted.model_validate_json(data)
    return Change(sequence, "instance-deleted", "delete", ev.tenant, ev.study_uid, ev.series_uid, ev.sop_uid,
                  ev.deleted_at, ev.digest)


#: How to read each change subject's body: the first token(s) of the subject -> the reader of its model.
#: A new kind of change adds its subject to subjects.CHANGE_SUBJECTS and its reader here.
READERS: dict[str, Callable[[int, bytes, AccessConfig], Change]] = {
    s.STORED_PREFIX: _stored,
    s.STUDY_COMPLETE_PREFIX: _study,
    s.STUDY_UPDATED_PREFIX: _study,
    s.DELETED_PREFIX: _deleted,
}


def change_of(sequence: int, subject: str, data: bytes, access: AccessConfig) -> Change:
    """The change a feed message is (its stream sequence, subject and body); :class:`NotAChange` otherwise."""
    for prefix, read in READERS.items():
        if subject.startswith(prefix + "."):
            try:
                return read(sequence, data, access)
            except (ValidationError, ValueError) as exc:
                raise NotAChange(f"sequence {sequence} ({subject}): {exc}") from exc
    raise NotAChange(f"sequence {sequence}: {subject} is no change subject")


def visible(change: Change, scope: str | None) -> bool:
    """Whether a caller confined to ``scope`` (a tenant; None: an administrator) may see ``change``."""
    return scope is None or change.tenant == scope


def select(changes: Iterable[Change], scope: str | None, limit: int, since: datetime | None = None) -> list[Change]:
    """The first ``limit`` changes the caller may see, from ``since`` on (by the change's own time)."""
    out: list[Change] = []
    for change in changes:
        if visible(change, scope) and (since is None or change.timestamp >= since):
            out.append(change)
            if len(out) == limit:
                break
    return out


def state_of(change: Change, current_digest: str | None, study_present: bool) -> State:
    """The entry's state now (Microsoft's State): an instance entry is current while the catalogue holds that
    version (``current_digest``: the digest it holds, None: none), replaced once it holds another, deleted
    once it holds none; a study entry is current while the study is in the catalogue."""
    if change.kind == "instance-deleted":
        return "deleted"
    if change.is_instance:
        if current_digest is None:
            return "deleted"
        return "current" if current_digest == change.digest else "replaced"
    return "current" if study_present else "deleted"


class FeedQueryError(ValueError):
    """A change feed request that cannot be answered as asked: 400 with this reason."""


@dataclass(frozen=True)
class Page:
    """What one GET /changefeed asks for: entries from ``start`` (a sequence), at most ``limit``, with metadata."""

    start: int
    limit: int
    include_metadata: bool


_PARAMETERS = {"startsequence", "offset", "limit", "includemetadata"}


def _integer(name: str, text: str, low: int) -> int:
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        raise FeedQueryError(f"{name} must be a whole number, not {text!r}")
    number = int(value)
    if number < low:
        raise FeedQueryError(f"{name} must be at least {low}")
    return number


def parse_page(query: Iterable[tuple[str, str]], max_limit: int) -> Page:
    """The page a change feed query names. ``startSequence`` is the first sequence wanted (default 1);
    ``offset`` is the Microsoft v1 cursor, the last sequence already read (entries after it); ``limit`` 1 to
    ``max_limit`` (default 100 or ``max_limit``); ``includeMetadata`` true (default) or false. Names are
    case-insensitive (Microsoft's documentation spells them both ways)."""
    seen: dict[str, str] = {}
    for name, value in query:
        key = name.lower()
        if key not in _PARAMETERS:
            raise FeedQueryError(f"unknown parameter {name!r} (the change feed takes startSequence, offset, limit, "
                                 "includeMetadata)")
        if key in seen:
            raise FeedQueryError(f"{name} is given twice")
        seen[key] = value
    if "startsequence" in seen and "offset" in seen:
        raise FeedQueryError("give startSequence or offset, not both")
    start = 1
    if "startsequence" in seen:
        start = _integer("startSequence", seen["startsequence"], 1)
    elif "offset" in seen:
        start = _integer("offset", seen["offset"], 0) + 1
    limit = min(DEFAULT_LIMIT, max_limit)
    if "limit" in seen:
        limit = _integer("limit", seen["limit"], 1)
        if limit > max_limit:
            raise FeedQueryError(f"limit must be at most {max_limit}")
    include = True
    if "includemetadata" in seen:
        flag = seen["includemetadata"].strip().lower()
        if flag not in ("true", "false"):
            raise FeedQueryError(f"includeMetadata must be true or false, not {seen['includemetadata']!r}")
        include = flag == "true"
    return Page(start, limit, include)


def _time(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def entry_json(change: Change, state: State, metadata: Mapping | None = None, with_metadata: bool = False) -> dict:
    """The entry as the Microsoft DICOM service writes it (Sequence, StudyInstanceUid, SeriesInstanceUid,
    SopInstanceUid, Action, Timestamp, State, Metadata) plus ``Kind`` and ``Tenant``: a study entry names no
    series or instance; Metadata (the instance's current DICOM JSON) only when asked for, null when there is
    none to give (a study entry, a version no longer current)."""
    entry = {"Sequence": change.sequence, "StudyInstanceUid": change.study_uid,
             "SeriesInstanceUid": change.series_uid, "SopInstanceUid": change.sop_uid, "Action": change.action,
             "Timestamp": _time(change.timestamp), "State": state, "Kind": change.kind, "Tenant": change.tenant}
    if with_metadata:
        entry["Metadata"] = metadata
    return entry


def event_line(change: Change, state: str = "") -> str:
    """One change as one line of ``dicomflow events``: sequence, time, kind, tenant, UIDs (and state)."""
    uids = change.study_uid + (f" {change.series_uid} {change.sop_uid}" if change.is_instance else "")
    return (f"{change.sequence:>8}  {_time(change.timestamp)[:23]}  {change.kind:17} {change.tenant:12} {uids}"
            + (f"  [{state}]" if state else ""))
