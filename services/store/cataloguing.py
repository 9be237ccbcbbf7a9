"""What the catalogue records of a placed instance: its metadata read from the object's head.

The bytes are read back from the staging backend (the claim-check the ingest made durable; on the
embedded default a file still in the page cache), only as far as the metadata goes: a head of
``HEAD_BYTES``, more only when an element before the pixels runs past it.
"""

from __future__ import annotations

import logging

from shared.catalogue.entry import CatalogueEntry, InstanceFacts, entry_from_model
from shared.contract.events import InstanceReceived
from shared.dicom.json_model import JsonModelError, NeedMoreBytes, json_model
from shared.storage.objectstore import ObjectStore

from . import metrics

log = logging.getLogger("dicomflow.store")

HEAD_BYTES = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024 * 1024  # metadata larger than this before the pixels: the model is the routing tags


def model_of(store: ObjectStore, event: InstanceReceived) -> dict:
    """The DICOM JSON model of a staged instance (bulk values as BulkDataURIs).

    An object whose header cannot be read as DICOM JSON (the ingest checked its structure, so this
    is a data set with something this encoder does not know) still gets a model: the routing tags
    the ingest read, so the instance is catalogued and findable; the log and a metric say which.
    """
    want = HEAD_BYTES
    while True:
        head, size = store.read_range(event.digest, 0, want)
        try:
            return json_model(head, event.transfer_syntax_uid, total=size)
        except NeedMoreBytes as more:
            if more.needed > MAX_HEAD_BYTES or len(head) >= size:
                return _fallback(event, f"metadata larger than {MAX_HEAD_BYTES} bytes")
            want = max(more.needed, 2 * want)
        except JsonModelError as exc:
            return _fallback(event, str(exc))


def _fallback(event: InstanceReceived, why: str) -> dict:
    log.warning("instance %s: metadata not read (%s); catalogued with its routing tags only", event.tags.sop_uid, why)
    metrics.failures.labels("metadata").inc()
    t = event.tags
    text = {"00080016": ("UI", t.sop_class_uid), "00080018": ("UI", t.sop_uid), "00080050": ("SH", t.accession_number),
            "00080060": ("CS", t.modality), "00080080": ("LO", t.institution_name),
            "00081030": ("LO", t.study_description), "0008103E": ("LO", t.series_description),
            "00100020": ("LO", t.patient_id), "00180015": ("CS", t.body_part), "0020000D": ("UI", t.study_uid),
            "0020000E": ("UI", t.series_uid)}
    model = {tag: {"vr": vr, "Value": [v]} if v else {"vr": vr} for tag, (vr, v) in text.items()}
    for tag, value in (("00200011", t.series_number), ("00200013", t.instance_number)):
        model[tag] = {"vr": "IS", "Value": [value]} if value is not None else {"vr": "IS"}
    return model


def catalogue_entry(store: ObjectStore, event: InstanceReceived, tenant: str, policy: str, placements: list[str],
                    stored_at: str, source_seq: int = 0) -> CatalogueEntry:
    """The catalogue entry of a placed instance (blocking: reads the object's head); ``source_seq``: the
    stream sequence of its event (0 where unknown: a reindex)."""
    facts = InstanceFacts(tenant=tenant, transfer_syntax_uid=event.transfer_syntax_uid, digest=event.digest,
                          size=event.size, policy=policy, placements=tuple(placements), calling_ae=event.calling_ae,
                          received_at=event.received_at.isoformat(), stored_at=stored_at, source_seq=source_seq)
    return entry_from_model(model_of(store, event), facts)
