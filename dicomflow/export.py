"""Reading stored studies back: Part-10 files from the index and the object stores."""

from __future__ import annotations

import io
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from shared.objectstore import Backends, ObjectMissing
from shared.uids import validate_uid


def part10(data: bytes, sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str) -> bytes:
    """A DICOM Part-10 file: preamble, file meta information, then the data set bytes as stored."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(data)
    return buf.getvalue()


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
    """Write every instance of a study as ``<SOPInstanceUID>.dcm`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for row in rows:
        sop = validate_uid(row["sop_uid"], "SOPInstanceUID")  # a file name: never unvalidated
        path = out / f"{sop}.dcm"
        path.write_bytes(part10(read_instance(backends, row), row["sop_class_uid"], sop, row["transfer_syntax_uid"]))
        written.append(path)
    return written
