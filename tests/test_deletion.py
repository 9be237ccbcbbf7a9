"""Deletion's decisions (pure: which objects go, retention, rejection notes) and its execution over a real
catalogue (SQLite and PostgreSQL) and real filesystem backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from pydicom.dataset import Dataset

from dicomflow.synthetic import new_uid
from shared.catalogue.entry import InstanceFacts, entry_from_model
from shared.catalogue.open import open_catalogue
from shared.catalogue.query import STUDY, parse_qido
from shared.config import load_config
from shared.deletion.execute import delete, preview
from shared.deletion.plan import Target, deleted_events, objects_to_remove, tombstones
from shared.deletion.rejection import KOS_SOP_CLASS, rejection_of
from shared.deletion.retention import decide
from shared.dicom.json_model import json_model
from shared.storage.objectstore import Backends, content_digest
from shared.storage.rados_layout import study_index_name
from tests.helpers import encode
from tests.test_catalogue import study

EXPLICIT = "1.2.840.10008.1.2.1"
_db = count()


def rejection_note(code: str, refs: list[Dataset], scheme: str = "DCM", sop_class: str = KOS_SOP_CLASS) -> Dataset:
    """A Key Object Selection Document titled ``code`` referencing ``refs`` (as IOCM rejection notes are)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, new_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = refs[0].StudyInstanceUID, new_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "KO", "P1", "Note^Rejection"
    ds.InstanceNumber, ds.SeriesNumber = 1, 99
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, scheme, "Rejected"
    ds.ConceptNameCodeSequence = [title]
    by_series: dict[str, list[Dataset]] = {}
    for r in refs:
        by_series.setdefault(r.SeriesInstanceUID, []).append(r)
    study_item = Dataset()
    study_item.StudyInstanceUID = refs[0].StudyInstanceUID
    study_item.ReferencedSeriesSequence = []
    for series_uid, members in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        s.ReferencedSOPSequence = []
        for m in members:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = m.SOPClassUID, m.SOPInstanceUID
            s.ReferencedSOPSequence.append(item)
        study_item.ReferencedSeriesSequence.append(s)
    ds.CurrentRequestedProcedureEvidenceSequence = [study_item]
    return ds


# -- pure ---------------------------------------------------------------------------------------------

def _row(sop: str, digest: str, placements: list[str], tenant: str = "a", study_uid: str = "1.2") -> dict:
    return {"tenant": tenant, "sop_uid": sop, "study_uid": study_uid, "series_uid": "1.2.3", "digest": digest,
            "placements": placements, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}


def test_an_object_goes_with_the_last_instance_that_holds_it_in_that_backend():
    rows = [_row("1", "d1", ["fast", "archive"]), _row("2", "d2", ["fast"]), _row("3", "d1", ["fast", "archive"])]
    # another instance (of any tenant) still holds d1, but only in "archive"
    assert objects_to_remove(rows, {"d1": {"archive"}}) == {"fast": ["d1", "d2"]}
    assert objects_to_remove(rows, {}) == {"archive": ["d1"], "fast": ["d1", "d2"]}
    assert objects_to_remove(rows, {"d1": {"fast", "archive"}, "d2": {"fast"}}) == {}


def test_tombstones_only_where_a_study_index_is_kept_and_events_name_what_went():
    rows = [_row("1", "d1", ["fast", "ceph"], tenant="a"), _row("2", "d2", ["ceph"], tenant="")]
    assert tombstones(rows, {"ceph"}) == {"ceph": {"1.2": ["a/1", "2"]}}
    at = datetime(2026, 12, 6, tzinfo=UTC)
    events = deleted_events(rows, {"ceph": ["d2"], "fast": ["d1"]}, "request", "apikey:a", at)
    assert [(e.sop_uid, e.objects_removed) for e in events] == [("1", ["fast"]), ("2", ["ceph"])]
    assert events[0].subject() == "dicom.deleted.1_2.1" and events[0].msg_id() == f"deleted:a:1:d1:{at.isoformat()}"
    assert events[1].msg_id() == f"deleted:2:d2:{at.isoformat()}"


def test_target_levels():
    assert Target("a", "1.2").level == "study"
    assert Target("a", "1.2", "1.2.3").level == "series"
    assert Target(None, "1.2", "1.2.3", "1.2.3.4").level == "instance"
    with pytest.raises(ValueError):
        Target("a", "1.2", None, "1.2.3.4")


