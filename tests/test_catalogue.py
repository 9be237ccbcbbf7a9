"""The catalogue on both backends (a real SQLite file, a real PostgreSQL server): recording, tenants, matching."""

from __future__ import annotations

import threading
from itertools import count

import pytest
from pydicom.dataset import Dataset

from dicomflow.synthetic import ct_instance, new_uid
from shared.catalogue.entry import InstanceFacts, entry_from_model
from shared.catalogue.open import open_catalogue
from shared.catalogue.query import INSTANCE, PATIENT, SERIES, STUDY, QueryError, parse_qido
from shared.dicom.json_model import json_model
from tests.helpers import encode

_db = count()
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue(request, tmp_path):
    if request.param == "sqlite":
        cat = open_catalogue("", tmp_path)
    else:
        cat = open_catalogue(request.getfixturevalue("pg_cluster").new_database(f"t{next(_db)}"), tmp_path)
    yield cat
    cat.close()


def entry(ds: Dataset, tenant: str = "a", digest: str | None = None):
    raw = encode(ds)
    facts = InstanceFacts(tenant=tenant, transfer_syntax_uid=EXPLICIT, digest=digest or f"d-{ds.SOPInstanceUID}",
                          size=len(raw), policy="default", placements=("local",), calling_ae="MOD",
                          received_at="2026-12-02T10:00:00+00:00", stored_at="2026-12-02T10:00:01+00:00")
    return entry_from_model(json_model(raw, EXPLICIT), facts)


def study(n: int = 3, series: int = 1, study_uid: str | None = None, **attrs) -> list[Dataset]:
    study_uid = study_uid or new_uid()
    series_uids = [new_uid() for _ in range(series)]
    out = []
    for i in range(n):
        ds = ct_instance(study_uid, series_uids[i % series], i + 1, rows=8, cols=8)
        ds.SeriesNumber = i % series + 1
        for key, value in attrs.items():
            setattr(ds, key, value)
        out.append(ds)
    return out


def q(level, **params):
    return parse_qido(level, list(params.items()))


def value(obj: dict, tag: str):
    return obj[tag]["Value"][0]


def test_record_is_idempotent_and_replaces_on_new_digest(catalogue):
    instances = study(3, series=2)
    first = catalogue.record_batch([entry(ds) for ds in instances])
    assert [r.outcome for r in first] == ["new"] * 3
    again = catalogue.record_batch([entry(ds) for ds in instances])  # a redelivered batch
    assert [r.outcome for r in again] == ["same"] * 3
    replaced = catalogue.record_batch([entry(instances[0], digest="other")])
    assert replaced[0].outcome == "replaced" and replaced[0].replaced_digest == f"d-{instances[0].SOPInstanceUID}"
    [found] = catalogue.search(q(STUDY), "a", 100)
    assert value(found, "00201206") == 2 and value(found, "00201208") == 3  # series, instances
    assert found["00080061"]["Value"] == ["CT"]
    assert catalogue.count() == 3


def test_tenants_with_the_same_uids_are_kept_apart(catalogue):
    shared_study = study(2, PatientName="Alpha^Ann")
    catalogue.record_batch([entry(ds, "a") for ds in shared_study])
    # tenant b sends the same UIDs with other content: a second study, never a replacement of a's
    for ds in shared_study:
        ds.PatientName = "Beta^Bob"
    catalogue.record_batch([entry(ds, "b", digest="b-" + ds.SOPInstanceUID) for ds in shared_study])
    [mine] = catalogue.search(q(STUDY), "a", 100)
    assert value(mine, "00100010") == {"Alphabetic": "Alpha^Ann"}
    assert catalogue.search(q(STUDY, PatientName="Beta*"), "a", 100) == []
    uid = shared_study[0].StudyInstanceUID
    assert len(catalogue.search(q(STUDY, StudyInstanceUID=uid), "b", 100)) == 1
    assert catalogue.search(q(STUDY, StudyInstanceUID=uid), "c", 100) == []  # no leak of existence
    assert len(catalogue.search(q(STUDY), None, 100)) == 2  # an administrator sees both
    assert len(catalogue.metadata("a", uid)) == 2 and catalogue.metadata("c", uid) is None


