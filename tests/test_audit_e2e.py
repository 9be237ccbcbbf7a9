"""The audit trail as a user sees it: `dicomflow run` (both DICOM engines) audits what real dcmtk peers and
HTTP clients do, and `dicomflow audit` lists and filters it."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from shared.tenancy import api_key_hash
from tests.helpers import wait_for
from tests.test_audit_message import _validate
from tests.test_cfind import findscu
from tests.test_retrieve_dimse import getscu

KEY = "audit-admin-key-0123456789"


@pytest.fixture(params=["lean", "pynetdicom"])
def stack(request, stack_factory):
    return stack_factory(
        ingest={"engine": request.param, "allowed_calling_aes": ["MODALITY", "FINDSCU", "GETSCU"]},
        web={"port": free_port()},
        access={"anonymous_tenant": None, "admin_api_keys_sha256": [api_key_hash(KEY)]},
        audit={"source_id": "dicomflow@test"})


def audit(stack, *args: str) -> list[dict]:
    return json.loads(stack.cli("audit", "--json", *args).stdout)


def _http(url: str, key: str) -> int:
    req = urllib.request.Request(url, headers={"X-API-Key": key, "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_what_peers_do_is_audited_and_listed(stack, tmp_path):
    folder = tmp_path / "send"
    study_1, _ = write_study(folder, 3)
    study_2, _ = write_study(folder, 2)
    assert stack.storescu(folder, calling_ae="MODALITY").returncode == 0  # one association, two studies
    echo = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", stack.ae_title, "127.0.0.1", str(stack.port)],
                          capture_output=True, text=True, timeout=60)
    assert echo.returncode != 0  # refused at association: calling AE not recognised
    wait_for(lambda: len(json.loads(stack.cli("studies", "--json").stdout)) == 2, 60, what="two studies catalogued")

    findscu(stack.port, "-S", "FINDSCU", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], tmp_path / "find")
    got = getscu(stack, "GETSCU", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_1}"], tmp_path / "get")
    assert got.returncode == 0, got.stderr
    web = f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web"
    assert _http(f"{web}/studies?PatientID=*", KEY) == 200
    assert _http(f"{web}/studies?PatientID=*", "not-a-key") == 401
    req = urllib.request.Request(f"{web}/studies/{study_2}", headers={
        "X-API-Key": KEY, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200 and resp.read()
    stack.cli("export", "--study", study_1, "--out", str(tmp_path / "export"))
    study_3, files_3 = write_study(tmp_path / "stow", 2)
    DICOMwebClient(web, headers={"X-API-Key": KEY}).store_instances([dcmread(f) for f in files_3])

    kinds = {"association", "authentication", "query", "retrieve", "retrieved", "export", "application-start"}
    wait_for(lambda: kinds <= {r["kind"] for r in audit(stack)}, 30, what=f"records of {sorted(kinds)}")
    records = audit(stack)
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    assert all(r["source_id"] == "dicomflow@test" for r in records)

    # every service started with one configuration: one digest
    starts = by_kind["application-start"]
    assert {"ingest", "store", "web"} <= {r["detail"]["service"] for r in starts}
    assert len({r["detail"]["configuration_sha256"] for r in starts}) == 1

    # the association: one record, both studies with their counts, the modality as the requesting source
    assoc, stow = sorted(by_kind["association"], key=lambda r: r["detail"]["via"])
    assert assoc["outcome"] == "success" and assoc["action"] == "C" and assoc["detail"]["via"] == "DIMSE"
    assert {s["study_uid"]: sum(s["sop_classes"].values()) for s in assoc["studies"]} == {study_1: 3, study_2: 2}
    source = next(p for p in assoc["participants"] if p["requestor"])
    assert (source["user_id"], source["host"], source["role"]) == ("MODALITY", "127.0.0.1", "source")
    assert assoc["started_at"] <= assoc["event_time"]
    # a STOW-RS request is recorded the same way, its caller the API key's principal
    assert stow["detail"]["via"] == "STOW-RS" and stow["participants"][0]["user_id"] == "apikey:admin"
    assert [(s["study_uid"], sum(s["sop_classes"].values())) for s in stow["studies"]] == [(study_3, 2)]

    # refused peers: the AE at association, the HTTP caller without a valid key
    refused = {r["detail"]["protocol"]: r for r in by_kind["authentication"]}
    assert refused["DICOM"]["participants"][0]["user_id"] == "INTRUDER"
    assert "calling AE title not recognised" in refused["DICOM"]["outcome_description"]
    assert refused["HTTP"]["outcome_description"] == "unknown API key"
    assert all(r["outcome"] == "minor-failure" for r in by_kind["authentication"])

    queries = {r["query"]["sop_class_uid"]: r for r in by_kind["query"]}
    assert "1.2.840.10008.5.1.4.1.2.2.1" in queries  # Study Root C-FIND, by FINDSCU
    assert queries["1.2.840.10008.5.1.4.1.2.2.1"]["participants"][0]["user_id"] == "FINDSCU"
    assert "PatientID=*" in queries["QIDO-RS STUDY"]["query"]["query"]

    retrieves = {r["detail"]["via"]: r for r in by_kind["retrieve"]}
    assert retrieves["C-GET"]["studies"][0]["study_uid"] == study_1 and retrieves["C-GET"]["detail"]["instances"] == "3"
    assert retrieves["WADO-RS"]["studies"][0]["study_uid"] == study_2
    # the C-GET's end: every sub-operation delivered its instance to the requestor
    (got_all,) = by_kind["retrieved"]
    assert (got_all["action"], got_all["outcome"], got_all["detail"]["delivered"]) == ("R", "success", "3")
    assert got_all["studies"][0]["study_uid"] == study_1
    assert by_kind["export"][0]["detail"]["written"] == "3" and by_kind["export"][0]["outcome"] == "success"

    # the filters
    assert [r["detail"]["via"] for r in audit(stack, "--event", "association")] == ["DIMSE", "STOW-RS"]
    assert {r["kind"] for r in audit(stack, "--study", study_2)} == {"association", "retrieve"}
    assert {r["kind"] for r in audit(stack, "--study", study_1)} >= {"association", "retrieve", "retrieved"}
    assert [r["kind"] for r in audit(stack, "--user", "INTRUDER")] == ["authentication"]
    assert {r["kind"] for r in audit(stack, "--outcome", "minor-failure")} == {"authentication"}
    assert len(audit(stack, "--limit", "2")) == 2 and audit(stack, "--limit", "1")[0] == records[-1]
    assert len(audit(stack, "--since", "1h")) == len(records)
    assert audit(stack, "--since", "2999-01-01T00:00Z") == []
    text = stack.cli("audit", "--user", "MODALITY").stdout
    assert "association" in text and "MODALITY@127.0.0.1*" in text and "2 studies, 5 inst" in text
    assert len(text.splitlines()) == 1
    bad = stack.cli("audit", "--since", "last tuesday", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr
    # the DICOM audit messages themselves, valid against the PS3.15 schema
    assert shutil.which("xmllint")
    xml = stack.cli("audit", "--xml", "--event", "association", "--user", "MODALITY").stdout.strip()
    _validate(xml.encode(), tmp_path, "cli")
