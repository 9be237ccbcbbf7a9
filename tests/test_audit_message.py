"""The audit trail's pure core: records built from facts, the PS3.15 A.5.1 XML (validated against the schema
with xmllint), the RFC 5424/5425 syslog message, and the CLI's filters; no I/O but xmllint."""

from __future__ import annotations

import base64
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from dicomflow.audit_cli import BadTime, format_line, matches, parse_since
from shared.audit import records
from shared.audit.message import audit_message
from shared.audit.syslog import BOM, frame, syslog_message
from shared.contract.events import AuditRecord

SCHEMA = Path(__file__).with_name("audit_message.rng")
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _validate(xml: bytes, tmp_path: Path, name: str) -> None:
    """xmllint --relaxng against the PS3.15 A.5.1 schema; fails with xmllint's own complaint."""
    assert shutil.which("xmllint"), "xmllint (Debian libxml2-utils) is missing: run `make debs-test`"
    path = tmp_path / f"{name}.xml"
    path.write_bytes(xml)
    res = subprocess.run(["xmllint", "--noout", "--relaxng", str(SCHEMA), str(path)], capture_output=True, text=True)
    assert res.returncode == 0, f"{name}: {res.stderr}\n{xml.decode()}"


def _coded(el: ET.Element | None) -> tuple[str, str, str]:
    assert el is not None
    return el.get("csd-code"), el.get("codeSystemName"), el.get("originalText")


def _association() -> AuditRecord:
    tally = records.AssociationTally("MODALITY1 ", "DICOMFLOW", "192.0.2.7")
    for _ in range(3):
        tally.add(0x0000, "1.2.3.1", CT)
    tally.add(0xB000, "1.2.3.1", MR)  # a warning is stored
    tally.add(0x0000, "1.2.3.2", MR)
    tally.add(0xA700, "1.2.3.2", MR, "staging write failed")
    return tally.record()


def every_kind() -> dict[str, AuditRecord]:
    dicom = records.dicom_peer("FINDSCU", "10.0.0.5", True, "source")
    rows = [{"study_uid": "1.2.3.1", "sop_class_uid": CT}, {"study_uid": "1.2.3.1", "sop_class_uid": CT}]
    return {
        "association": _association(),
        "rejected": records.association_rejected("INTRUDER", "DICOMFLOW", "203.0.113.9", "calling AE title not recognised"),
        "http-auth": records.authentication_failed("", "::1", "unknown API key", "HTTP"),
        "query": records.query(dicom, "DICOMFLOW", "1.2.840.10008.5.1.4.1.2.2.1", '{"0020000D": {"vr": "UI"}}',
                               "1.2.840.10008.1.2.1", 0x0000),
        "move": records.retrieval(records.dicom_peer("MOVESCU", "10.0.0.6", True, "source"),
                                  records.dicom_peer("PACS", "10.0.0.8", False, "destination"), "DICOMFLOW", rows,
                                  "C-MOVE"),
        "get-refused": records.retrieval(dicom, None, "DICOMFLOW", [], "C-GET", 0xA801, "unknown destination"),
        "moved": records.retrieved(records.dicom_peer("MOVESCU", "10.0.0.6", True, "source"),
                                   records.dicom_peer("PACS", "10.0.0.8", False, "destination"), "DICOMFLOW",
                                   [{**r, "sop_uid": f"1.2.3.1.{i}"} for i, r in enumerate(rows)], ["1.2.3.1.1"],
                                   "C-MOVE", 0xB000),
        "export": records.export("alice", "ws1", "/media/usb/out", rows, 2),
        "deletion": records.deletion("alice", "ws1", rows, 2),
        "dlq-replay": records.dlq_replay("alice", "ws1", "pacs", rows, 2, 1),
        "start": records.application_start("ingest", "1234", "node1", "ab" * 32, "0.1.0"),
        "reload": records.configuration_changed("router", {"a": 1}, {"a": 2}),
    }


