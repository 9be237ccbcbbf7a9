"""Carrying a deletion out (blocking): catalogue rows, then objects, then study index tombstones.

The order makes a crash safe to retry and never leaves the catalogue naming bytes that are gone: the
rows go first, in one transaction that also says which of their objects another instance still holds;
an object goes only when no remaining instance holds it in that backend. A crash after the transaction
leaves objects nobody references (space, not data: nothing serves them); the events and the audit
record are the caller's (it has the bus connection and knows who asked).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shared.audit import records
from shared.catalogue.sql import SqlCatalogue
from shared.contract.events import DeletionReason, InstanceDeleted, utcnow
from shared.storage.objectstore import Backends, Capability
from shared.storage.rados_layout import TOMBSTONE, study_index_name

from . import metrics
from .plan import Target, deleted_events, objects_to_remove, tombstones

log = logging.getLogger("dicomflow.deletion")

_REMOVERS = 16  # object removals in flight: a RADOS remove is a round trip to an OSD


@dataclass
class Outcome:
    """What one deletion did."""

    target: Target
    rows: list[dict] = field(default_factory=list)  # the instances deleted (catalogue rows)
    removed: dict[str, list[str]] = field(default_factory=dict)  # backend -> digests removed
    failed: list[str] = field(default_factory=list)  # "<backend>/<digest>: error" of removals that failed
    events: list[InstanceDeleted] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.rows)

    def summary(self) -> dict:
        """A plain report (the CLI's JSON, logs)."""
        return {"target": self.target.describe(), "level": self.target.level,
                "instances": len(self.rows), "studies": sorted({r["study_uid"] for r in self.rows}),
                "objects_removed": {b: len(d) for b, d in self.removed.items()}, "failed": self.failed}


def preview(catalogue: SqlCatalogue, target: Target) -> Outcome:
    """What :func:`delete` would delete (a dry run): the instances in scope; nothing is changed."""
    return Outcome(target, rows=catalogue.instances(target.tenant, target.study_uid, target.series_uid,
                                                    target.sop_uid))


def delete(catalogue: SqlCatalogue, backends: Backends, target: Target, reason: DeletionReason,
           requested_by: str) -> Outcome:
    """Delete ``target``: its catalogue rows, the objects no other instance holds, study index tombstones.

    Idempotent: nothing in scope (already deleted, another tenant's, never stored) is an outcome with no
    rows. A failed object removal is logged, counted and reported in ``failed``: the instance is deleted
    either way (nothing names the object any more).
    """
    started = time.perf_counter()
    rows, held = catalogue.delete_instances(target.tenant, target.study_uid, target.series_uid, target.sop_uid)
    outcome = finish(catalogue, backends, Outcome(target, rows=rows), held, reason, requested_by)
    if not rows:
        return outcome
    metrics.instances.labels(reason).inc(len(rows))
    metrics.seconds.observe(time.perf_counter() - started)
    log.info("deleted %s: %d instances, objects removed %s (%s)", target.describe(), len(rows),
             {b: len(d) for b, d in outcome.removed.items()}, reason)
    return outcome


def finish(catalogue: SqlCatalogue, backends: Backends, outcome: Outcome, held: dict[str, set[str]],
           reason: DeletionReason, requested_by: str) -> Outcome:
    """The steps after the catalogue transaction: tombstones, objects, events; then a check that no instance
    with the same bytes was catalogued meanwhile (the store places an object before its row, so a copy of
    the same bytes stored during a deletion can find its object removed): such an object is reported in
    ``failed`` and counted (``result="raced"``), so that the instance can be sent again."""
    rows = outcome.rows
    if not rows:
        return outcome
    indexed = {name for name in {b for r in rows for b in r["placements"]} if _keeps_index(backends, name)}
    _write_tombstones(backends, tombstones(rows, indexed), outcome)
    _remove_objects(backends, objects_to_remove(rows, held), outcome)
    outcome.events = deleted_events(rows, outcome.removed, reason, requested_by, utcnow())
    now_held = catalogue.holders({d for digests in outcome.removed.values() for d in digests})
    for backend, digests in outcome.removed.items():
        for digest in digests:
            if backend in now_held.get(digest, set()):
                log.error("deletion: object %s was removed from %s while an instance with the same bytes was "
                          "stored: send that instance again", digest, backend)
                metrics.objects.labels(backend, "raced").inc()
                outcome.failed.append(f"{backend}/{digest}: removed while an instance with the same bytes was "
                                      "being stored; send it again")
    return outcome


def _keeps_index(backends: Backends, name: str) -> bool:
    try:
        return Capability.STUDY_INDEX in backends.get(name).capabilities
    except KeyError:  # a placement no longer configured: nothing of it to mark
        return False


def _write_tombstones(backends: Backends, plan: dict[str, dict[str, list[str]]], outcome: Outcome) -> None:
    for backend, studies in plan.items():
        writes = [(study_index_name(study), dict.fromkeys(keys, TOMBSTONE)) for study, keys in studies.items()]
        for (oid, _), err in zip(writes, backends.get(backend).omap_set_many(writes), strict=True):
            if err is not None:
                log.error("deletion: study index %s in %s not marked: %s", oid, backend, err)
                outcome.failed.append(f"{backend}/{oid}: {err}")


def _remove_objects(backends: Backends, plan: dict[str, list[str]], outcome: Outcome) -> None:
    def remove(item: tuple[str, str]) -> tuple[str, str, Exception | None]:
        backend, digest = item
        try:
            backends.get(backend).remove(digest)
            return backend, digest, None
        except Exception as exc:  # noqa: BLE001 - reported per object; the others still go
            return backend, digest, exc
    work = [(backend, digest) for backend, digests in plan.items() for digest in digests]
    if not work:
        return
    with ThreadPoolExecutor(max_workers=min(_REMOVERS, len(work)), thread_name_prefix="delete") as pool:
        for backend, digest, err in pool.map(remove, work):
            if err is None:
                outcome.removed.setdefault(backend, []).append(digest)
                metrics.objects.labels(backend, "removed").inc()
            else:
                log.error("deletion: object %s in %s not removed: %s", digest, backend, err)
                metrics.objects.labels(backend, "failed").inc()
                outcome.failed.append(f"{backend}/{digest}: {err}")


def audit_record(outcome: Outcome, user: str, host: str, error: str = ""):
    """The audit record of a deletion (PS3.15 DICOM Study Deleted, action D), or None when nothing was found."""
    if not outcome.rows and not error:
        return None
    return records.deletion(user, host, outcome.rows, 0 if error else len(outcome.rows), error)
