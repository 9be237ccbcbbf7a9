"""Versions of an instance: a resend is stored and forwarded once whatever the time since the first receipt, and
the last version answered with success is the one held (A, then B, then A again: A)."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time

import blake3
import nats
import psycopg
import pytest
from pydicom import dcmread

from services.router.completion import (
    RECENT,
    Arrival,
    StudyState,
    latest_versions,
    recent_verdict,
    record_arrival,
    summarize,
    verdict_from_history,
)
from shared.catalogue.entry import InstanceFacts, entry_from_model
from shared.catalogue.open import open_catalogue
from shared.catalogue.sql import Recorded, version_outcome
from shared.config import CompletionConfig
from shared.contract.events import ForwardJob, InstanceReceived, InstanceStored, InstanceTags
from shared.contract.uids import uid_token
from shared.dicom.json_model import json_model
from tests.helpers import dataset_bytes, encode, wait_for
from tests.router_harness import Gateway, events_on, last_event, make_studies

# --- the pure decisions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("current, digest, seq, expected", [
    (None, "a", 5, Recorded("new")),
    (("a", 5), "a", 5, Recorded("same")),  # the event that recorded it, redelivered
    (("a", 5), "a", 9, Recorded("resent")),  # the same bytes received again, later
    (("a", 5), "b", 9, Recorded("replaced", "a")),
    (("b", 9), "a", 5, Recorded("stale")),  # an older version redelivered after the newer was recorded
    (("a", 0), "b", 3, Recorded("replaced", "a")),  # a row of before sequences: older than any event
    (("a", 0), "a", 3, Recorded("same")),
    (("a", 5), "b", 0, Recorded("replaced", "a")),  # an event of before sequences: taken as it comes
])
def test_version_outcome(current, digest, seq, expected):
    assert version_outcome(current, digest, seq) == expected


def test_a_redelivered_replacement_says_again_what_it_replaced():
    assert version_outcome(("b", 9), "b", 9, held_replaced="a") == Recorded("same", "a")
    assert version_outcome(("b", 9), "b", 12, held_replaced="a") == Recorded("resent")  # a resend replaces nothing


def _arrival(sop: str, digest: str, seq: int, replaces: bool = False) -> Arrival:
    return Arrival("1.2", "1.2.1", sop, digest, seq, replaces=replaces)


def test_router_memory_tells_a_resend_from_a_new_version():
    policy = CompletionConfig()
    st, _ = record_arrival(None, _arrival("1.2.3", "aaaa1111", 1), 0.0, policy, False)
    assert recent_verdict(st, "1.2.3", "aaaa1111") == "duplicate"
    assert recent_verdict(st, "1.2.3", "bbbb2222") == "replaces"
    assert recent_verdict(st, "1.2.4", "aaaa1111") == "new"
    st, changed = record_arrival(st, _arrival("1.2.3", "bbbb2222", 2), 1.0, policy, False)
    assert changed and st.count == 1 and st.series["1.2.1"].n == 1  # another version, not another instance
    assert recent_verdict(st, "1.2.3", "bbbb2222") == "duplicate"
    assert recent_verdict(st, "1.2.3", "aaaa1111") == "replaces"  # A again after B: a change, forwarded


def test_two_tenants_instances_with_one_uid_are_not_versions_of_one_another():
    policy = CompletionConfig()
    st, _ = record_arrival(None, Arrival("1.2", "1.2.1", "1.2.3", "aaaa1111", 1, tenant="a"), 0.0, policy, False)
    assert recent_verdict(st, "1.2.3", "aaaa1111", tenant="a") == "duplicate"
    assert recent_verdict(st, "1.2.3", "aaaa1111", tenant="b") == "new"  # forwarded for b too
    assert recent_verdict(st, "1.2.3", "bbbb2222", tenant="b") == "new"
    st, _ = record_arrival(st, Arrival("1.2", "1.2.1", "1.2.3", "aaaa1111", 2, tenant="b"), 1.0, policy, False)
    assert st.count == 2 and len(st.recent) == 2


def test_router_memory_defers_to_the_stream_where_it_cannot_tell():
    assert recent_verdict(None, "1.2.3", "aaaa") == "unknown"  # no state: expired, or the first of a study
    closed = StudyState(study_uid="1.2", gen=1, completed_gen=1, count=1)
    assert recent_verdict(closed, "1.2.3", "aaaa") == "unknown"
    big = StudyState(study_uid="1.2", count=RECENT)
    before_versions = StudyState(study_uid="1.2", count=1, recent=["0123456789ab"])  # a key of the old format
    assert recent_verdict(before_versions, "1.2.3", "aaaa") == "unknown"
    assert recent_verdict(big, "1.2.3", "aaaa") == "unknown"
    small = StudyState(study_uid="1.2", count=3)
    assert recent_verdict(small, "1.2.3", "aaaa", recent=3) == "unknown"  # router.recent_instances: 3
    assert recent_verdict(small, "1.2.3", "aaaa", recent=4) == "new"
    st = None
    for i in range(5):
        st, _ = record_arrival(st, _arrival(f"1.2.{i}", "aaaa", i + 1), float(i), CompletionConfig(), False, recent=3)
    assert st.count == 5 and len(st.recent) == 3
    assert verdict_from_history([], "a") == "new"
    assert verdict_from_history(["a"], "a") == "duplicate"
    assert verdict_from_history(["a", "b"], "a") == "replaces"
    assert verdict_from_history(["b", "a"], "a") == "duplicate"


def test_a_new_version_reopens_a_completed_study_without_counting_an_instance():
    st = StudyState(study_uid="1.2", gen=1, completed_gen=1, count=1, seq_at_complete=1)
    after, changed = record_arrival(st, _arrival("1.2.3", "bbbb", 7, replaces=True), 5.0, CompletionConfig(), False)
    assert changed and after.gen == 2 and after.is_open and after.count == 1


def test_study_walks_take_each_instance_s_last_version_once():
    events = [(1, "s1", "A", "e1"), (2, "s2", "C", "e2"), (3, "s1", "B", "e3"), (4, "s1", "A", "e4"),
              (5, "s2", "C", "e5")]  # s1: A, B, A again; s2: C, then C resent
    assert latest_versions(events) == [(2, "e2"), (4, "e4")]
    summary = summarize([(seq, "se", sop, d, "", "") for seq, sop, d, _ in events])
    assert summary.instances == 2 and summary.last_seq == 5


def test_message_ids_make_every_receipt_and_version_an_event():
    tags = InstanceTags(study_uid="1.2", series_uid="1.2.1", sop_uid="1.2.3")
    common = dict(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", size=1, backend="local", calling_ae="M",
                  called_ae="D", received_at="2026-12-06T00:00:00Z", tenant="t")
    first = InstanceReceived(digest="a" * 64, receipt="r1", **common)
    again = InstanceReceived(digest="a" * 64, receipt="r3", **common)
    assert first.msg_id() != again.msg_id()  # A, B, A: the third is not a duplicate of the first
    assert first.msg_id() == first.model_copy().msg_id()  # a retried publish of one receipt is one message
    stored = dict(tags=tags, transfer_syntax_uid="x", digest="a" * 64, size=1, policy="p", placements=["local"],
                  calling_ae="M", stored_at="2026-12-06T00:00:00Z", tenant="t")
    assert InstanceStored(source_seq=1, **stored).msg_id() != InstanceStored(source_seq=3, **stored).msg_id()
    job = dict(target="GW", rule="r", study_uid="1.2", series_uid="1.2.1", sop_uid="1.2.3", sop_class_uid="c",
               transfer_syntax_uid="x", digest="a" * 64, size=1, backend="local")
    assert ForwardJob(source_seq=1, **job).msg_id() != ForwardJob(source_seq=3, **job).msg_id()


# --- the catalogue ----------------------------------------------------------------------------------------------


def _entry(ds, digest: str, seq: int):
    raw = encode(ds)
    facts = InstanceFacts("t", "1.2.840.10008.1.2.1", digest, len(raw), "default", ("local",), "M", "2026",
                          "2026", seq)
    return entry_from_model(json_model(raw, "1.2.840.10008.1.2.1"), facts)


_db = itertools.count()


def _catalogue_url(request, tmp_path, backend: str) -> str:
    """A fresh catalogue of ``backend``: "" (SQLite in tmp_path) or a new database on the suite's PostgreSQL."""
    if backend == "sqlite":
        return ""
    return request.getfixturevalue("pg_cluster").new_database(f"versions{next(_db)}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_catalogue_keeps_the_version_received_last(tmp_path, request, backend):
    uid, files = make_studies(tmp_path / "s", 1, 1).popitem()
    ds = dcmread(files[0])
    cat = open_catalogue(_catalogue_url(request, tmp_path, backend), tmp_path)
    sop = ds.SOPInstanceUID
    assert cat.record_batch([_entry(ds, "A", 1)]) == [Recorded("new")]
    assert cat.record_batch([_entry(ds, "B", 2), _entry(ds, "A", 3)]) == [Recorded("replaced", "A"),
                                                                          Recorded("replaced", "B")]
    assert cat.record_batch([_entry(ds, "B", 2)]) == [Recorded("stale")]  # B redelivered late
    # A's event redelivered (a store killed before it published): its stored event again names what A replaced.
    assert cat.record_batch([_entry(ds, "A", 3)]) == [Recorded("same", "B")]
    assert cat.record_batch([_entry(ds, "A", 8)]) == [Recorded("resent")]
    assert cat.versions("t", [sop, "9.9"]) == {sop: ("A", 3)}
    assert cat.versions("other", [sop]) == {}
    assert cat.count("t") == 1
    cat.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_catalogue_of_schema_1_gains_the_sequence_column(tmp_path, request, backend):
    url = _catalogue_url(request, tmp_path, backend)
    uid, files = make_studies(tmp_path / "s", 1, 2).popitem()
    old, new = (dcmread(f) for f in files)
    cat = open_catalogue(url, tmp_path)
    assert cat.record_batch([_entry(old, "A", 0)]) == [Recorded("new")]
    cat.close()
    statements = ["ALTER TABLE instances DROP COLUMN source_seq", "ALTER TABLE instances DROP COLUMN replaced_digest",
                  "UPDATE catalogue_schema SET version = 1"]
    if backend == "sqlite":  # back to what version 1 wrote, its row kept
        conn = sqlite3.connect(tmp_path / "catalogue.sqlite")
        for statement in statements:
            conn.execute(statement)
        conn.commit()
        conn.close()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)
    cat = open_catalogue(url, tmp_path)
    assert cat.versions("t", [old.SOPInstanceUID]) == {old.SOPInstanceUID: ("A", 0)}  # older than any event
    assert cat.record_batch([_entry(old, "B", 4), _entry(new, "C", 5)]) == [Recorded("replaced", "A"), Recorded("new")]
    assert cat.record_batch([_entry(old, "B", 4)]) == [Recorded("same", "A")]
    assert cat.versions("t", [old.SOPInstanceUID, new.SOPInstanceUID]) == {old.SOPInstanceUID: ("B", 4),
                                                                           new.SOPInstanceUID: ("C", 5)}
    cat.close()
    cat = open_catalogue(url, tmp_path)  # opened again: version 2 already, nothing to migrate
    assert cat.count("t") == 2
    cat.close()


