"""C-FIND on the one DICOM AE (Patient and Study Root), both engines, over a real catalogue: dcmtk findscu and
pynetdicom as two independent SCUs; tenants, non-ASCII names, failures named by their status, C-CANCEL."""

from __future__ import annotations

import subprocess
import time
from itertools import count
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PatientRootFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyRootFind

from dicomflow.natsserver import free_port
from services.ingest.find import Finder
from services.ingest.intake import Intake
from services.ingest.scp import start_scp
from services.ingest.scp_pynetdicom import start_scp as start_pynetdicom
from shared.catalogue.find import PENDING
from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.storage.objectstore import Backends
from tests.test_catalogue import entry, study

_db = count()


class _NoStores:
    """The intake's publisher: these tests send no C-STORE."""

    def publish(self, event, msg_id=None):
        raise AssertionError("no instance is stored in the C-FIND tests")


@pytest.fixture(params=[("lean", "sqlite"), ("lean", "postgresql"), ("pynetdicom", "sqlite")],
                ids=lambda p: "-".join(p))
def scp(request, tmp_path):
    engine, backend = request.param
    url = "" if backend == "sqlite" else request.getfixturevalue("pg_cluster").new_database(f"f{next(_db)}")
    cfg = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path), "catalogue": {"url": url},
        "access": {"default_tenant": None, "tenants": {"a": {"aes": ["FIND_A"]}, "b": {"aes": ["FIND_B"]}}}})
    catalogue = open_catalogue(url, tmp_path)
    backends = Backends(cfg)
    intake = Intake(backends.get("local"), _NoStores(), cfg.ingest.max_instance_bytes)
    finder = Finder(lambda: catalogue, cfg.access, "DICOMFLOW", 1000)
    port = free_port()
    args = (intake, "127.0.0.1", port, "DICOMFLOW", 16384, 4, 30, ["FIND_A", "FIND_B"])
    server = start_pynetdicom(*args, finder=finder) if engine == "pynetdicom" else start_scp(*args, finder=finder)
    yield port, catalogue, engine
    server.stop(5)
    finder.close()
    catalogue.close()
    backends.close()


def findscu(port: int, model: str, calling: str, keys: list[str], out: Path) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["findscu", model, "-aet", calling, "-aec", "DICOMFLOW", "-X", "-od", str(out),
                          "127.0.0.1", str(port), *[a for k in keys for a in ("-k", k)]],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr + res.stdout
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def pyfind(port: int, calling: str, identifier: Dataset, model=StudyRootFind) -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW")
    assert assoc.is_established
    try:
        return [(status.Status, ds) for status, ds in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def test_study_root_with_findscu_at_every_level_and_tenants(scp, tmp_path):
    port, catalogue, _ = scp
    mine = study(3, series=2, PatientName="Doe^Jane", PatientID="P1", StudyDate="20260110")
    theirs = study(2, PatientName="Doe^John", PatientID="P2")
    catalogue.record_batch([entry(ds, "a") for ds in mine] + [entry(ds, "b") for ds in theirs])
    uid = mine[0].StudyInstanceUID
    found = findscu(port, "-S", "FIND_A", ["QueryRetrieveLevel=STUDY", "PatientName=Doe*", "StudyInstanceUID",
                                           "NumberOfStudyRelatedInstances", "StudyDate=20260101-20260131",
                                           "ModalitiesInStudy"], tmp_path / "studies")
    assert [ds.StudyInstanceUID for ds in found] == [uid]  # b's Doe^John never
    assert found[0].NumberOfStudyRelatedInstances == 3 and found[0].ModalitiesInStudy == "CT"
    assert found[0].QueryRetrieveLevel == "STUDY" and found[0].RetrieveAETitle == "DICOMFLOW"
    series = findscu(port, "-S", "FIND_A", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={uid}",
                                            "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"],
                     tmp_path / "series")
    assert sorted(ds.NumberOfSeriesRelatedInstances for ds in series) == [1, 2]
    images = findscu(port, "-S", "FIND_A", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={uid}",
                                            f"SeriesInstanceUID={mine[0].SeriesInstanceUID}", "SOPInstanceUID",
                                            "InstanceNumber"], tmp_path / "images")
    assert [ds.InstanceNumber for ds in images] == [1, 3]
    assert findscu(port, "-S", "FIND_B", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"],
                   tmp_path / "b") == []  # no existence leak


def test_patient_root_with_findscu(scp, tmp_path):
    port, catalogue, _ = scp
    catalogue.record_batch([entry(ds, "a") for ds in study(2, PatientID="P1", PatientName="Roe^Ann")
                            + study(1, PatientID="P1", PatientName="Roe^Ann")])
    [patient] = findscu(port, "-P", "FIND_A", ["QueryRetrieveLevel=PATIENT", "PatientID=P1", "PatientName",
                                               "NumberOfPatientRelatedStudies"], tmp_path / "p")
    assert patient.PatientName == "Roe^Ann" and patient.NumberOfPatientRelatedStudies == 2
    studies = findscu(port, "-P", "FIND_A", ["QueryRetrieveLevel=STUDY", "PatientID=P1", "StudyInstanceUID"],
                      tmp_path / "s")
    assert len(studies) == 2


