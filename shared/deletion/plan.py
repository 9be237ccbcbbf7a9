"""What a deletion removes (pure): the objects no other instance holds, the study index keys, the events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from shared.contract.events import DeletionReason, InstanceDeleted
from shared.storage.rados_layout import index_key

STUDY, SERIES, INSTANCE = "study", "series", "instance"


@dataclass(frozen=True)
class Target:
    """What to delete: a study, one of its series, or one instance, within a tenant (None: an administrator's
    request, every tenant's instances with these UIDs)."""

    tenant: str | None
    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None

    def __post_init__(self) -> None:
        if self.sop_uid is not None and self.series_uid is None:
            raise ValueError("an instance is named with its series")

    @property
    def level(self) -> str:
        """study, series or instance."""
        return INSTANCE if self.sop_uid else SERIES if self.series_uid else STUDY

    def describe(self) -> str:
        """The target in words, for answers and logs."""
        what = {STUDY: f"study {self.study_uid}", SERIES: f"series {self.series_uid} of study {self.study_uid}",
                INSTANCE: f"instance {self.sop_uid} of study {self.study_uid}"}[self.level]
        return what + (f" (tenant {self.tenant})" if self.tenant is not None else "")


def objects_to_remove(rows: Iterable[dict], held: dict[str, set[str]]) -> dict[str, list[str]]:
    """Backend -> digests to remove: each deleted instance's object in each of its placements, unless another
    instance (``held``: digest -> placements where remaining instances hold it) still needs it there.

    Objects are content-addressed, so two instances with the same bytes share one object per backend: it goes
    with the last instance that holds it in that backend.
    """
    out: dict[str, set[str]] = {}
    for row in rows:
        keep = held.get(row["digest"], set())
        for backend in row["placements"]:
            if backend not in keep:
                out.setdefault(backend, set()).add(row["digest"])
    return {backend: sorted(digests) for backend, digests in sorted(out.items())}


def tombstones(rows: Iterable[dict], indexed: set[str]) -> dict[str, dict[str, list[str]]]:
    """Backend -> study -> study index keys to mark deleted, for the placements that keep a study index
    (``indexed``): without them ``dicomflow reindex`` would bring the deleted instances back."""
    out: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        for backend in row["placements"]:
            if backend in indexed:
                out.setdefault(backend, {}).setdefault(row["study_uid"], []).append(
                    index_key(row["tenant"], row["sop_uid"]))
    return out


def deleted_events(rows: Iterable[dict], removed: dict[str, list[str]], reason: DeletionReason,
                   requested_by: str, at: datetime) -> list[InstanceDeleted]:
    """One :class:`InstanceDeleted` per deleted instance, naming the placements whose object went."""
    gone = {(backend, digest) for backend, digests in removed.items() for digest in digests}
    return [InstanceDeleted(tenant=row["tenant"], study_uid=row["study_uid"], series_uid=row["series_uid"],
                            sop_uid=row["sop_uid"], sop_class_uid=row.get("sop_class_uid") or "",
                            digest=row["digest"], placements=list(row["placements"]),
                            objects_removed=[b for b in row["placements"] if (b, row["digest"]) in gone],
                            reason=reason, requested_by=requested_by, deleted_at=at) for row in rows]