def test_study_matching(catalogue):
    s1 = study(2, PatientName="Müller^Jürgen", StudyDate="20260110", AccessionNumber="ACC1", PatientID="P1")
    s2 = study(1, PatientName="Mueller^Hans", StudyDate="20260220", AccessionNumber="ACC2", PatientID="P2")
    s3 = study(1, PatientName="Smith^John", StudyDate="20250101", AccessionNumber="XY9", PatientID="P3")
    s3[0].Modality = "MR"
    s1[0].SpecificCharacterSet = s1[1].SpecificCharacterSet = "ISO_IR 100"  # latin-1 bytes on the wire
    catalogue.record_batch([entry(ds) for ds in s1 + s2 + s3])

    def uids(**params):
        return [value(r, "0020000D") for r in catalogue.search(q(STUDY, **params), "a", 100)]
    u1, u2, u3 = s1[0].StudyInstanceUID, s2[0].StudyInstanceUID, s3[0].StudyInstanceUID
    assert uids(PatientName="müller^jürgen") == [u1]  # PN: case-insensitive, non-ASCII as text
    assert sorted(uids(PatientName="M*")) == sorted([u1, u2])
    assert uids(PatientName="Mu?ller*") == [u2]
    assert uids(StudyDate="20260101-20260131") == [u1]
    assert sorted(uids(StudyDate="20260101-")) == sorted([u1, u2])
    assert uids(StudyDate="-20251231") == [u3]
    assert uids(ModalitiesInStudy="MR") == [u3]
    assert sorted(uids(ModalitiesInStudy="CT\\MR")) == sorted([u1, u2, u3])
    assert uids(AccessionNumber="ACC2") == [u2]
    assert uids(AccessionNumber="acc2") == []  # other text: case-sensitive
    assert sorted(uids(StudyInstanceUID=f"{u1},{u3}")) == sorted([u1, u3])
    assert uids(PatientID="P%") == []  # SQL wildcards are literal text
    assert uids(PatientName="jürg", fuzzymatching="true") == [u1]  # word prefix, any word
    assert sorted(uids(PatientName="m", fuzzymatching="true")) == sorted([u1, u2])
    assert uids(PatientName="hans mue", fuzzymatching="true") == [u2]  # every word, in any order
    assert uids() == [u2, u1, u3]  # newest study date first
    assert uids(limit="1", offset="1") == [u1]
    assert uids(offset="5") == []


def test_returned_attributes(catalogue):
    instances = study(2, StudyDescription="Head", PatientName="Doe^Jane")
    catalogue.record_batch([entry(ds) for ds in instances])
    [plain] = catalogue.search(q(STUDY), "a", 100, base_url="http://x/dicom-web")
    assert "00081030" not in plain  # StudyDescription is not a default study attribute
    assert value(plain, "00081190") == f"http://x/dicom-web/studies/{instances[0].StudyInstanceUID}"
    [asked] = catalogue.search(q(STUDY, includefield="00081030,00080060"), "a", 100)
    assert value(asked, "00081030") == "Head"
    [everything] = catalogue.search(q(STUDY, includefield="all"), "a", 100)
    assert value(everything, "00080080") == "General Hospital" and value(everything, "00100020") == "PAT001"
    series = catalogue.search(q(SERIES), "a", 100)
    assert value(series[0], "00201209") == 2 and value(series[0], "00080060") == "CT"
    assert value(series[0], "00100010") == {"Alphabetic": "Doe^Jane"}  # all-studies search: study defaults too
    inst = catalogue.search(parse_qido(INSTANCE, [], study_uid=instances[0].StudyInstanceUID), "a", 100)
    assert [value(i, "00200013") for i in inst] == [1, 2] and value(inst[0], "00280010") == 8
    full = catalogue.search(parse_qido(INSTANCE, [("includefield", "00280004")]), "a", 100)
    assert value(full[0], "00280004") == "MONOCHROME2"  # from the instance's kept JSON


def test_patient_level(catalogue):
    catalogue.record_batch([entry(ds) for ds in study(2, PatientID="P1") + study(3, PatientID="P1")])
    catalogue.record_batch([entry(ds) for ds in study(1, PatientID="P2")])
    patients = catalogue.search(q(PATIENT, PatientID="P1"), "a", 100)
    assert len(patients) == 1
    assert value(patients[0], "00201200") == 2 and value(patients[0], "00201204") == 5


def test_metadata_in_instance_order_without_bulk(catalogue):
    instances = study(4, series=2)
    catalogue.record_batch([entry(ds) for ds in reversed(instances)])
    rows = catalogue.metadata("a", instances[0].StudyInstanceUID, instances[0].SeriesInstanceUID)
    assert [r[1] for r in rows] == [instances[0].SOPInstanceUID, instances[2].SOPInstanceUID]
    assert '"7FE00010":{"vr":"OW","BulkDataURI":"bulkdata/7FE00010"}' in rows[0][4]


@pytest.mark.parametrize("params, reason", [
    ({"StudyDate": "2026-01-01"}, "neither a date YYYYMMDD nor a range"),
    ({"StudyDate": "20260201-20260101"}, "ends before it starts"),
    ({"Bogus": "1"}, "neither a DICOM keyword nor a tag"),
    ({"PatientWeight": "70"}, "not a matching key"),
    ({"limit": "-1"}, "not a non-negative integer"),
    ({"offset": "x"}, "not a non-negative integer"),
    ({"fuzzymatching": "yes"}, "neither true nor false"),
    ({"includefield": "NoSuchThing"}, "neither a DICOM keyword nor a tag"),
    ({"StudyInstanceUID": "1.2.*"}, "not a UID"),
    ({"00081032.00080100": "X"}, "inside sequences"),
])
def test_malformed_queries_say_why(params, reason):
    with pytest.raises(QueryError, match=reason):
        parse_qido(STUDY, list(params.items()))