# --- against the real services ----------------------------------------------------------------------------------


class CountingGateway(Gateway):
    """A storescp keeping every reception as a file of its own (+uf), so a second forward shows."""

    def start(self) -> CountingGateway:
        import os
        import subprocess

        from dicomflow.natsserver import wait_port

        self.proc = subprocess.Popen(["storescp", "-aet", self.name, "+B", "+uf", "-od", str(self.dir),
                                      str(self.port)], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "TCP_NODELAY": "1"})
        wait_port("127.0.0.1", self.port, 15)
        return self

    def receptions(self) -> list[tuple[str, bytes]]:
        """(SOP Instance UID, data set bytes) of each complete reception, oldest first."""
        out = []
        for f in sorted((f for f in self.dir.iterdir() if f.is_file()), key=lambda f: f.stat().st_mtime_ns):
            try:
                out.append((dcmread(f, stop_before_pixels=True).SOPInstanceUID, dataset_bytes(f)))
            except Exception:
                continue  # being written
        return out


def _drained(url: str) -> bool:
    """Whether every consumer of the instance stream has handled everything (nothing pending or unacknowledged)."""
    from shared.bus.jetstream import api

    async def go() -> bool:
        nc = await nats.connect(url)
        try:
            listing = await api(nc, "CONSUMER.LIST.DICOM", {})
            return all(c["num_pending"] == 0 and c["num_ack_pending"] == 0 for c in listing["consumers"])
        finally:
            await nc.close()

    return asyncio.run(go())


