"""C-GET and C-MOVE over the catalogue (PS3.4 C.4.2, C.4.3; Patient Root C.6.1, Study Root C.6.2). Pure.

The identifier names what to retrieve by unique keys only (PS3.4 C.4.2.2.1): the level's UID, a list
of them, and the UIDs of the levels above (or, on Patient Root, the PatientID). What it names
becomes a :class:`RetrieveRequest`, which the catalogue turns into instances; the statuses of the
answer follow from counting the sub-operations.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.catalogue.find import IDENTIFIER_DOES_NOT_MATCH, QUERY_RETRIEVE_LEVEL, FindError
from shared.contract.uids import InvalidUID, validate_uid

PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
GET_SOP_CLASSES = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
MOVE_SOP_CLASSES = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
RETRIEVE_SOP_CLASSES = GET_SOP_CLASSES + MOVE_SOP_CLASSES
_PATIENT_ROOT = (PATIENT_ROOT_GET, PATIENT_ROOT_MOVE)

# statuses (PS3.4 C.4.2.1.5, C.4.3.1.4)
SUCCESS, PENDING, CANCEL, WARNING = 0x0000, 0xFF00, 0xFE00, 0xB000
UNABLE_TO_PERFORM = 0xA702  # every sub-operation failed
UNKNOWN_DESTINATION = 0xA801
UNABLE_TO_PROCESS = 0xC000

PATIENT_ID, STUDY_UID, SERIES_UID, SOP_UID = "00100020", "0020000D", "0020000E", "00080018"
FAILED_SOP_INSTANCE_UID_LIST = "00080058"
_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# what each level needs named (PS3.4 C.6.1.1.2 / C.6.2.1.2): the level's own key, and the ones above it
_REQUIRED = {"PATIENT": (PATIENT_ID,), "STUDY": (STUDY_UID,), "SERIES": (STUDY_UID, SERIES_UID),
             "IMAGE": (STUDY_UID, SERIES_UID, SOP_UID)}


@dataclass(frozen=True)
class RetrieveRequest:
    """What a C-GET or C-MOVE names: the instances of these patients, studies, series or SOP instances."""

    level: str
    patient_id: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()


def _values(element: dict | None) -> list[str]:
    if not element:
        return []
    return [str(v).strip() for v in element.get("Value") or [] if v is not None and str(v).strip()]


def parse_retrieve_identifier(model: dict, sop_class: str) -> RetrieveRequest:
    """The identifier (DICOM JSON) of a C-GET or C-MOVE of ``sop_class`` as a request; FindError says why not."""
    level = " ".join(_values(model.get(QUERY_RETRIEVE_LEVEL))).upper()
    if level not in _LEVELS:
        raise FindError(IDENTIFIER_DOES_NOT_MATCH, f"QueryRetrieveLevel {level or 'missing'}: expected "
                                                   "PATIENT, STUDY, SERIES or IMAGE")
    patient_root = sop_class in _PATIENT_ROOT
    if level == "PATIENT" and not patient_root:
        raise FindError(IDENTIFIER_DOES_NOT_MATCH, "PATIENT level is not part of the Study Root model")
    required = _REQUIRED[level]
    named: dict[str, list[str]] = {}
    for tag in (PATIENT_ID, STUDY_UID, SERIES_UID, SOP_UID):
        values = _values(model.get(tag))
        if tag == PATIENT_ID:
            values = values[:1]  # single value matching only (PS3.4 C.2.2.2.1)
        elif tag in required:
            try:
                values = [validate_uid(v, tag) for uid in values for v in uid.split("\\") if v]
            except InvalidUID as exc:
                raise FindError(UNABLE_TO_PROCESS, str(exc)) from exc
        named[tag] = values
    for tag in required:
        if not named[tag]:
            raise FindError(IDENTIFIER_DOES_NOT_MATCH, f"a {level} level retrieve needs ({tag[:4]},{tag[4:]})")
        # a list is allowed at the level's own key only; above it, one value
        if tag != required[-1] and len(named[tag]) > 1:
            raise FindError(IDENTIFIER_DOES_NOT_MATCH, f"({tag[:4]},{tag[4:]}) above the {level} level takes one value")
    return RetrieveRequest(
        level=level,
        patient_id=named[PATIENT_ID][0] if patient_root and named[PATIENT_ID] else None,
        study_uids=tuple(named[STUDY_UID]) if STUDY_UID in required else (),
        series_uids=tuple(named[SERIES_UID]) if SERIES_UID in required else (),
        sop_uids=tuple(named[SOP_UID]) if SOP_UID in required else ())


def final_status(total: int, completed: int, failed: int, warning: int, cancelled: bool = False) -> int:
    """The status of the last C-GET/C-MOVE response once the sub-operations are done (or cancelled)."""
    if cancelled:
        return CANCEL
    if not failed and not warning:
        return SUCCESS
    if failed == total:
        return UNABLE_TO_PERFORM
    return WARNING


def failed_list(sop_uids: list[str]) -> dict:
    """The identifier of a final response with failures: Failed SOP Instance UID List (0008,0058)."""
    return {FAILED_SOP_INSTANCE_UID_LIST: {"vr": "UI", "Value": sop_uids}}
