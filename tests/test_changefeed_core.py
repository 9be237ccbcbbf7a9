"""The change feed's decisions without I/O: what a feed message is, who sees it, the page a query asks for, an
entry's state and its shape (the Microsoft DICOM service's fields)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from dicomflow.events_cli import parse_cursor
from shared.changefeed.entries import (
    Change,
    FeedQueryError,
    NotAChange,
    Page,
    change_of,
    entry_json,
    parse_page,
    select,
    state_of,
    visible,
)
from shared.config import AccessConfig, StreamConfig
from shared.contract import events, subjects

ACCESS = AccessConfig.model_validate({
    "tenants": {"north": {"aes": ["CT_N"]}, "south": {"aes": ["CT_S"]}},
    "gateways": {"GW": {"South Hospital": "south"}},
    "default_tenant": "default"})
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def stored(sop: str, tenant: str = "north", replaced: str | None = None, digest: str = "aa" * 32) -> bytes:
    tags = events.InstanceTags(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=sop)
    return events.InstanceStored(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest=digest, size=10,
                                 policy="p", placements=["fs"], calling_ae="CT_N", stored_at=NOW,
                                 replaced_digest=replaced, tenant=tenant).model_dump_json().encode()


def complete(generation: int, calling_ae: str, institution: str = "", tenant: str = "") -> bytes:
    return events.StudyComplete(study_uid="1.2.3", generation=generation, reason="quiet", instances=2, series=[],
                                calling_ae=calling_ae, institution_name=institution, tenant=tenant, first_arrival=NOW,
                                last_arrival=NOW, completed_at=NOW).model_dump_json().encode()


def test_each_change_subject_becomes_its_entry():
    c = change_of(7, "dicom.stored.1_2_3.9", stored("9"), ACCESS)
    assert (c.sequence, c.kind, c.action, c.tenant, c.study_uid, c.series_uid, c.sop_uid) == \
        (7, "instance-stored", "create", "north", "1.2.3", "1.2.3.4", "9")
    r = change_of(8, "dicom.stored.1_2_3.9", stored("9", replaced="bb" * 32, digest="cc" * 32), ACCESS)
    assert (r.kind, r.action, r.digest) == ("instance-replaced", "update", "cc" * 32)
    s = change_of(9, "dicom.study.complete.1_2_3", complete(1, "CT_S"), ACCESS)
    assert (s.kind, s.action, s.tenant, s.series_uid, s.sop_uid, s.is_instance) == \
        ("study-complete", "create", "south", None, None, False)
    u = change_of(10, "dicom.study.updated.1_2_3", complete(2, "GW", "South Hospital"), ACCESS)
    assert (u.kind, u.action, u.tenant) == ("study-updated", "update", "south")  # the gateway's mapping
    assert change_of(11, "dicom.study.complete.1_2_3", complete(1, "ELSEWHERE"), ACCESS).tenant == "default"
    # the tenant the router carried from the instances wins (a STOW-RS study's calling AE is its principal)
    assert change_of(12, "dicom.study.complete.1_2_3", complete(1, "apikey:north", tenant="north"),
                     ACCESS).tenant == "north"


def test_a_deletion_event_is_a_delete_entry():
    # the body of the delete service's InstanceDeleted (dicom.deleted.<study>.<sop>), extra fields and all
    body = json.dumps({"tenant": "south", "study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_uid": "9",
                       "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "digest": "aa" * 32, "placements": ["fs"],
                       "objects_removed": ["fs"], "reason": "request", "requested_by": "apikey:south",
                       "deleted_at": NOW.isoformat(), "schema_version": 1}).encode()
    d = change_of(13, "dicom.deleted.1_2_3.9", body, ACCESS)
    assert (d.kind, d.action, d.tenant, d.sop_uid, d.digest, d.timestamp) == \
        ("instance-deleted", "delete", "south", "9", "aa" * 32, NOW)
    assert state_of(d, None, False) == "deleted"


def test_what_is_no_change_is_refused_not_guessed():
    with pytest.raises(NotAChange):
        change_of(1, "dicom.study.routed.1_2_3", b"{}", ACCESS)
    with pytest.raises(NotAChange):
        change_of(2, "dicom.stored.1_2_3.9", b"{not json", ACCESS)
    with pytest.raises(NotAChange):
        change_of(3, "dicom.stored.1_2_3.9", b'{"tags": {}}', ACCESS)


def test_a_tenant_sees_only_its_changes_an_administrator_all():
    changes = [Change(i, "instance-stored", "create", t, "1.2", "1.2.3", f"1.2.3.{i}", NOW + timedelta(seconds=i),
                      "aa") for i, t in enumerate(["north", "south", "north", "south", "north"], start=1)]
    assert [c.sequence for c in select(changes, "north", 10)] == [1, 3, 5]  # gaps where south's changes are
    assert [c.sequence for c in select(changes, "north", 2)] == [1, 3]
    assert [c.sequence for c in select(changes, None, 10)] == [1, 2, 3, 4, 5]
    assert [c.sequence for c in select(changes, "south", 10, since=NOW + timedelta(seconds=3))] == [4]
    assert not visible(changes[1], "north") and visible(changes[1], None)
    assert select(changes, "east", 10) == []


def test_state_says_what_the_catalogue_holds_now():
    inst = Change(1, "instance-stored", "create", "north", "1.2", "1.2.3", "1.2.3.4", NOW, "aa")
    assert state_of(inst, "aa", True) == "current"
    assert state_of(inst, "bb", True) == "replaced"
    assert state_of(inst, None, False) == "deleted"
    study = Change(2, "study-complete", "create", "north", "1.2", None, None, NOW)
    assert state_of(study, None, True) == "current" and state_of(study, None, False) == "deleted"
    gone = Change(3, "instance-deleted", "delete", "north", "1.2", "1.2.3", "1.2.3.4", NOW, "aa")
    assert state_of(gone, "aa", True) == "deleted"


@pytest.mark.parametrize(("query", "page"), [
    ([], Page(1, 100, True)),
    ([("startSequence", "42"), ("limit", "200")], Page(42, 200, True)),
    ([("offset", "41"), ("limit", "5"), ("includemetadata", "false")], Page(42, 5, False)),  # Microsoft v1
    ([("StartSequence", "3"), ("IncludeMetadata", "TRUE")], Page(3, 100, True)),
])
def test_the_page_a_query_asks_for(query, page):
    assert parse_page(query, 200) == page


@pytest.mark.parametrize(("query", "reason"), [
    ([("limit", "0")], "at least 1"),
    ([("limit", "201")], "at most 200"),
    ([("limit", "1.5")], "whole number"),
    ([("startSequence", "0")], "at least 1"),
    ([("startSequence", "-3")], "whole number"),
    ([("startSequence", "²")], "whole number"),
    ([("startSequence", "1"), ("offset", "0")], "not both"),
    ([("limit", "1"), ("limit", "2")], "twice"),
    ([("includeMetadata", "yes")], "true or false"),
    ([("startTime", "2026-01-01")], "unknown parameter"),
])
def test_a_query_that_cannot_be_answered_is_refused_with_its_reason(query, reason):
    with pytest.raises(FeedQueryError, match=reason):
        parse_page(query, 200)


def test_a_smaller_maximum_is_also_the_default_page():
    assert parse_page([], 20).limit == 20


def test_entries_have_the_microsoft_shape():
    inst = Change(5, "instance-replaced", "update", "north", "1.2", "1.2.3", "1.2.3.4", NOW, "aa")
    entry = entry_json(inst, "current", {"00080018": {"vr": "UI", "Value": ["1.2.3.4"]}}, with_metadata=True)
    assert entry == {"Sequence": 5, "StudyInstanceUid": "1.2", "SeriesInstanceUid": "1.2.3",
                     "SopInstanceUid": "1.2.3.4", "Action": "update", "Timestamp": "2026-12-06T12:00:00Z",
                     "State": "current", "Kind": "instance-replaced", "Tenant": "north",
                     "Metadata": {"00080018": {"vr": "UI", "Value": ["1.2.3.4"]}}}
    assert "Metadata" not in entry_json(inst, "current")


def test_the_feed_stream_is_filled_by_the_server_one_source_per_change_subject():
    cfg = subjects.changes_stream_config(StreamConfig(events_name="HOSPITAL_EVENTS"), 90)
    assert cfg["name"] == subjects.CHANGES_STREAM and "subjects" not in cfg
    assert cfg["sources"] == [{"name": "HOSPITAL_EVENTS", "filter_subject": s} for s in subjects.CHANGE_SUBJECTS]
    assert cfg["max_age"] == 90 * 86400 * 10**9
    # every change subject is one the events stream keeps, and each has a reader
    events_subjects = subjects.events_stream_config(StreamConfig())["subjects"]
    from shared.changefeed.entries import READERS
    for subject in subjects.CHANGE_SUBJECTS:
        prefix = subject.removesuffix(".>")
        assert any(subject.startswith(e.removesuffix(">")) or e == subject for e in events_subjects), subject
        assert prefix in READERS


def test_events_since_is_a_sequence_or_a_time():
    assert parse_cursor("42", NOW) == (42, None)
    assert parse_cursor("0", NOW) == (1, None)
    assert parse_cursor("2h", NOW) == (1, NOW - timedelta(hours=2))
    assert parse_cursor("2026-12-01T08:00Z", NOW) == (1, datetime(2026, 12, 1, 8, 0, tzinfo=UTC))


def test_events_tenant_must_be_one_the_configuration_can_give():
    from dicomflow.events_cli import known_tenants
    from shared.config import load_config

    config = load_config(overrides={"access": ACCESS.model_dump()}, environ={})
    assert known_tenants(config) == {"north", "south", "default"}
    config = load_config(overrides={"access": {"default_tenant": None, "anonymous_tenant": None,
                                               "gateways": {"GW": {"East": "east"}}}}, environ={})
    assert known_tenants(config) == {"east"}