FORWARD_ALL = "rules:\n  - {name: all, action: forward, to: GW}\n"


def _versions_stack(request, tmp_path, nats_server, stack_factory, window_s: float):
    """The embedded stack with a ``window_s`` duplicate window, a router forwarding everything to a counting
    gateway, a study state remembering 3 instances (router.recent_instances), on the catalogue ``request.param``."""
    gw = CountingGateway(tmp_path, "GW").start()
    request.addfinalizer(gw.kill)
    (tmp_path / "rules.yaml").write_text(FORWARD_ALL)
    stack = stack_factory(nats_server.url, stream={"duplicate_window_s": window_s},
                          catalogue={"url": _catalogue_url(request, tmp_path, request.param)},
                          router={"rules_file": str(tmp_path / "rules.yaml"), "targets": {"GW": gw.target()},
                                  "completion": {"quiet_s": 1.5}, "scan_interval_s": 0.2, "recent_instances": 3})
    return stack, gw, nats_server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def versions_stack(request, tmp_path, nats_server, stack_factory):
    """A 1 s duplicate window: a resend after it is a new message to JetStream."""
    return _versions_stack(request, tmp_path, nats_server, stack_factory, 1)


@pytest.fixture(params=["sqlite", "postgresql"])
def long_window_stack(request, tmp_path, nats_server, stack_factory):
    """A 120 s duplicate window: every send of a test falls within it."""
    return _versions_stack(request, tmp_path, nats_server, stack_factory, 120)