def test_every_kind_renders_a_message_valid_against_the_ps3_15_schema(tmp_path):
    for name, record in every_kind().items():
        xml = audit_message(record, "dicomflow@node1", site_id="HOSPITAL")
        _validate(xml, tmp_path, name)
        root = ET.fromstring(xml)
        assert root.tag == "AuditMessage"
        assert [c.tag for c in root][:1] == ["EventIdentification"]
        # ActiveParticipants come before the one AuditSourceIdentification, participant objects after it
        tags = [c.tag for c in root]
        assert tags.count("AuditSourceIdentification") == 1
        src = tags.index("AuditSourceIdentification")
        assert set(tags[1:src]) == {"ActiveParticipant"}
        assert set(tags[src + 1:]) <= {"ParticipantObjectIdentification"}
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "dicomflow@node1"
        assert root.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "HOSPITAL"
        # the record's own time, with its zone, as xsd:dateTime
        when = datetime.fromisoformat(root.find("EventIdentification").get("EventDateTime").replace("Z", "+00:00"))
        assert abs(when - record.event_time) < timedelta(milliseconds=1)


def test_association_record_counts_studies_sop_classes_and_failures(tmp_path):
    record = _association()
    assert record.kind == "association" and record.action == "C"
    assert record.outcome == "minor-failure"  # one of six refused
    assert "1 of 6 instances refused: 0xA700 staging write failed" == record.outcome_description
    assert record.subject() == "dicom.audit.association.minor-failure"
    assert record.msg_id() == f"audit:{record.audit_id}"
    root = ET.fromstring(audit_message(record, "src"))
    ev = root.find("EventIdentification")
    assert ev.get("EventActionCode") == "C" and ev.get("EventOutcomeIndicator") == "4"
    assert _coded(ev.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    source, destination = root.findall("ActiveParticipant")
    assert source.attrib == {"UserID": "MODALITY1", "AlternativeUserID": "AETITLES=MODALITY1", "UserIsRequestor": "true",
                             "NetworkAccessPointID": "192.0.2.7", "NetworkAccessPointTypeCode": "2"}
    assert _coded(source.find("RoleIDCode")) == ("110153", "DCM", "Source Role ID")
    assert destination.get("UserID") == "DICOMFLOW" and destination.get("UserIsRequestor") == "false"
    assert _coded(destination.find("RoleIDCode")) == ("110152", "DCM", "Destination Role ID")
    studies = {o.get("ParticipantObjectID"): o for o in root.findall("ParticipantObjectIdentification")}
    assert set(studies) == {"1.2.3.1", "1.2.3.2"}
    first = studies["1.2.3.1"]
    assert (first.get("ParticipantObjectTypeCode"), first.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert _coded(first.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    assert {s.get("UID"): s.get("NumberOfInstances") for s in first.findall("SOPClass")} == {CT: "3", MR: "1"}
    assert first.find("ParticipantObjectDescription").text == "4 instances of 2 SOP classes"
    assert {s.get("UID"): s.get("NumberOfInstances") for s in studies["1.2.3.2"].findall("SOPClass")} == {MR: "1"}


def test_an_association_that_stored_nothing_is_not_an_instances_transferred_record():
    assert records.AssociationTally("ECHOSCU", "DICOMFLOW", "127.0.0.1").record() is None
    all_failed = records.AssociationTally("M", "D", "h")
    all_failed.add(0xA700, "", CT, "no space")
    assert all_failed.record().outcome == "serious-failure"


def test_event_codes_of_each_kind():
    expected = {
        "rejected": ("110114", [("110122", "DCM", "Login")], "E", "4"),
        "http-auth": ("110114", [("110122", "DCM", "Login")], "E", "4"),
        "query": ("110112", [], "E", "0"),
        "move": ("110102", [], "E", "0"),  # Begin Transferring: "Shall be E"
        "get-refused": ("110102", [], "E", "4"),
        "moved": ("110104", [], "R", "4"),  # the end of the C-MOVE: one of two sub-operations failed
        "export": ("110106", [], "R", "0"),
        "deletion": ("110105", [], "D", "0"),
        "dlq-replay": ("110102", [("DLQ-REPLAY", "99DICOMFLOW", "Dead-letter replay")], "E", "4"),
        "start": ("110100", [("110120", "DCM", "Application Start")], "E", "0"),
        "reload": ("110113", [("110131", "DCM", "Software Configuration")], "E", "0"),
    }
    kinds = every_kind()
    for name, (event_id, types, action, outcome) in expected.items():
        ev = ET.fromstring(audit_message(kinds[name], "src")).find("EventIdentification")
        assert ev.find("EventID").get("csd-code") == event_id, name
        assert [_coded(t) for t in ev.findall("EventTypeCode")] == types, name
        assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == (action, outcome), name


def test_query_and_move_participants_and_objects():
    kinds = every_kind()
    q = ET.fromstring(audit_message(kinds["query"], "src"))
    obj = q.find("ParticipantObjectIdentification")
    assert (obj.get("ParticipantObjectID"), obj.get("ParticipantObjectTypeCodeRole")) == (
        "1.2.840.10008.5.1.4.1.2.2.1", "24")
    assert _coded(obj.find("ParticipantObjectIDTypeCode")) == ("110181", "DCM", "SOP Class UID")
    assert base64.b64decode(obj.find("ParticipantObjectQuery").text) == b'{"0020000D": {"vr": "UI"}}'
    detail = obj.find("ParticipantObjectDetail")
    assert detail.get("type") == "TransferSyntax" and base64.b64decode(detail.get("value")) == b"1.2.840.10008.1.2.1"
    move = ET.fromstring(audit_message(kinds["move"], "src"))
    roles = {p.get("UserID"): (p.get("UserIsRequestor"), p.find("RoleIDCode")) for p in move.findall("ActiveParticipant")}
    assert roles["DICOMFLOW"][0] == "false" and roles["DICOMFLOW"][1].get("csd-code") == "110153"
    assert roles["PACS"][0] == "false" and roles["PACS"][1].get("csd-code") == "110152"
    assert roles["MOVESCU"][0] == "true" and roles["MOVESCU"][1] is None  # asked, neither sends nor receives
    study = move.find("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == "1.2.3.1" and study.find("SOPClass").get("NumberOfInstances") == "2"
    export = ET.fromstring(audit_message(kinds["export"], "src"))
    media = [p for p in export.findall("ActiveParticipant") if p.get("UserID") == "/media/usb/out"][0]
    assert _coded(media.find("RoleIDCode")) == ("110155", "DCM", "Destination Media")
    start = ET.fromstring(audit_message(kinds["start"], "src"))
    cfg = start.find("ParticipantObjectIdentification")
    assert cfg.get("ParticipantObjectID") == "ab" * 32
    assert start.find("ActiveParticipant").get("NetworkAccessPointTypeCode") == "1"  # a host name, not an address


def test_configuration_digest_is_stable_and_tells_configurations_apart():
    a = records.configuration_digest({"b": 1, "a": {"x": [1, 2]}})
    assert a == records.configuration_digest({"a": {"x": [1, 2]}, "b": 1})
    assert a != records.configuration_digest({"b": 2, "a": {"x": [1, 2]}})
    changed = records.configuration_changed("router", {"a": 1}, None, "not applied: bad rules")
    assert changed.outcome == "minor-failure" and changed.detail["applied"] == "false"


def test_syslog_message_is_rfc5424_with_octet_counting_framing():
    record = _association()
    xml = audit_message(record, "src")
    stamp = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)
    msg = syslog_message(xml, record.outcome, stamp, "node 1\x00", "dicomflow", "42")
    header, _, body = msg.partition(b" " + BOM)
    assert body == xml
    # PRI: facility authpriv (10) * 8 + severity warning (4) for a minor failure
    assert header.decode() == "<84>1 2026-12-06T10:00:00.123456Z node1 dicomflow 42 IHE+RFC-3881 -"
    assert syslog_message(xml, "success", stamp, "h", "a", "1").startswith(b"<85>1 ")
    assert syslog_message(xml, "major-failure", stamp, "", "", "").startswith(b"<82>1 2026-12-06T10:00:00.123456Z - - - ")
    framed = frame(msg)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(msg) and rest == msg


def test_cli_filters():
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_since("2026-12-01T08:00+01:00", now) == datetime(2026, 12, 1, 7, tzinfo=UTC)
    with pytest.raises(BadTime):
        parse_since("yesterday", now)
    record = _association()
    assert matches(record, "1.2.3.2", None) and not matches(record, "9.9", None)
    assert matches(record, None, "MODALITY1") and matches(record, None, "DICOMFLOW") and not matches(record, None, "X")
    line = format_line(record)
    assert "association" in line and "MODALITY1@192.0.2.7*" in line and "2 studies, 5 inst" in line
