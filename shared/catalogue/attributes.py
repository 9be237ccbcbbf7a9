"""The attributes the catalogue keeps and matches, per level (PS3.18 tables 10.6.1-5, PS3.4 C.6).

Pure data. Each matchable attribute has a column of its level's table; the others the catalogue
answers from the stored DICOM JSON of the level (``includefield``) or computes (counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import dictionary_keyword, tag_for_keyword

PATIENT, STUDY, SERIES, INSTANCE = "PATIENT", "STUDY", "SERIES", "IMAGE"
LEVELS = (PATIENT, STUDY, SERIES, INSTANCE)


@dataclass(frozen=True)
class Attribute:
    """One attribute the catalogue knows by name."""

    keyword: str
    tag: str  # 8 hex digits, upper case, as DICOM JSON keys it
    vr: str
    level: str  # where it lives: STUDY holds the patient's attributes too (one row per study)
    column: str | None  # the matching column of that level's table; None: computed
    default_at: tuple[str, ...] = ()  # query levels that return it without being asked (PS3.18 table 10.6.3-3)


def _a(keyword: str, vr: str, level: str, column: str | None, *default_at: str) -> Attribute:
    return Attribute(keyword, f"{tag_for_keyword(keyword):08X}", vr, level, column, default_at)


ATTRIBUTES: tuple[Attribute, ...] = (
    _a("PatientName", "PN", STUDY, "patient_name", PATIENT, STUDY),
    _a("PatientID", "LO", STUDY, "patient_id", PATIENT, STUDY),
    _a("PatientBirthDate", "DA", STUDY, "patient_birth_date", PATIENT, STUDY),
    _a("PatientSex", "CS", STUDY, "patient_sex", PATIENT, STUDY),
    _a("StudyInstanceUID", "UI", STUDY, "study_uid", STUDY, SERIES, INSTANCE),
    _a("StudyDate", "DA", STUDY, "study_date", STUDY),
    _a("StudyTime", "TM", STUDY, "study_time", STUDY),
    _a("AccessionNumber", "SH", STUDY, "accession_number", STUDY),
    _a("ReferringPhysicianName", "PN", STUDY, "referring_physician_name", STUDY),
    _a("StudyID", "SH", STUDY, "study_id", STUDY),
    _a("StudyDescription", "LO", STUDY, "study_description"),
    _a("InstitutionName", "LO", STUDY, "institution_name"),
    _a("ModalitiesInStudy", "CS", STUDY, "modalities", STUDY),
    _a("SOPClassesInStudy", "UI", STUDY, "sop_classes"),
    _a("NumberOfStudyRelatedSeries", "IS", STUDY, None, STUDY),
    _a("NumberOfStudyRelatedInstances", "IS", STUDY, None, STUDY),
    _a("NumberOfPatientRelatedStudies", "IS", PATIENT, None, PATIENT),
    _a("NumberOfPatientRelatedSeries", "IS", PATIENT, None, PATIENT),
    _a("NumberOfPatientRelatedInstances", "IS", PATIENT, None, PATIENT),
    _a("SeriesInstanceUID", "UI", SERIES, "series_uid", SERIES, INSTANCE),
    _a("Modality", "CS", SERIES, "modality", SERIES),
    _a("SeriesNumber", "IS", SERIES, "series_number", SERIES),
    _a("SeriesDescription", "LO", SERIES, "series_description", SERIES),
    _a("BodyPartExamined", "CS", SERIES, "body_part_examined"),
    _a("PerformedProcedureStepStartDate", "DA", SERIES, "pps_start_date", SERIES),
    _a("PerformedProcedureStepStartTime", "TM", SERIES, "pps_start_time", SERIES),
    _a("NumberOfSeriesRelatedInstances", "IS", SERIES, None, SERIES),
    _a("SOPInstanceUID", "UI", INSTANCE, "sop_uid", INSTANCE),
    _a("SOPClassUID", "UI", INSTANCE, "sop_class_uid", INSTANCE),
    _a("InstanceNumber", "IS", INSTANCE, "instance_number", INSTANCE),
    _a("Rows", "US", INSTANCE, "n_rows", INSTANCE),
    _a("Columns", "US", INSTANCE, "n_columns", INSTANCE),
    _a("BitsAllocated", "US", INSTANCE, "bits_allocated", INSTANCE),
    _a("NumberOfFrames", "IS", INSTANCE, "number_of_frames", INSTANCE),
)
BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
BY_TAG = {a.tag: a for a in ATTRIBUTES}
# The columns kept per table; the study table holds the patient's attributes (one row per study).
STUDY_COLUMNS = tuple(a.column for a in ATTRIBUTES if a.level == STUDY and a.column and a.column not in
                      ("study_uid", "modalities", "sop_classes"))
SERIES_COLUMNS = tuple(a.column for a in ATTRIBUTES if a.level == SERIES and a.column and a.column != "series_uid")
INSTANCE_COLUMNS = tuple(a.column for a in ATTRIBUTES if a.level == INSTANCE and a.column and a.column != "sop_uid")
LEVEL_RANK = {PATIENT: 0, STUDY: 1, SERIES: 2, INSTANCE: 3}


def level_of_tag(tag: str) -> str:
    """Where an attribute of the data set belongs when the catalogue keeps a level's JSON.

    The known attributes by the table; the rest of groups 0010 (patient) at study level; everything
    else at instance level (the instance's whole JSON is kept anyway).
    """
    known = BY_TAG.get(tag)
    if known is not None:
        return STUDY if known.level == PATIENT else known.level
    return STUDY if tag.startswith("0010") else INSTANCE


def resolve(name: str) -> tuple[str, str] | None:
    """(tag, keyword) for a keyword or an 8-hex-digit tag as QIDO names attributes; None if unknown."""
    name = name.strip()
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        tag = name.upper()
        try:
            return tag, dictionary_keyword(int(tag, 16))
        except KeyError:
            return tag, ""  # a private or unknown tag: named by number only
    try:
        return f"{tag_for_keyword(name):08X}", name
    except TypeError:
        return None