def test_a_study_resent_after_the_duplicate_window_is_stored_and_forwarded_once(tmp_path, versions_stack):
    stack, gw, url = versions_stack
    uid, files = make_studies(tmp_path / "s", 1, 4).popitem()
    token = uid_token(uid)
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: len(gw.receptions()) == 4, 60, interval=0.2, what="the study forwarded")
    wait_for(lambda: events_on(url, f"dicom.study.complete.{token}") == 1, 60, what="study.complete")
    wait_for(lambda: events_on(url, f"dicom.stored.{token}.>") == 4, 30, what="4 stored events")
    time.sleep(1.5)  # past the 1 s duplicate window: JetStream keeps the resend as new events
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: events_on(url, "dicom.part.>", stream="DICOM") == 8, 30, what="the resend's 4 events")
    wait_for(lambda: _drained(url), 60, what="the store and the router to handle the resend")
    time.sleep(2.5)  # a completion scan (quiet 1.5 s) would have re-opened and announced it by now
    assert len(gw.receptions()) == 4, "a resent instance was forwarded again"
    assert events_on(url, f"dicom.stored.{token}.>") == 4, "a resent instance was stored again"
    assert events_on(url, f"dicom.study.updated.{token}") == 0, "the resend re-opened the completed study"
    assert stack.instances_of(uid) == 4


def test_version_a_then_b_then_a_again_keeps_a(tmp_path, long_window_stack):
    stack, gw, url = long_window_stack
    uid, files = make_studies(tmp_path / "s", 1, 1).popitem()
    token = uid_token(uid)
    version_a = files[0]
    ds = dcmread(version_a)
    ds.ImageComments = "version B"
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    ds.save_as(b_dir / "b.dcm", enforce_file_format=True)
    bytes_a, bytes_b = dataset_bytes(version_a), dataset_bytes(b_dir / "b.dcm")
    for folder in (version_a.parent, b_dir, version_a.parent):  # all three within the duplicate window
        assert stack.storescu(folder).returncode == 0
    wait_for(lambda: events_on(url, f"dicom.stored.{token}.>") == 3, 30, what="three stored events")
    last = last_event(url, f"dicom.stored.{token}.>")
    assert last["replaced_digest"] and last["source_seq"] > 0
    out = tmp_path / "export"
    stack.cli("export", "--study", uid, "--out", str(out))
    exported, = [f for f in out.rglob("*") if f.is_file()]
    assert dataset_bytes(exported) == bytes_a, "the archive holds B, not the version answered last"
    wait_for(lambda: len(gw.receptions()) == 3, 60, interval=0.2, what="each version forwarded")
    assert [data for _, data in gw.receptions()].count(bytes_a) == 2
    assert bytes_b in [data for _, data in gw.receptions()]


def _version_b(original, folder, comment: str = "version B"):
    """Another version of ``original``'s instance (same SOP Instance UID, other bytes), alone in ``folder``."""
    ds = dcmread(original)
    ds.ImageComments = comment
    folder.mkdir()
    ds.save_as(folder / "b.dcm", enforce_file_format=True)
    return folder / "b.dcm"