def test_retention_keeps_forever_young_held_and_in_flight_studies():
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    old, young = (now - timedelta(days=40)).isoformat(), (now - timedelta(days=5)).isoformat()
    studies = [("a", "1.1", old), ("a", "1.2", young), ("a", "1.3", old), ("a", "1.4", old), ("b", "1.5", old),
               ("a", "1.6", old)]
    verdicts = decide(studies, now, {"a": 30}, {"a": ["1.3"], "b": ["1.6"]}, {"1.4"})
    got = {v.study_uid: (v.action, v.why) for v in verdicts}
    assert got["1.1"][0] == "delete" and "past 30" in got["1.1"][1]
    assert got["1.2"][0] == "keep" and "kept 30" in got["1.2"][1]
    assert got["1.3"] == ("keep", "on hold")
    assert got["1.4"] == ("keep", "a forward is in flight")
    assert got["1.5"] == ("keep", "the tenant keeps studies forever")
    assert got["1.6"][0] == "delete"  # a hold is per tenant: b's hold of 1.6 does not keep a's


def test_retention_days_must_be_positive():
    from shared.config import ConfigError
    with pytest.raises(ConfigError, match="keep forever"):
        load_config(None, environ={}, overrides={"deletion": {"retention_days": {"a": 0}}})


def test_rejection_notes_are_recognised_by_title_and_class():
    refs = study(3, series=2)
    note = rejection_note("113001", refs)
    rej = rejection_of(note)
    assert rej.code == "113001" and rej.meaning == "Rejected for Quality Reasons"
    assert rej.note_uid == note.SOPInstanceUID
    assert set(rej.references) == {(r.StudyInstanceUID, r.SeriesInstanceUID, r.SOPInstanceUID) for r in refs}
    assert rejection_of(rejection_note("113039", refs)).meaning == "Data Retention Policy Expired"
    assert rejection_of(rejection_note("113000", refs)) is None  # "Of Interest": a KOS, not a rejection
    assert rejection_of(rejection_note("113001", refs, scheme="99LOCAL")) is None
    assert rejection_of(rejection_note("113001", refs, sop_class="1.2.840.10008.5.1.4.1.1.88.22")) is None


# -- over a real catalogue and real backends ------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request, tmp_path):
    url = "" if request.param == "sqlite" else request.getfixturevalue("pg_cluster").new_database(f"d{next(_db)}")
    config = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path), "catalogue": {"url": url},
        "storage": {"backends": {"local": {"kind": "fs", "path": "objects"},
                                 "archive": {"kind": "fs", "path": "archive"}}}})
    catalogue = open_catalogue(url, tmp_path)
    backends = Backends(config)
    yield catalogue, backends
    backends.close()
    catalogue.close()


def put(catalogue, backends, datasets, tenant="a", placements=("local", "archive")) -> dict[str, str]:
    """Place and catalogue data sets as the store does; SOP Instance UID -> digest."""
    out, entries = {}, []
    for ds in datasets:
        raw = encode(ds)
        digest = content_digest(raw)
        for name in placements:
            backends.get(name).put(digest, raw)
        facts = InstanceFacts(tenant, EXPLICIT, digest, len(raw), "default", tuple(placements), "MOD",
                              "2026-12-06T10:00:00+00:00", "2026-12-06T10:00:01+00:00")
        entries.append(entry_from_model(json_model(raw, EXPLICIT), facts))
        out[ds.SOPInstanceUID] = digest
    catalogue.record_batch(entries)
    return out


def test_delete_instance_series_study_recounts_and_removes_objects(stores):
    catalogue, backends = stores
    instances = study(6, series=2)
    digests = put(catalogue, backends, instances)
    s = instances[0].StudyInstanceUID
    one = instances[0]
    out = delete(catalogue, backends, Target("a", s, one.SeriesInstanceUID, one.SOPInstanceUID), "request", "t")
    assert [r["sop_uid"] for r in out.rows] == [one.SOPInstanceUID]
    assert out.removed == {"archive": [digests[one.SOPInstanceUID]], "local": [digests[one.SOPInstanceUID]]}
    assert not backends.get("local").exists(digests[one.SOPInstanceUID])
    [found] = catalogue.summaries(parse_qido(STUDY, [("StudyInstanceUID", s)]), "a", 10)
    assert found["instances"] == 5 and found["series"] == 2
    # a series, then the rest of the study: the study row goes with its last instance
    series_1 = instances[1].SeriesInstanceUID
    assert len(delete(catalogue, backends, Target("a", s, series_1), "request", "t").rows) == 3
    assert [se["n_instances"] for se in catalogue.series_of("a", s)] == [2]
    assert len(preview(catalogue, Target("a", s)).rows) == 2
    assert len(delete(catalogue, backends, Target("a", s), "request", "t").rows) == 2
    assert catalogue.summaries(parse_qido(STUDY, [("StudyInstanceUID", s)]), "a", 10) == []
    assert not any(backends.get("archive").exists(d) for d in digests.values())
    # again: nothing there (idempotent), and the events of the first were one per instance
    again = delete(catalogue, backends, Target("a", s), "request", "t")
    assert not again.found and again.events == []


