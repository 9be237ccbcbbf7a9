"""``dicomflow reindex``: rebuild the catalogue from the study index objects (RADOS omaps, the filesystem store's
index files) and the objects' heads."""

from __future__ import annotations

import os
from pathlib import Path

from shared.catalogue.open import open_catalogue
from shared.catalogue.sqlite import open_sqlite
from shared.config import Config
from shared.storage.objectstore import Backends, Capability

from . import study_index
from .cataloguing import catalogue_entry
from .placement import tenant_of_event

BATCH = 256


def indexed_backends(config: Config, backends: Backends) -> list[str]:
    """Names of the configured backends that keep study index objects (every kind does today)."""
    return [name for name in config.storage.backends if Capability.STUDY_INDEX in backends.get(name).capabilities]


def rebuild(config: Config, out: Path | None = None, only: list[str] | None = None) -> dict:
    """Read every study index object of the backends (``only``, or all that keep one), and each object's
    metadata, into a catalogue.

    ``out``: a fresh SQLite file there. Else the configured catalogue: an SQLite one is rebuilt beside
    the target and renamed over it at the end (a failure leaves the old one in place; run it with the
    store stopped, whose rows would race the rename); a PostgreSQL one is written in place, idempotently
    (what is already there stays). Returns counts.
    """
    sqlite_target = Path(out) if out else (None if config.catalogue.url else config.data_path("catalogue.sqlite"))
    if sqlite_target is not None:
        tmp = sqlite_target.with_name(sqlite_target.name + ".reindex")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        catalogue = open_sqlite(tmp)
    else:
        catalogue = open_catalogue(config.catalogue.url, config.data_path())
    backends = Backends(config)
    names = only or indexed_backends(config, backends)
    counts = {"backends": {}, "studies": 0, "instances": 0}
    studies: set[str] = set()
    try:
        for name in names:
            store = backends.get(name)
            seen = 0
            for study in study_index.studies_in(store):
                studies.add(study)
                batch = []
                for raw in study_index.study_entries(store, study).values():
                    event, policy, placements, stored_at = study_index.decode_entry(raw)
                    batch.append(catalogue_entry(store, event, tenant_of_event(config.access, event), policy,
                                                 placements, stored_at))
                    if len(batch) >= BATCH:
                        catalogue.record_batch(batch)
                        seen, batch = seen + len(batch), []
                catalogue.record_batch(batch)
                seen += len(batch)
            counts["backends"][name] = seen
        counts["studies"] = len(studies)
        counts["instances"] = catalogue.count()
    finally:
        catalogue.close()
        backends.close()
    if sqlite_target is not None:
        for suffix in ("-wal", "-shm"):
            Path(f"{sqlite_target}{suffix}").unlink(missing_ok=True)
        sqlite_target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, sqlite_target)
        counts["catalogue"] = str(sqlite_target)
    else:
        counts["catalogue"] = "the configured PostgreSQL catalogue"
    return counts