def test_a_completed_study_bigger_than_the_router_memory_resent_late_then_changed(tmp_path, versions_stack):
    """6 instances, a memory of 3: the router tells the resend (and the later instances) by the stream, the
    store by the catalogue. Then one instance changes: the new version is stored, announced, forwarded, and
    re-opens the study once; that version resent late is again nothing."""
    stack, gw, url = versions_stack
    uid, files = make_studies(tmp_path / "s", 1, 6).popitem()
    token = uid_token(uid)
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: len(gw.receptions()) == 6, 60, interval=0.2, what="the study forwarded")
    wait_for(lambda: events_on(url, f"dicom.study.complete.{token}") == 1, 60, what="study.complete")
    complete = last_event(url, f"dicom.study.complete.{token}")
    assert complete["instances"] == 6
    time.sleep(1.5)  # past the duplicate window
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: events_on(url, "dicom.part.>", stream="DICOM") == 12, 30, what="the resend's 6 events")
    wait_for(lambda: _drained(url), 60, what="the store and the router to handle the resend")
    time.sleep(2.5)  # a completion scan (quiet 1.5 s) would have re-opened and announced it by now
    assert len(gw.receptions()) == 6, "a resent instance was forwarded again"
    assert events_on(url, f"dicom.stored.{token}.>") == 6, "a resent instance was stored again"
    assert events_on(url, f"dicom.study.updated.{token}") == 0, "the resend re-opened the completed study"

    changed = files[2]
    sop = dcmread(changed, stop_before_pixels=True).SOPInstanceUID
    b_file = _version_b(changed, tmp_path / "b")
    bytes_a, bytes_b = dataset_bytes(changed), dataset_bytes(b_file)
    assert stack.storescu(b_file.parent).returncode == 0
    # The replacement is an event: a subscriber of dicom.stored sees which version it replaces.
    wait_for(lambda: events_on(url, f"dicom.stored.{token}.>") == 7, 30, what="the new version's stored event")
    stored = last_event(url, f"dicom.stored.{token}.{uid_token(sop)}")
    assert stored["digest"] == blake3.blake3(bytes_b).hexdigest()
    assert stored["replaced_digest"] == blake3.blake3(bytes_a).hexdigest()
    wait_for(lambda: len(gw.receptions()) == 7, 60, interval=0.2, what="the new version forwarded")
    assert gw.receptions()[-1] == (sop, bytes_b)
    wait_for(lambda: events_on(url, f"dicom.study.updated.{token}") == 1, 30, what="study.updated")
    updated = last_event(url, f"dicom.study.updated.{token}")
    assert updated["instances"] == 6  # another version, not another instance
    assert stack.instances_of(uid) == 6
    out = tmp_path / "export"
    stack.cli("export", "--study", uid, "--out", str(out))
    held = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(f) for f in out.rglob("*") if f.is_file()}
    assert len(held) == 6 and held[sop] == bytes_b

    time.sleep(1.5)  # the new version resent after the window: nothing again
    assert stack.storescu(b_file.parent).returncode == 0
    wait_for(lambda: events_on(url, "dicom.part.>", stream="DICOM") == 14, 30, what="the second receipt of B")
    wait_for(lambda: _drained(url), 60, what="the store and the router to handle it")
    time.sleep(2.5)
    assert len(gw.receptions()) == 7
    assert events_on(url, f"dicom.stored.{token}.>") == 7
    assert events_on(url, f"dicom.study.updated.{token}") == 1


def test_stow_rs_a_then_b_then_a_again_is_served_as_a(tmp_path, nats_server, stack_factory):
    """The same over STOW-RS (one request each, within the duplicate window): WADO-RS serves A, and each send
    was a version stored, the last one naming B as what it replaced."""
    from dicomweb_client.api import DICOMwebClient

    from dicomflow.natsserver import free_port
    from shared.tenancy import api_key_hash
    from tests.test_dicomweb_wado import data_set_of
    from tests.test_stow import KEY_A, part10_file, post

    stack = stack_factory(nats_server.url, web={"port": free_port()},
                          access={"default_tenant": None, "anonymous_tenant": None,
                                  "tenants": {"a": {"api_keys_sha256": [api_key_hash(KEY_A)]}}})
    url = f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web"
    uid, files = make_studies(tmp_path / "s", 1, 1).popitem()
    version_a = dcmread(files[0])
    version_b = dcmread(files[0])
    version_b.ImageComments = "version B"
    for ds in (version_a, version_b, version_a):
        assert post(f"{url}/studies", [part10_file(ds)]).status_code == 200
    token = uid_token(uid)
    wait_for(lambda: events_on(nats_server.url, f"dicom.stored.{token}.>") == 3, 30, what="three stored events")
    last = last_event(nats_server.url, f"dicom.stored.{token}.>")
    assert last["digest"] == blake3.blake3(encode(version_a)).hexdigest()
    assert last["replaced_digest"] == blake3.blake3(encode(version_b)).hexdigest()
    [served] = DICOMwebClient(url, headers={"X-API-Key": KEY_A}).retrieve_study(uid)
    assert data_set_of(served) == encode(version_a)


