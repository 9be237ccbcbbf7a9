"""Reading stored studies back: Part-10 files from the index and the object stores."""

from __future__ import annotations

from pathlib import Path

from shared.contract.uids import uid_name, validate_uid
from shared.dicom.part10 import part10
from shared.storage.objectstore import Backends, ObjectMissing


def read_instance(backends: Backends, row: dict) -> bytes:
    """The verified bytes of an indexed instance, from the first placement that has them."""
    last: Exception | None = None
    for name in row["placements"]:
        try:
            return backends.get(name).get(row["digest"])
        except (ObjectMissing, OSError) as exc:
            last = exc
    raise ObjectMissing(f"{row['sop_uid']}: in none of {row['placements']}: {last}")


def export_study(backends: Backends, rows: list[dict], out: Path) -> list[Path]:
    """Write every instance of a study as ``<SOPInstanceUID>.dcm`` under ``out`` (the UID as
    :func:`~shared.contract.uids.uid_name` encodes it: itself, unless it holds characters a name must not)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for row in rows:
        sop = validate_uid(row["sop_uid"], "SOPInstanceUID")  # a file name: never unvalidated
        path = out / f"{uid_name(sop)}.dcm"
        path.write_bytes(part10(read_instance(backends, row), row["sop_class_uid"], sop, row["transfer_syntax_uid"]))
        written.append(path)
    return written
