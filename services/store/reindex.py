"""``dicomflow reindex``: rebuild the SQLite index of stored instances from the study index objects in RADOS."""

from __future__ import annotations

import os
from pathlib import Path

from shared.config import Config
from shared.storage.objectstore import Backends

from . import rados_index
from .index import Index


def rados_backends(config: Config) -> list[str]:
    """Names of the configured backends of kind rados."""
    return [name for name, b in config.storage.backends.items() if b.kind == "rados"]


def rebuild(config: Config, out: Path | None = None, only: list[str] | None = None) -> dict:
    """Read every study index object of the RADOS backends into a fresh SQLite index.

    Written beside the target and renamed over it at the end, so a failure leaves the old index in place.
    Run it with the store stopped (its rows would otherwise race the rename). Returns counts.
    """
    names = only or rados_backends(config)
    target = Path(out) if out else config.data_path(config.store.index_path)
    tmp = target.with_name(target.name + ".reindex")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    index = Index(tmp)
    backends = Backends(config)
    counts = {"backends": {}, "studies": 0, "instances": 0}
    studies: set[str] = set()
    try:
        for name in names:
            store = backends.get(name)
            seen = 0
            for study in rados_index.studies_in(store):
                studies.add(study)
                for raw in rados_index.study_entries(store, study).values():
                    event, policy, placements, stored_at = rados_index.decode_entry(raw)
                    index.record(event, policy, placements, stored_at)
                    seen += 1
            counts["backends"][name] = seen
        counts["studies"] = len(studies)
        counts["instances"] = index.count()
    finally:
        index.close()
        backends.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    counts["index"] = str(target)
    return counts
