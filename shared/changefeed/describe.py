"""A change's entry as a reader gets it: its state now, from the catalogue, and with metadata the instance's
current DICOM JSON (the decisions are :mod:`shared.changefeed.entries`'; this is the catalogue lookup)."""

from __future__ import annotations

import json

from shared.catalogue.sql import SqlCatalogue
from shared.contract.uids import uid_url

from .entries import Change, entry_json, state_of


def describe(catalogue: SqlCatalogue, changes: list[Change], with_metadata: bool, base: str) -> list[dict]:
    """Each change as its entry: its state now from the catalogue, and the current metadata when asked for
    (blocking: on the worker threads)."""
    out = []
    for change in changes:
        metadata = None
        if change.is_instance:
            rows = catalogue.metadata(change.tenant, change.study_uid, None, change.sop_uid)  # any series: a new version may move
            digest = rows[0][3] if rows else None
            state = state_of(change, digest, study_present=bool(rows))
            if with_metadata and state == "current":
                prefix = (f'"BulkDataURI":"{base}/studies/{uid_url(change.study_uid)}/series/'
                          f'{uid_url(change.series_uid or "")}/instances/{uid_url(change.sop_uid or "")}/')
                metadata = json.loads(rows[0][4].replace('"BulkDataURI":"', prefix))
        else:
            state = state_of(change, None, study_present=bool(catalogue.series_of(change.tenant, change.study_uid)))
        out.append(entry_json(change, state, metadata, with_metadata))
    return out
