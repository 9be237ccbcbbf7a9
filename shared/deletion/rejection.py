"""Rejection notes (pure): a Key Object Selection Document whose title rejects the instances it references.

As dcm4chee and IHE Imaging Object Change Management (IOCM) define them: the document's Concept Name
Code Sequence (0040,A043) holds one of the rejection titles of CID 7010 "Key Object Selection Document
Title" (CID 7011 is the list of quality reasons that may follow in the content), and its Current Requested
Procedure Evidence Sequence (0040,A375) lists the rejected instances by study, series and SOP Instance
UID. The note is stored like any instance; what it references is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage

#: The rejection titles of CID 7010 (PS3.16), scheme DCM, as dcm4chee's rejection notes use them: code -> meaning.
REJECTION_CODES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}


@dataclass(frozen=True)
class Rejection:
    """What a rejection note rejects: its title's code and the (study, series, SOP instance) it references."""

    code: str
    meaning: str
    note_uid: str
    references: tuple[tuple[str, str, str], ...]


def _text(item, keyword: str) -> str:
    value = getattr(item, keyword, "") if item is not None else ""
    return str(value).strip() if value is not None else ""


def rejection_of(ds) -> Rejection | None:
    """The rejection a data set (a pydicom Dataset) states, or None when it is not a rejection note.

    A KOS titled with one of :data:`REJECTION_CODES` (coding scheme DCM) is one; references without the three UIDs are
    skipped (nothing to find them by).
    """
    if _text(ds, "SOPClassUID") != KOS_SOP_CLASS:
        return None
    titles = getattr(ds, "ConceptNameCodeSequence", None) or []
    code = next((_text(t, "CodeValue") for t in titles
                 if _text(t, "CodingSchemeDesignator") == "DCM" and _text(t, "CodeValue") in REJECTION_CODES), None)
    if code is None:
        return None
    refs = []
    for study in getattr(ds, "CurrentRequestedProcedureEvidenceSequence", None) or []:
        study_uid = _text(study, "StudyInstanceUID")
        for series in getattr(study, "ReferencedSeriesSequence", None) or []:
            series_uid = _text(series, "SeriesInstanceUID")
            for sop in getattr(series, "ReferencedSOPSequence", None) or []:
                sop_uid = _text(sop, "ReferencedSOPInstanceUID")
                if study_uid and series_uid and sop_uid:
                    refs.append((study_uid, series_uid, sop_uid))
    return Rejection(code, REJECTION_CODES[code], _text(ds, "SOPInstanceUID"), tuple(dict.fromkeys(refs)))
