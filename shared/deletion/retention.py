"""Retention per tenant (pure): which studies a pass deletes, and why every other study is kept."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

DELETE, KEEP = "delete", "keep"


@dataclass(frozen=True)
class Verdict:
    """What a retention pass does with one study, and why."""

    tenant: str
    study_uid: str
    last_stored: str  # ISO 8601: when its last instance was stored
    action: str  # delete or keep
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def _parse(when: str) -> datetime:
    return datetime.fromisoformat(when.replace("Z", "+00:00"))


def decide(studies: Iterable[tuple[str, str, str]], now: datetime, retention_days: dict[str, float],
           holds: dict[str, list[str]], in_flight: set[str]) -> list[Verdict]:
    """A verdict for each (tenant, StudyInstanceUID, last stored) of ``studies``.

    A study is deleted when its tenant has a retention period and its last instance was stored longer ago
    than that; never when it is on hold (``holds``: tenant -> StudyInstanceUIDs) or has a forward in flight
    (``in_flight``: StudyInstanceUIDs the router has not finished with: an open study, jobs queued or
    dead-lettered), whatever its age. ``now`` is timezone-aware.
    """
    held = {(tenant, uid) for tenant, uids in holds.items() for uid in uids}
    out = []
    for tenant, study_uid, last_stored in studies:
        days = retention_days.get(tenant)
        if days is None:
            action, why = KEEP, "the tenant keeps studies forever"
        else:
            age = now - _parse(last_stored)
            if age <= timedelta(days=days):
                action, why = KEEP, f"stored {age.total_seconds() / 86400:.1f} days ago, kept {days:g}"
            elif (tenant, study_uid) in held:
                action, why = KEEP, "on hold"
            elif study_uid in in_flight:
                action, why = KEEP, "a forward is in flight"
            else:
                action, why = DELETE, f"stored {age.total_seconds() / 86400:.1f} days ago, past {days:g}"
        out.append(Verdict(tenant, study_uid, last_stored, action, why))
    return out
