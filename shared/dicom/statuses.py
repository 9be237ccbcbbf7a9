"""The DICOM statuses the ingest answers a C-STORE with, and why (the README lists them)."""

from __future__ import annotations

SUCCESS = 0x0000
# Transient: the bytes could not be made durable or the event was not acknowledged by JetStream.
# The modality keeps the instance and retries later.
OUT_OF_RESOURCES = 0xA700
# The data set's SOP Class UID differs from the one the C-STORE request announced.
SOP_CLASS_MISMATCH = 0xA900
# Permanent: the data set cannot be parsed (truncated, bad element lengths, bad deflate stream).
CANNOT_UNDERSTAND = 0xC000
# Permanent: StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID missing, empty or not a valid UID
# (digits and dots, at most 64 characters) - e.g. one containing "../" or "*".
INVALID_UID = 0xC001
# Permanent: the data set's SOPInstanceUID differs from the request's Affected SOP Instance UID.
SOP_INSTANCE_MISMATCH = 0xC002
# Permanent: the instance is larger than ingest.max_instance_bytes.
TOO_LARGE = 0xC003

NAMES = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    SOP_CLASS_MISMATCH: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand (malformed data set)",
    INVALID_UID: "Error: Cannot understand (missing or invalid UID)",
    SOP_INSTANCE_MISMATCH: "Error: Cannot understand (SOP Instance UID differs from the request)",
    TOO_LARGE: "Error: Cannot understand (instance larger than the configured limit)",
}


class Rejection(Exception):
    """An instance refused with a DICOM status; the message is logged and sent as ErrorComment."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason
