"""Rejection notes at the store: a stored KOS titled "Rejected for ..." deletes the instances it references.

The note comes in like any instance (C-STORE on either SCP engine, STOW-RS) and is stored and
catalogued first; then the instances it references are deleted within the note's tenant (another
tenant's instances with those UIDs are untouched), one ``dicom.deleted`` event each, one audit record
per note. Instances of a study share its partition, so a note is handled after the instances sent
before it. A redelivered note finds its references already gone and deletes nothing more.
"""

from __future__ import annotations

import asyncio
import io
import logging

import pydicom
from nats.js import JetStreamContext

from shared.audit import trail as audit
from shared.catalogue.sql import SqlCatalogue
from shared.config import Config
from shared.contract.events import InstanceReceived
from shared.deletion.announce import announce
from shared.deletion.execute import Outcome, audit_record, delete
from shared.deletion.plan import Target
from shared.deletion.rejection import KOS_SOP_CLASS, Rejection, rejection_of
from shared.dicom.part10 import part10
from shared.storage.objectstore import Backends, ObjectMissing

from . import metrics

log = logging.getLogger("dicomflow.store.rejection")


def may_be_note(config: Config, event: InstanceReceived) -> bool:
    """Whether an instance event could be a rejection note (a KOS, with rejection notes enabled): only those
    are read back and parsed."""
    return config.deletion.rejection_notes and event.tags.sop_class_uid == KOS_SOP_CLASS


def read_rejection(backends: Backends, event: InstanceReceived, placements: list[str]) -> Rejection | None:
    """The rejection a stored KOS states (None: another kind of KOS), parsed from its bytes (blocking): from a
    placement (just written), else from staging."""
    data, last = None, None
    for name in [*placements, event.backend]:
        try:
            data = backends.get(name).get(event.digest)
            break
        except (ObjectMissing, OSError) as exc:
            last = exc
    if data is None:
        raise ObjectMissing(f"rejection note {event.tags.sop_uid}: in none of {placements}: {last}")
    ds = pydicom.dcmread(io.BytesIO(part10(data, event.tags.sop_class_uid, event.tags.sop_uid,
                                           event.transfer_syntax_uid)), force=True)
    return rejection_of(ds)


def apply_rejection(catalogue: SqlCatalogue, backends: Backends, tenant: str, rejection: Rejection) -> Outcome:
    """Delete every instance the note references within ``tenant`` (blocking); one outcome for them all."""
    total = Outcome(Target(tenant, rejection.references[0][0] if rejection.references else ""))
    for study, series, sop in rejection.references:
        if sop == rejection.note_uid:
            continue  # a note never rejects itself
        one = delete(catalogue, backends, Target(tenant, study, series, sop), "rejection-note",
                     f"rejection note {rejection.note_uid}")
        total.rows += one.rows
        total.failed += one.failed
        total.events += one.events
        for backend, digests in one.removed.items():
            total.removed.setdefault(backend, []).extend(digests)
    return total


async def handle_note(config: Config, js: JetStreamContext, catalogue: SqlCatalogue, backends: Backends,
                      event: InstanceReceived, tenant: str, placements: list[str]) -> None:
    """Apply a stored KOS if it is a rejection note: delete, publish the events, audit.

    Raises when the deletion itself failed (the note's event is redelivered and applied again: nothing was
    deleted). Events that could not be published after the deletion are logged and counted, not raised: a
    redelivery would find nothing left to delete and publish nothing either."""
    rejection = await asyncio.to_thread(read_rejection, backends, event, placements)
    if rejection is None:
        return
    outcome = await asyncio.to_thread(apply_rejection, catalogue, backends, tenant, rejection)
    log.info("rejection note %s (%s %s) from %s: %d of %d referenced instances deleted", rejection.note_uid,
             rejection.code, rejection.meaning, event.calling_ae, len(outcome.rows), len(rejection.references))
    record = audit_record(outcome, event.calling_ae, "")
    if record is not None:
        audit.emit(record.model_copy(update={"tenant": tenant, "detail": {
            **record.detail, "rejection_note": rejection.note_uid, "code": f"{rejection.code} {rejection.meaning}"}}))
    unpublished = await announce(js, outcome.events, config.nats.publish_timeout_s)
    if unpublished:
        metrics.failures.labels("deleted_event").inc(unpublished)