def test_another_tenant_is_untouched_and_shared_bytes_stay_with_the_last_holder(stores):
    catalogue, backends = stores
    instances = study(2)
    s = instances[0].StudyInstanceUID
    da = put(catalogue, backends, instances, tenant="a")
    db = put(catalogue, backends, instances, tenant="b", placements=("local",))  # same UIDs, same bytes
    assert da == db
    # tenant c has nothing there: nothing happens
    assert not delete(catalogue, backends, Target("c", s), "request", "t").found
    out = delete(catalogue, backends, Target("a", s), "request", "t")
    assert len(out.rows) == 2
    # b still holds the bytes in "local": only the "archive" copies went
    assert out.removed == {"archive": sorted(da.values())}
    assert all(backends.get("local").exists(d) for d in da.values())
    assert {e.objects_removed[0] for e in out.events} == {"archive"}
    assert catalogue.count("b") == 2
    out = delete(catalogue, backends, Target("b", s), "request", "t")
    assert out.removed == {"local": sorted(da.values())}
    assert not any(backends.get("local").exists(d) for d in da.values())


def test_deleted_instances_leave_tombstones_so_a_reindex_does_not_bring_them_back(tmp_path):
    from services.store import study_index
    from services.store.reindex import rebuild

    config = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path),
        "storage": {"backends": {"local": {"kind": "fs", "path": "objects"}}}})
    backends = Backends(config)
    catalogue = open_catalogue("", tmp_path)
    instances = study(3)
    s = instances[0].StudyInstanceUID
    try:
        from shared.contract.events import InstanceReceived, InstanceTags
        digests = put(catalogue, backends, instances, placements=("local",))
        events = [InstanceReceived(tags=InstanceTags(study_uid=s, series_uid=ds.SeriesInstanceUID,
                                                     sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID),
                                   transfer_syntax_uid=EXPLICIT, digest=digests[ds.SOPInstanceUID], size=1,
                                   backend="local", calling_ae="MOD", called_ae="DICOMFLOW",
                                   received_at="2026-12-06T10:00:00+00:00", tenant="a") for ds in instances]
        study_index.record_studies(backends.get("local"), [[(e, "default", ["local"], "2026-12-06T10:00:01+00:00")
                                                            for e in events]])
        assert len(study_index.study_entries(backends.get("local"), s)) == 3
        one = instances[0]
        delete(catalogue, backends, Target("a", s, one.SeriesInstanceUID, one.SOPInstanceUID), "request", "t")
        entries = study_index.study_entries(backends.get("local"), s)
        assert sorted(entries) == sorted(f"a/{ds.SOPInstanceUID}" for ds in instances[1:])
        assert f"a/{one.SOPInstanceUID}" in backends.get("local").omap_get(study_index_name(s))  # the tombstone
    finally:
        catalogue.close()
        backends.close()
    counts = rebuild(config, None, None)
    assert counts["instances"] == 2


def test_dicomweb_delete_can_be_turned_off(tmp_path):
    import requests

    from tests.web_harness import WebService

    config = load_config(None, environ={}, overrides={"data_dir": str(tmp_path), "deletion": {"web": False}})
    catalogue = open_catalogue("", tmp_path)
    backends = Backends(config)
    try:
        put(catalogue, backends, study(1), tenant="default", placements=("local",))
        [row] = catalogue.summaries(parse_qido(STUDY, []), None, 10)
        with WebService(config) as web:
            res = requests.delete(f"{web.url}/studies/{row['study_uid']}", timeout=30)
            assert res.status_code == 405
            assert requests.get(f"{web.url}/studies/{row['study_uid']}/metadata", timeout=30).status_code == 200
        assert catalogue.count() == 1
    finally:
        backends.close()
        catalogue.close()


def test_bytes_stored_again_during_a_deletion_are_reported(stores):
    """The store writes an object before its catalogue row: a copy of the same bytes catalogued between the
    deletion's transaction and its object removals finds its object gone, and the deletion says so."""
    from shared.deletion.execute import Outcome, finish

    catalogue, backends = stores
    instances = study(2)
    s = instances[0].StudyInstanceUID
    digests = put(catalogue, backends, instances, tenant="a", placements=("local",))
    rows, held = catalogue.delete_instances("a", s)  # the deletion's transaction...
    put(catalogue, backends, instances[:1], tenant="b", placements=("local",))  # ...then b stores the same bytes
    out = finish(catalogue, backends, Outcome(Target("a", s), rows=rows), held, "request", "t")
    raced = digests[instances[0].SOPInstanceUID]
    assert out.failed == [f"local/{raced}: removed while an instance with the same bytes was being stored; "
                          "send it again"]
    assert catalogue.holders(digests.values()) == {raced: {"local"}}
