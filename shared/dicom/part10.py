"""DICOM Part-10 files around data set bytes kept exactly as received.

The bytes on the bus and in the object stores are the data set as the modality sent it (no file
meta); whoever hands an instance on as a file (export, forwarding, retrieval) wraps it here.
"""

from __future__ import annotations

import io

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID


def part10(data: bytes, sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, file meta information, then the data set bytes unchanged."""
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
