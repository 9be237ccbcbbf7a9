"""What the catalogue records for one stored instance, computed from its DICOM JSON model. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from shared.catalogue.attributes import (
    ATTRIBUTES,
    INSTANCE_COLUMNS,
    SERIES,
    SERIES_COLUMNS,
    STUDY,
    STUDY_COLUMNS,
    level_of_tag,
)

_COLUMN_OF = {a.column: a for a in ATTRIBUTES if a.column}
_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})
# Left out of the level JSONs: the character set (the JSON is Unicode text already) and what the
# catalogue computes itself.
_NOT_KEPT = frozenset({"00080005", "00201206", "00201208", "00201209", "00080061", "00080062"})
_SEPARATORS = (",", ":")


@dataclass(frozen=True)
class InstanceFacts:
    """What the store knows of an instance besides its data set."""

    tenant: str
    transfer_syntax_uid: str
    digest: str
    size: int
    policy: str
    placements: tuple[str, ...]
    calling_ae: str
    received_at: str
    stored_at: str
    source_seq: int = 0  # stream sequence of the InstanceReceived that brought this version (0: unknown)


@dataclass(frozen=True)
class CatalogueEntry:
    """One instance as the catalogue records it: matching columns and DICOM JSON for each level."""

    tenant: str
    study_uid: str
    series_uid: str
    sop_uid: str
    study: dict = field(repr=False)  # column -> value (patient and study attributes)
    series: dict = field(repr=False)
    instance: dict = field(repr=False)
    study_json: str = field(repr=False)  # the study-level elements as DICOM JSON
    series_json: str = field(repr=False)
    metadata: str = field(repr=False)  # the instance's whole DICOM JSON, bulk values as BulkDataURI
    facts: InstanceFacts = field(repr=False)


def person_name_text(element: dict | None) -> str:
    """A PN element as matchable text: the alphabetic groups of its values, lower-cased."""
    return "\\".join((v or {}).get("Alphabetic", "") for v in _values(element)).lower()


def person_name_words(element: dict | None) -> str:
    """Every word of every component group, lower-cased, each preceded by a space (word-prefix matching)."""
    words: list[str] = []
    for value in _values(element):
        for group in (value or {}).values():
            words.extend(w for w in group.replace("^", " ").replace(",", " ").lower().split() if w)
    return "".join(f" {w}" for w in words)


def _values(element: dict | None) -> list:
    return (element or {}).get("Value") or []


def _column_value(element: dict | None, vr: str):
    values = _values(element)
    if not values:
        return None
    if vr == "PN":
        return person_name_text(element) or None
    if vr in _INT_VRS:
        first = values[0]
        return int(first) if isinstance(first, (int, float)) else None
    return "\\".join(str(v) for v in values if v is not None) or None


def _level_json(model: dict, level: str) -> str:
    return json.dumps({tag: element for tag, element in model.items()
                       if tag not in _NOT_KEPT and level_of_tag(tag) == level},
                      separators=_SEPARATORS, ensure_ascii=False)


def _columns(model: dict, columns: tuple[str, ...]) -> dict:
    out = {}
    for column in columns:
        attribute = _COLUMN_OF[column]
        out[column] = _column_value(model.get(attribute.tag), attribute.vr)
    return out


def entry_from_model(model: dict, facts: InstanceFacts) -> CatalogueEntry:
    """The catalogue entry of an instance whose data set has the DICOM JSON ``model``.

    The UIDs are taken from the model (the ingest validated them before the instance was staged).
    """
    study = _columns(model, STUDY_COLUMNS)
    study["patient_name_words"] = person_name_words(model.get("00100010"))
    study["referring_physician_words"] = person_name_words(model.get("00080090"))
    instance = _columns(model, INSTANCE_COLUMNS)
    return CatalogueEntry(
        tenant=facts.tenant,
        study_uid=_column_value(model.get("0020000D"), "UI") or "",
        series_uid=_column_value(model.get("0020000E"), "UI") or "",
        sop_uid=_column_value(model.get("00080018"), "UI") or "",
        study=study, series=_columns(model, SERIES_COLUMNS), instance=instance,
        study_json=_level_json(model, STUDY), series_json=_level_json(model, SERIES),
        metadata=json.dumps(model, separators=_SEPARATORS, ensure_ascii=False), facts=facts)


