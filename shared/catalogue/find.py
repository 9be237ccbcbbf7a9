"""C-FIND over the catalogue (PS3.4 C.4.1, C.6.1 Patient Root, C.6.2 Study Root): the identifier as a
:class:`~shared.catalogue.query.Query`, each match as a response identifier. Pure: DICOM JSON in, out.

The identifier's keys with a value are matching keys, in the same syntax and with the same matching as
QIDO-RS (a PN's alphabetic group; DA and TM values and ranges; UID lists); keys without one are return
keys. Both are returned in every response, empty where the catalogue has no value. A matching key the
catalogue does not index is returned empty and does not filter (PS3.4 C.2.2.1: an SCP need not
support every optional key; real SCUs send many). A malformed value of a key it does index is a failure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shared.catalogue.attributes import BY_TAG, INSTANCE, PATIENT, SERIES, STUDY
from shared.catalogue.query import Match, Query, QueryError, match_for, queryable_at

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
FIND_SOP_CLASSES = (PATIENT_ROOT, STUDY_ROOT)

QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE, SPECIFIC_CHARACTER_SET = "00080052", "00080054", "00080005"
_NOT_KEYS = frozenset({QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE, SPECIFIC_CHARACTER_SET})
_LEVELS = {"PATIENT": PATIENT, "STUDY": STUDY, "SERIES": SERIES, "IMAGE": INSTANCE}

# statuses (PS3.4 C.4.1.1.4)
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000


class FindError(Exception):
    """A C-FIND that fails: the status to answer and its error comment."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class FindRequest:
    """A parsed C-FIND identifier."""

    query: Query
    level_name: str  # as the SCU wrote it: PATIENT, STUDY, SERIES or IMAGE
    requested: tuple[tuple[str, str], ...]  # (tag, VR) of every key of the identifier, in its order


def _text(element: dict) -> str:
    """An identifier value as QIDO writes it: values joined with "\\", a PN by its alphabetic group."""
    values = element.get("Value") or []
    if element.get("vr") == "PN":
        return "\\".join((v or {}).get("Alphabetic", "") for v in values)
    return "\\".join("" if v is None else str(v) for v in values)


def parse_identifier(model: dict, sop_class: str, max_results: int) -> FindRequest:
    """The identifier (its DICOM JSON model) of a C-FIND of ``sop_class`` as a request; FindError says why not."""
    level_name = _text(model.get(QUERY_RETRIEVE_LEVEL, {})).strip().upper()
    level = _LEVELS.get(level_name)
    if level is None:
        raise FindError(IDENTIFIER_DOES_NOT_MATCH, f"QueryRetrieveLevel {level_name or 'missing'}: expected "
                                                   f"PATIENT, STUDY, SERIES or IMAGE")
    if level == PATIENT and sop_class == STUDY_ROOT:
        raise FindError(IDENTIFIER_DOES_NOT_MATCH, "PATIENT level is not part of the Study Root model")
    matches: list[Match] = []
    returned: set[str] = set()
    requested: list[tuple[str, str]] = []
    for tag, element in model.items():
        if tag in _NOT_KEYS:
            continue
        requested.append((tag, element.get("vr", "UN")))
        if "Value" in element and element.get("vr") == "SQ":
            continue  # sequence matching: returned, not matched
        text = _text(element).strip()
        attribute = BY_TAG.get(tag)
        if not text or text == "*" or attribute is None or not queryable_at(attribute, level):
            returned.add(tag)
            continue
        try:
            matches.append(match_for(attribute, text, attribute.keyword))
        except QueryError as exc:
            raise FindError(UNABLE_TO_PROCESS, str(exc)) from exc
    query = Query(level=level, matches=tuple(matches), include=frozenset(t for t, _ in requested),
                  returned=frozenset(returned), limit=max_results)
    return FindRequest(query=query, level_name=level_name, requested=tuple(requested))


def response_identifier(request: FindRequest, result: dict, retrieve_ae_title: str) -> dict:
    """The identifier of one pending response: exactly the requested keys (empty where there is no value),
    the level, where to retrieve from, and ISO_IR 192 when any text is not ASCII."""
    out: dict[str, dict] = {QUERY_RETRIEVE_LEVEL: {"vr": "CS", "Value": [request.level_name]},
                            RETRIEVE_AE_TITLE: {"vr": "AE", "Value": [retrieve_ae_title]}}
    for tag, vr in request.requested:
        element = result.get(tag)
        out[tag] = {"vr": element.get("vr", vr), **({"Value": element["Value"]} if element.get("Value") else {})} \
            if element else {"vr": vr}
    if not all(_ascii(e) for e in out.values()):
        out[SPECIFIC_CHARACTER_SET] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return dict(sorted(out.items()))


def _ascii(element: dict) -> bool:
    return str(element.get("Value", "")).isascii()


def with_limit(request: FindRequest, limit: int) -> FindRequest:
    """The same request with another result limit."""
    return dataclasses.replace(request, query=dataclasses.replace(request.query, limit=limit))
