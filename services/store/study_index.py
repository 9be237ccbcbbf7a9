"""The per-study index objects: SOPInstanceUID (tenant-qualified) -> entry, one object per study and backend.

Each entry holds what the catalogue needs besides the metadata (series, digest, size, the routing tags, tenant,
policy, placements), so a study can be listed from Ceph alone and ``dicomflow reindex`` can rebuild the
catalogue from it (the metadata read from each object's head).
Only backends that declare ``Capability.STUDY_INDEX`` keep these objects (RADOS: the omap of one object per
study; the filesystem store: an append-only file per study, :mod:`shared.storage.fs_study_index`). A key is
``<tenant>/<SOPInstanceUID>`` (the bare UID for the empty tenant, as versions before tenants wrote it), so two
tenants that send the same UIDs keep two entries.
A deleted instance's key holds a tombstone (an empty value, ``rados_layout.TOMBSTONE``; librados reads it
back as None) that readers skip.
Writing an entry is idempotent (same key, same value); it happens after the object is placed and before
the catalogue rows, so a catalogued instance always has its entry in every placement that keeps an index.
"""

from __future__ import annotations

import json

from shared.contract.events import InstanceReceived, InstanceTags
from shared.storage.objectstore import StudyIndex
from shared.storage.rados_layout import STUDY_INDEX_PREFIX, index_key, study_index_name, study_of_index


def encode_entry(event: InstanceReceived, policy: str, placements: list[str], stored_at: str) -> bytes:
    """The omap value of one instance."""
    return json.dumps({
        "series_uid": event.tags.series_uid, "digest": event.digest, "size": event.size,
        "tags": event.tags.model_dump(), "transfer_syntax_uid": event.transfer_syntax_uid,
        "calling_ae": event.calling_ae, "called_ae": event.called_ae, "received_at": event.received_at.isoformat(),
        "staging": event.backend, "policy": policy, "placements": placements, "stored_at": stored_at,
        "tenant": event.tenant,
    }, separators=(",", ":")).encode()


def decode_entry(raw: bytes) -> tuple[InstanceReceived, str, list[str], str]:
    """(event, policy, placements, stored_at) from an omap value; what :meth:`Index.record` takes."""
    e = json.loads(raw)
    event = InstanceReceived(tags=InstanceTags(**e["tags"]), transfer_syntax_uid=e["transfer_syntax_uid"],
                             digest=e["digest"], size=e["size"], backend=e.get("staging", ""),
                             calling_ae=e["calling_ae"], called_ae=e.get("called_ae", ""),
                             received_at=e["received_at"], tenant=e.get("tenant", ""))
    return event, e["policy"], list(e["placements"]), e["stored_at"]


def entry_key(event: InstanceReceived) -> str:
    """The index key of an instance: its SOP Instance UID, qualified by its tenant."""
    return index_key(event.tenant, event.tags.sop_uid)


def record_studies(store: StudyIndex, studies: list[list[tuple[InstanceReceived, str, list[str], str]]]) -> list[Exception | None]:
    """Add the entries (event, policy, placements, stored_at) of each study in one omap write per study, all in
    flight together; one outcome per study."""
    writes = []
    for entries in studies:
        study = entries[0][0].tags.study_uid
        if any(e.tags.study_uid != study for e, _, _, _ in entries):
            raise ValueError("each list of entries must hold the entries of one study")
        writes.append((study_index_name(study), {entry_key(e): encode_entry(e, policy, placements, stored_at)
                                                 for e, policy, placements, stored_at in entries}))
    return store.omap_set_many(writes)


def study_entries(store: StudyIndex, study_uid: str) -> dict[str, bytes]:
    """Index key (see :func:`entry_key`) -> raw entry for one study (deleted instances' tombstones left out)."""
    return {k: v for k, v in store.omap_get(study_index_name(study_uid)).items() if v}


def studies_in(store: StudyIndex) -> list[str]:
    """The StudyInstanceUIDs that have an index object in ``store`` (lists the pool/namespace)."""
    return sorted(study_of_index(name) for name in store.object_names(STUDY_INDEX_PREFIX))