def test_non_ascii_name_failures_and_cancel_with_pynetdicom(scp):
    port, catalogue, _ = scp
    catalogue.record_batch([entry(ds, "a") for ds in study(1, PatientName="Müller^Jürgen")])
    q = Dataset()
    q.SpecificCharacterSet = "ISO_IR 100"
    q.QueryRetrieveLevel = "STUDY"
    q.PatientName = "Müller*"
    q.StudyInstanceUID = ""
    [(pending, found), (final, _)] = pyfind(port, "FIND_A", q)
    assert (pending, final) == (0xFF00, 0x0000)
    assert found.SpecificCharacterSet == "ISO_IR 192" and str(found.PatientName) == "Müller^Jürgen"

    bad = Dataset()
    bad.QueryRetrieveLevel = "STUDY"
    bad.StudyDate = "2026-01-01"
    [(status, _)] = pyfind(port, "FIND_A", bad)
    assert 0xC000 <= status <= 0xCFFF  # unable to process, with the reason in the comment
    patient_level = Dataset()
    patient_level.QueryRetrieveLevel = "PATIENT"
    patient_level.PatientID = ""
    [(status, _)] = pyfind(port, "FIND_A", patient_level, StudyRootFind)
    assert status == 0xA900  # PATIENT is no level of the Study Root model
    [(status, _)] = pyfind(port, "FIND_A", patient_level, PatientRootFind)[-1:]
    assert status == 0x0000


class _PacedFinder(Finder):
    """The real finder with 20 ms before each match: a C-CANCEL surely comes while responses are still due,
    so pynetdicom's acceptor (which otherwise queues a small answer whole before reading) sees it."""

    def results(self, identifier, transfer_syntax, sop_class, calling_ae):
        for item in super().results(identifier, transfer_syntax, sop_class, calling_ae):
            if item[0] == PENDING:
                time.sleep(0.02)
            yield item


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_c_cancel_while_matches_are_still_found(engine, tmp_path):
    cancel_mid_find(engine, tmp_path)


def cancel_mid_find(engine: str, tmp_path: Path, tls=None, tls_args=None) -> None:
    """Send a C-CANCEL after the first of 100 slowly found matches of a C-FIND (through TLS with ``tls``, the
    server's context, and ``tls_args``, pynetdicom's client side): the operation ends 0xFE00, the association lives."""
    cfg = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path), "access": {"default_tenant": None, "tenants": {"a": {"aes": ["FIND_A"]}}}})
    catalogue = open_catalogue("", tmp_path)
    catalogue.record_batch([entry(ds, "a") for _ in range(100) for ds in study(1)])
    backends = Backends(cfg)
    intake = Intake(backends.get("local"), _NoStores(), cfg.ingest.max_instance_bytes)
    port = free_port()
    args = (intake, "127.0.0.1", port, "DICOMFLOW", 16384, 4, 30, ["FIND_A"])
    finder = _PacedFinder(lambda: catalogue, cfg.access, "DICOMFLOW", 1000)
    start = start_pynetdicom if engine == "pynetdicom" else start_scp
    server = start(*args, finder=finder, tls=tls)
    ae = AE(ae_title="FIND_A")
    ae.add_requested_context(StudyRootFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW", tls_args=tls_args)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    try:
        assert assoc.is_established
        statuses = []
        for status, _ in assoc.send_c_find(q, StudyRootFind, msg_id=9):
            statuses.append(status.Status)
            if len(statuses) == 1:
                assoc.send_c_cancel(9, query_model=StudyRootFind)
        assert statuses[-1] == 0xFE00 and len(statuses) < 50
        assert assoc.is_established  # a cancel ends the operation, not the association
    finally:
        assoc.release()
        server.stop(5)
        finder.close()
        catalogue.close()
        backends.close()


def _serve(engine: str, tmp_path: Path, finder: Finder, stream_above_bytes: int = 256 * 1024):
    cfg = load_config(None, environ={}, overrides={"data_dir": str(tmp_path)})
    backends = Backends(cfg)
    intake = Intake(backends.get("local"), _NoStores(), cfg.ingest.max_instance_bytes, stream_above_bytes)
    port = free_port()
    args = (intake, "127.0.0.1", port, "DICOMFLOW", 16384, 8, 30, [])
    server = start_pynetdicom(*args, finder=finder) if engine == "pynetdicom" else start_scp(*args, finder=finder)
    return port, server, backends


def _access():
    return load_config(None, environ={}, overrides={"access": {
        "default_tenant": None, "tenants": {"a": {"aes": ["FIND_A"]}}}}).access


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_searches_hold_a_bounded_number_of_database_connections(engine, pg_cluster, tmp_path):
    """One thread per association: searching on it left a PostgreSQL connection open per association that
    ever queried. The finder's own two search threads hold at most two, however many associations query."""
    import psycopg

    dsn = pg_cluster.new_database(f"f{next(_db)}")
    catalogue = open_catalogue(dsn, tmp_path)  # this thread's connection: the schema, then the records
    catalogue.record_batch([entry(ds, "a") for ds in study(1)])
    finder = Finder(lambda: catalogue, _access(), "DICOMFLOW", 100)
    port, server, backends = _serve(engine, tmp_path, finder)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    try:
        for _ in range(8):  # eight associations, one C-FIND each
            assert [s for s, _ in pyfind(port, "FIND_A", q)] == [PENDING, 0]
        with psycopg.connect(dsn) as probe:
            [(others,)] = probe.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                        " AND pid <> pg_backend_pid()").fetchall()
        assert others <= 3, f"{others} connections to the catalogue after 8 associations"  # 1 here + 2 searchers
    finally:
        server.stop(5)
        finder.close()
        catalogue.close()
        backends.close()