def test_concurrent_writers_of_one_study_lose_no_count(catalogue):
    """Two store replicas writing batches of the same study at once (as during a rebalance)."""
    instances = study(60, series=3)
    halves = [instances[0::2], instances[1::2]]
    errors = []

    def write(part):
        try:
            for i in range(0, len(part), 5):
                catalogue.record_batch([entry(ds) for ds in part[i: i + 5]])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    [found] = catalogue.search(q(STUDY), "a", 100)
    assert value(found, "00201208") == 60 and value(found, "00201206") == 3
    assert sum(value(s, "00201209") for s in catalogue.search(q(SERIES), "a", 100)) == 60


def test_prefix_matching_uses_an_index_outside_the_c_collation(pg_cluster, tmp_path):
    """PostgreSQL created in en_US.UTF-8 (most installations, unlike the tests' C cluster): PatientName=smi*
    and AccessionNumber=A12* are index range scans (text_pattern_ops), not a scan of every study; a catalogue
    created with the plain indexes has them replaced when it is opened."""
    import psycopg

    from shared.catalogue.sql import SCHEMA, plan, prefix_indexes

    name = f"collation{next(_db)}"
    with psycopg.connect(pg_cluster.dsn, autocommit=True) as conn:
        try:
            conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LC_COLLATE 'en_US.utf8'"
                         " LC_CTYPE 'en_US.utf8'")
        except psycopg.errors.InvalidParameterValue as exc:
            pytest.skip(f"the en_US.utf8 locale is not installed: {exc}")
    dsn = pg_cluster.dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(dsn, autocommit=True) as conn:  # a catalogue from before the pattern indexes
        for statement in [*SCHEMA, *prefix_indexes()]:
            conn.execute(statement)
    cat = open_catalogue(dsn, tmp_path)
    try:
        cat.record_batch([entry(ds) for ds in study(2, PatientName="Smith^Jane", AccessionNumber="A1234")]
                         + [entry(ds) for ds in study(2, PatientName="Jones^Tom", AccessionNumber="B1")])
        [found] = cat.search(q(STUDY, PatientName="smi*"), "a", 10)
        assert value(found, "00100010") == {"Alphabetic": "Smith^Jane"}
        assert [value(s, "00080050") for s in cat.search(q(STUDY, AccessionNumber="A12*"), "a", 10)] == ["A1234"]
        with psycopg.connect(dsn, autocommit=True) as conn:
            indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'studies'")}
            assert {"studies_by_patient_name_sorted_pattern", "studies_by_accession_sorted_pattern"} <= indexes
            assert not {"studies_by_patient_name_sorted", "studies_by_accession_sorted"} & indexes
            # enough studies of the tenant that only the prefix makes a scan selective
            conn.execute("INSERT INTO studies (tenant, study_uid, patient_name, accession_number, attrs, updated_at)"
                         " SELECT 'a', 'filler.' || g, 'filler^' || g, 'F' || g, '{}', '' FROM generate_series(1, 20000) g")
            conn.execute("ANALYZE studies")
            for params, bound in (({"PatientName": "smi*"}, "patient_name ~>=~ 'smi'"),
                                  ({"AccessionNumber": "A12*"}, "accession_number ~>=~ 'A12'")):
                statement, args = plan(q(STUDY, **params), "a", 10)
                shown = "\n".join(r[0] for r in conn.execute("EXPLAIN " + statement.replace("?", "%s"), args))
                assert bound in shown, shown  # the prefix bounds the index scan, not a filter over the tenant
    finally:
        cat.close()


def test_a_study_page_is_chosen_from_a_covering_index_on_sqlite(tmp_path):
    """SQLite picks the page of a name, ID, accession or date search from the index alone (the index holds the
    sort key), so only the page's rows, with their attributes, are read: the plan says COVERING INDEX."""
    import sqlite3

    from shared.catalogue.sql import plan

    cat = open_catalogue("", tmp_path)
    cat.record_batch([entry(ds) for ds in study(2, PatientName="Smith^Jane")])
    cat.close()
    conn = sqlite3.connect(tmp_path / "catalogue.sqlite")
    conn.execute("PRAGMA case_sensitive_like=ON")
    for params, index in (({"PatientName": "smi*"}, "studies_by_patient_name_sorted"),
                          ({"PatientID": "P1*"}, "studies_by_patient_id_sorted"),
                          ({"AccessionNumber": "A1*"}, "studies_by_accession_sorted"),
                          ({"StudyDate": "20200101-20201231"}, "studies_by_date_sorted")):
        statement, args = plan(q(STUDY, **params), "a", 101)
        shown = " | ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + statement, args))
        assert f"COVERING INDEX {index}" in shown, shown
    conn.close()
