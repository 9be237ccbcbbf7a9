"""Sent with storescu, found seconds later: QIDO-RS (dicomweb-client), the CLI, tenants kept apart end to end."""

from __future__ import annotations

import json

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from shared.tenancy import api_key_hash
from tests.helpers import wait_for

KEY_A, KEY_B = "hospital-a-key-123456", "clinic-b-key-654321"


@pytest.fixture
def stack(stack_factory):
    return stack_factory(
        web={"port": free_port()},
        access={"default_tenant": None, "anonymous_tenant": None,
                "tenants": {"a": {"aes": ["CT_A"], "api_keys_sha256": [api_key_hash(KEY_A)]},
                            "b": {"aes": ["CT_B"], "api_keys_sha256": [api_key_hash(KEY_B)]}}})


def studies(stack, *args: str) -> list[dict]:
    return json.loads(stack.cli("studies", "--json", *args).stdout)


def test_storescu_then_qido_cli_and_tenants(stack, tmp_path):
    web = f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web"
    study_a, files_a = write_study(tmp_path / "a", 4, series=2)
    for path in files_a:  # a name in ISO_IR 100 (latin-1 bytes on the wire)
        ds = dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
        ds.save_as(path)
    assert stack.storescu(tmp_path / "a", calling_ae="CT_A").returncode == 0
    study_b, _ = write_study(tmp_path / "b", 2)
    assert stack.storescu(tmp_path / "b", calling_ae="CT_B").returncode == 0
    # the same UIDs (and bytes) from the other tenant: a second study of b's, never a's
    assert stack.storescu(tmp_path / "a", calling_ae="CT_B").returncode == 0
    unknown = stack.storescu(tmp_path / "b", calling_ae="NOBODY")  # no default tenant: refused at association
    assert unknown.returncode != 0

    wait_for(lambda: sum(s["instances"] for s in studies(stack)) == 10, 60, what="10 instances catalogued")
    a = DICOMwebClient(web, headers={"X-API-Key": KEY_A})
    [found] = a.search_for_studies(search_filters={"PatientName": "müller*"})
    assert found["0020000D"]["Value"] == [study_a]
    assert found["00201206"]["Value"] == [2] and found["00201208"]["Value"] == [4]
    assert found["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jürgen"
    assert [s["0020000D"]["Value"][0] for s in a.search_for_studies()] == [study_a]  # nothing of b's
    meta = a.retrieve_study_metadata(study_a)
    assert len(meta) == 4 and all("7FE00010" in m and "BulkDataURI" in m["7FE00010"] for m in meta)

    # and the study back over WADO-RS, byte-identical to what storescu sent
    from tests.helpers import dataset_bytes
    from tests.test_dicomweb_wado import data_set_of
    sent = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(f) for f in files_a}
    got = a.retrieve_study(study_a)
    assert {ds.SOPInstanceUID: data_set_of(ds) for ds in got} == sent

    b = DICOMwebClient(web, headers={"X-API-Key": KEY_B})
    assert sorted(s["0020000D"]["Value"][0] for s in b.search_for_studies()) == sorted([study_a, study_b])
    assert a.search_for_studies(search_filters={"StudyInstanceUID": study_b}) == []

    # C-FIND on the same AE as storage: each tenant's AE finds its own
    from tests.test_cfind import findscu
    found = findscu(stack.port, "-S", "CT_A", ["SpecificCharacterSet=ISO_IR 192", "QueryRetrieveLevel=STUDY",
                                               "PatientName=Müller*", "StudyInstanceUID",
                                               "NumberOfStudyRelatedInstances"], tmp_path / "find-a")
    assert [(ds.StudyInstanceUID, ds.NumberOfStudyRelatedInstances) for ds in found] == [(study_a, 4)]
    found_b = findscu(stack.port, "-S", "CT_B", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], tmp_path / "find-b")
    assert sorted(ds.StudyInstanceUID for ds in found_b) == sorted([study_a, study_b])

    # the CLI: filters, tenants, one study
    assert [s["study_uid"] for s in studies(stack, "--tenant", "a")] == [study_a]
    assert {s["tenant"] for s in studies(stack, "--patient", "Müller*")} == {"a", "b"}
    assert studies(stack, "--modality", "MR") == []
    assert len(studies(stack, "--date", "20261101-20261130", "--tenant", "b")) == 2
    bad = stack.cli("studies", "--date", "last week", check=False)
    assert bad.returncode == 2 and "neither a date" in bad.stderr
    one = json.loads(stack.cli("study", study_a, "--tenant", "a", "--json").stdout)
    assert one["studies"][0]["instances"] == 4 and len(one["series"]) == 2 and one["placements"] == ["local"]
    missing = stack.cli("study", study_b, "--tenant", "a", check=False)
    assert missing.returncode == 1 and "not stored" in missing.stderr