def test_identifier_is_held_in_memory_never_staged(tmp_path):
    """A data set on a FIND context never goes to the intake, even one past ingest.stream_above_bytes."""
    catalogue = open_catalogue("", tmp_path)
    catalogue.record_batch([entry(ds, "a") for ds in study(1, PatientID="PX")])
    finder = Finder(lambda: catalogue, _access(), "DICOMFLOW", 100)
    port, server, backends = _serve("lean", tmp_path, finder, stream_above_bytes=1024)
    staged = tmp_path / "objects"
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file() and staged in p.parents)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "PX"
    q.ImageComments = "x" * 8000  # not a catalogue key: returned empty, never a filter
    try:
        [(status, found), (final, _)] = pyfind(port, "FIND_A", q)
        assert (status, final, found.PatientID, found.ImageComments) == (PENDING, 0, "PX", "")
        assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and staged in p.parents) == before
        q.ImageComments = "y" * (1024 * 1024 + 2)
        [(status, _)] = pyfind(port, "FIND_A", q)
        assert status == 0xC000
    finally:
        server.stop(5)
        finder.close()
        catalogue.close()
        backends.close()


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_catalogue_down_answers_c000_and_is_opened_again_later(engine, tmp_path):
    """The catalogue opens at the first C-FIND; while it cannot, each C-FIND fails 0xC000 naming why (the
    association stays up), and the first one after it can is answered."""
    attempts = []
    good = tmp_path / "catalogue.sqlite"
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a catalogue under a file cannot be opened

    def open_it():
        attempts.append(1)
        return open_catalogue(f"sqlite:///{blocked / 'c.sqlite' if len(attempts) == 1 else good}", tmp_path)

    finder = Finder(open_it, _access(), "DICOMFLOW", 100)
    port, server, backends = _serve(engine, tmp_path, finder)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    try:
        assert attempts == []  # nothing opened before the first C-FIND
        ae = AE(ae_title="FIND_A")
        ae.add_requested_context(StudyRootFind)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW")
        try:
            [(status, _)] = list(assoc.send_c_find(q, StudyRootFind))
            assert status.Status == 0xC000 and status.ErrorComment.startswith("catalogue unavailable")
            assert [s.Status for s, _ in assoc.send_c_find(q, StudyRootFind)] == [0]  # opened now: no matches
        finally:
            assoc.release()
        assert len(attempts) == 2
    finally:
        server.stop(5)
        finder.close()
        backends.close()


def test_pynetdicom_engine_under_dicomflow_run_answers_c_find(stack_factory, tmp_path):
    """``dicomflow run`` with ingest.engine pynetdicom: storescu's C-STOREs, then findscu, on the same AE."""
    from dicomflow.synthetic import write_study
    from tests.helpers import wait_for

    stack = stack_factory(ingest={"engine": "pynetdicom"},
                          access={"default_tenant": None, "tenants": {"a": {"aes": ["CT_A"]}, "b": {"aes": ["CT_B"]}}})
    study_a, _ = write_study(tmp_path / "a", 3, series=2)
    assert stack.storescu(tmp_path / "a", calling_ae="CT_A").returncode == 0
    wait_for(lambda: "study_uid" in stack.cli("studies", "--json").stdout, 60, what="the study catalogued")
    [found] = findscu(stack.port, "-S", "CT_A", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                                 "NumberOfStudyRelatedInstances"], tmp_path / "find-a")
    assert (found.StudyInstanceUID, found.NumberOfStudyRelatedInstances, found.RetrieveAETitle) == \
        (study_a, 3, stack.ae_title)
    assert findscu(stack.port, "-S", "CT_B", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], tmp_path / "b") == []
