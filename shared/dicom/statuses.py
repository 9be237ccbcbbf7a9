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
# Permanent: StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID missing, empty or one no encoding makes
# safe (shared.contract.uids: e.g. one containing "../" or "*"); with ingest.strict_uids, any not PS3.5 9.1.
INVALID_UID = 0xC001
# Permanent: the data set's SOPInstanceUID differs from the request's Affected SOP Instance UID.
SOP_INSTANCE_MISMATCH = 0xC002
# Permanent: the instance is larger than ingest.max_instance_bytes.
TOO_LARGE = 0xC003
# Permanent: a STOW-RS part posted to /studies/{s} whose data set belongs to another study (dcm4chee's
# status for this; within the 0xC000-0xCFFF "cannot understand" range).
STUDY_MISMATCH = 0xC409

NAMES = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    SOP_CLASS_MISMATCH: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand (malformed data set)",
    INVALID_UID: "Error: Cannot understand (missing or invalid UID)",
    SOP_INSTANCE_MISMATCH: "Error: Cannot understand (SOP Instance UID differs from the request)",
    TOO_LARGE: "Error: Cannot understand (instance larger than the configured limit)",
    STUDY_MISMATCH: "Error: Cannot understand (instance of another study than the request's)",
}


class Rejection(Exception):
    """An instance refused with a DICOM status; the message is logged and sent as ErrorComment."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason

# Error Comment (0000,0902) is an LO: at most 64 characters of the default repertoire.
MAX_COMMENT = 64


def fit_comment(text: str, limit: int = MAX_COMMENT) -> str:
    """``text`` as an Error Comment: printable ASCII, at most ``limit`` characters, cut after a whole word."""
    clean = "".join(c if " " <= c <= "~" and c != "\\" else "/" for c in text).strip()
    if len(clean) <= limit:
        return clean
    cut = clean[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + "..."


def failure_cause(exc: BaseException) -> str:
    """A few words naming why an infrastructure call failed (the exception itself goes to the log)."""
    if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
        return "timed out"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.errno == 28:
        return "disk full"
    if isinstance(exc, (ConnectionError, OSError)) or "Connection" in type(exc).__name__ \
            or "NoServers" in type(exc).__name__:
        return "server unreachable"
    if "NoResponders" in type(exc).__name__:
        return "no stream serves the subject"
    return "refused"