def _forget_study(url: str, study_uid: str) -> None:
    """Purge the router's KV state of a study, as its expiry would."""
    from shared.contract import subjects

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value(subjects.STUDIES_BUCKET)
            await kv.purge(uid_token(study_uid))
        finally:
            await nc.close()

    asyncio.run(go())


def test_router_killed_and_the_study_state_gone_a_late_resend_forwards_and_completes_nothing(tmp_path, nats_server):
    """kill -9 of the router after the study completed, its KV state purged (as if expired), a new router, then
    the study resent after the duplicate window: the new router finds every instance's earlier event in the
    stream, so nothing is forwarded again and no new state, completion or update appears."""
    from tests.router_harness import Cluster, study_state

    gw = CountingGateway(tmp_path, "GW").start()
    cluster = Cluster(tmp_path, nats_server.url, {"targets": {"GW": gw.target()}}, FORWARD_ALL)
    cluster.tree["stream"]["duplicate_window_s"] = 1
    cluster.write()
    url = nats_server.url
    try:
        cluster.start_ingest()
        router = cluster.start_router()
        uid, files = make_studies(tmp_path / "s", 1, 5).popitem()
        token = uid_token(uid)
        cluster.send([files[0].parent])
        wait_for(lambda: len(gw.receptions()) == 5, 60, interval=0.2, what="the study forwarded")
        wait_for(lambda: events_on(url, f"dicom.study.complete.{token}") == 1, 60, what="study.complete")
        cluster.kill(router)
        _forget_study(url, uid)
        assert study_state(url, uid) is None
        cluster.start_router()
        time.sleep(1.5)  # past the duplicate window
        cluster.send([files[0].parent])
        wait_for(lambda: events_on(url, "dicom.part.>", stream="DICOM") == 10, 30, what="the resend's 5 events")
        wait_for(lambda: _drained(url), 60, what="the new router to handle the resend")
        time.sleep(2.5)  # a completion scan (quiet 1.5 s) would have announced a new state by now
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        gw.kill()
    assert len(gw.receptions()) == 5, "a resent instance was forwarded again"
    assert study_state(url, uid) is None, "the resend started the study again"
    assert events_on(url, f"dicom.study.complete.{token}") == 1
    assert events_on(url, f"dicom.study.updated.{token}") == 0


def test_two_tenants_send_one_study_each_copy_is_stored_and_forwarded(tmp_path, nats_server, stack_factory):
    """The same UIDs and bytes from two tenants' AEs are two instances to the store and the router, not a
    resend: each is catalogued in its tenant and forwarded."""
    gw = CountingGateway(tmp_path, "GW").start()
    try:
        (tmp_path / "rules.yaml").write_text(FORWARD_ALL)
        stack = stack_factory(nats_server.url, stream={"duplicate_window_s": 1},
                              access={"default_tenant": None, "anonymous_tenant": None,
                                      "tenants": {"a": {"aes": ["MOD_A"]}, "b": {"aes": ["MOD_B"]}}},
                              # a memory of 1: the router tells most of them apart by the stream
                              router={"rules_file": str(tmp_path / "rules.yaml"), "targets": {"GW": gw.target()},
                                      "completion": {"quiet_s": 1.5}, "scan_interval_s": 0.2, "recent_instances": 1})
        uid, files = make_studies(tmp_path / "s", 1, 3).popitem()
        assert stack.storescu(files[0].parent, calling_ae="MOD_A").returncode == 0
        wait_for(lambda: len(gw.receptions()) == 3, 60, interval=0.2, what="tenant a's study forwarded")
        time.sleep(1.5)  # past the duplicate window: only the tenant tells the second send from a resend
        assert stack.storescu(files[0].parent, calling_ae="MOD_B").returncode == 0
        wait_for(lambda: len(gw.receptions()) == 6, 60, interval=0.2, what="tenant b's study forwarded too")
        wait_for(lambda: events_on(nats_server.url, f"dicom.stored.{uid_token(uid)}.>") == 6, 30,
                 what="six stored events")
        assert sorted(s["tenant"] for s in stack.studies() if s["study_uid"] == uid) == ["a", "b"]
    finally:
        gw.kill()
