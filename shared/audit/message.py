"""The DICOM audit message (PS3.15 A.5.1, the RFC 3881 fields) of an audit record, as XML.

Plain functions over :class:`~shared.contract.events.AuditRecord`, no I/O: the syslog forwarder sends
what :func:`audit_message` returns, and the tests validate it against the schema. The codes are those
PS3.15 A.5.3 lists for each event (EventID, EventTypeCode from the DCM coding scheme, PS3.16 CID 400-405),
the participant object codes those of PS3.15 A.5.2 (type code 2 "system object", role 3 "report" for a
study, 24 "query" for a query). Events are named by their PS3.15 A.5.3 titles (the subsection numbers move
between editions). The layout follows the current schema, where the SOPClass elements of a
study are children of ParticipantObjectIdentification after a ParticipantObjectDescription (the 2004
Supplement 95 schema nested them inside ParticipantObjectDescription; receivers validate the current one).
"""

from __future__ import annotations

import base64
import ipaddress
from typing import NamedTuple
from xml.etree import ElementTree as ET

from shared.contract.events import AuditParticipant, AuditRecord, AuditStudy


class Code(NamedTuple):
    """A coded value: csd-code, codeSystemName, originalText (the code meaning)."""

    code: str
    scheme: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# What dicomflow names an action -> (EventID, EventTypeCodes) of PS3.15 A.5.3.
EVENTS: dict[str, tuple[Code, tuple[Code, ...]]] = {
    # "DICOM Instances Transferred": instances received over an association (one message per association,
    # aggregated as PS3.15 allows, with every study it stored).
    "association": (_dcm("110104", "DICOM Instances Transferred"), ()),
    "query": (_dcm("110112", "Query"), ()),
    # "Begin Transferring DICOM Instances" (action E): a C-GET, C-MOVE or WADO answer starts sending what it names.
    "retrieve": (_dcm("110102", "Begin Transferring DICOM Instances"), ()),
    # a C-GET's or C-MOVE's end: what the sub-operations sent (action R: read from the archive)
    "retrieved": (_dcm("110104", "DICOM Instances Transferred"), ()),
    "export": (_dcm("110106", "Export"), ()),                                      # "Data Export"
    "deletion": (_dcm("110105", "DICOM Study Deleted"), ()),
    # A DLQ replay sends dead-lettered instances to a target again: a transfer an operator started.
    "dlq-replay": (_dcm("110102", "Begin Transferring DICOM Instances"),
                   (Code("DLQ-REPLAY", "99DICOMFLOW", "Dead-letter replay"),)),
    "authentication": (_dcm("110114", "User Authentication"), (_dcm("110122", "Login"),)),
    "application-start": (_dcm("110100", "Application Activity"), (_dcm("110120", "Application Start"),)),
    # "Security Alert", Software Configuration: a running service changed its configuration (a router reload).
    "configuration-change": (_dcm("110113", "Security Alert"), (_dcm("110131", "Software Configuration"),)),
}

OUTCOMES = {"success": "0", "minor-failure": "4", "serious-failure": "8", "major-failure": "12"}

ROLES = {"source": _dcm("110153", "Source Role ID"), "destination": _dcm("110152", "Destination Role ID"),
         "destination-media": _dcm("110155", "Destination Media"), "application": _dcm("110150", "Application")}

STUDY_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
CONFIGURATION = Code("CONFIG-DIGEST", "99DICOMFLOW", "Effective configuration (SHA-256)")
AUDIT_SOURCE_TYPE = Code("4", "DCM", "Application Server Process Tier in a Multi-tier System")


def _coded(parent: ET.Element, name: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, name, {"csd-code": code.code, "codeSystemName": code.scheme,
                                        "originalText": code.meaning})


def _datetime(record: AuditRecord) -> str:
    """xsd:dateTime with its time zone (records carry aware UTC times)."""
    return record.event_time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _host_type(host: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "1"
    return "2"


def _participant(root: ET.Element, p: AuditParticipant) -> None:
    attrs = {"UserID": p.user_id or "-", "UserIsRequestor": "true" if p.requestor else "false"}
    if p.alternative_user_id:
        attrs["AlternativeUserID"] = p.alternative_user_id
    if p.user_name:
        attrs["UserName"] = p.user_name
    if p.host:
        attrs["NetworkAccessPointID"] = p.host
        attrs["NetworkAccessPointTypeCode"] = _host_type(p.host)
    el = ET.SubElement(root, "ActiveParticipant", attrs)
    if p.role in ROLES:
        _coded(el, "RoleIDCode", ROLES[p.role])


def _study(root: ET.Element, study: AuditStudy) -> None:
    el = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": study.study_uid, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    _coded(el, "ParticipantObjectIDTypeCode", STUDY_UID)
    total = sum(study.sop_classes.values())
    if study.sop_classes:
        ET.SubElement(el, "ParticipantObjectDescription").text = (
            f"{total} instance{'s' if total != 1 else ''} of {len(study.sop_classes)} SOP class"
            f"{'es' if len(study.sop_classes) != 1 else ''}")
    for sop_class, count in sorted(study.sop_classes.items()):
        ET.SubElement(el, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})


def _details(el: ET.Element, details: dict[str, str]) -> None:
    for key, value in sorted(details.items()):
        ET.SubElement(el, "ParticipantObjectDetail", {"type": key,
                                                      "value": base64.b64encode(value.encode()).decode()})


def audit_message_element(record: AuditRecord, source_id: str, site_id: str = "") -> ET.Element:
    """The ``AuditMessage`` element of ``record`` (PS3.15 A.5.1), element order as the schema's."""
    event_id, type_codes = EVENTS[record.kind]
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": record.action, "EventDateTime": _datetime(record),
        "EventOutcomeIndicator": OUTCOMES[record.outcome]})
    _coded(ev, "EventID", event_id)
    for code in type_codes:
        _coded(ev, "EventTypeCode", code)
    if record.outcome_description:
        ET.SubElement(ev, "EventOutcomeDescription").text = record.outcome_description
    for p in record.participants or [AuditParticipant(user_id=source_id, requestor=False, role="application")]:
        _participant(root, p)
    src = {"AuditSourceID": record.source_id or source_id}
    if site_id:
        src["AuditEnterpriseSiteID"] = site_id
    _coded(ET.SubElement(root, "AuditSourceIdentification", src), "AuditSourceTypeCode", AUDIT_SOURCE_TYPE)
    for study in record.studies:
        _study(root, study)
    if record.query is not None:
        q = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": record.query.sop_class_uid, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "24"})
        _coded(q, "ParticipantObjectIDTypeCode", SOP_CLASS_UID)
        ET.SubElement(q, "ParticipantObjectQuery").text = base64.b64encode(record.query.query.encode()).decode()
        if record.query.transfer_syntax_uid:
            _details(q, {"TransferSyntax": record.query.transfer_syntax_uid})
    digest = record.detail.get("configuration_sha256")
    if digest:
        cfg = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": digest, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "13"})
        _coded(cfg, "ParticipantObjectIDTypeCode", CONFIGURATION)
        _details(cfg, {k: v for k, v in record.detail.items() if k != "configuration_sha256"})
    return root


def audit_message(record: AuditRecord, source_id: str, site_id: str = "") -> bytes:
    """The UTF-8 XML of ``record``'s audit message (no XML declaration, no BOM: RFC 5424 MSG as ATNA sends it)."""
    return ET.tostring(audit_message_element(record, source_id, site_id), encoding="utf-8", xml_declaration=False)
