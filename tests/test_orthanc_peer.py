"""Orthanc 1.10 as a real peer of dicomflow: its C-FIND and C-MOVE (what an Orthanc user clicks), its DICOMweb
client pulling a study over QIDO/WADO-RS and pushing one over STOW-RS; byte-identical data sets each way, and
another tenant's credentials seeing nothing."""

from __future__ import annotations

from pydicom import dcmread

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from shared.tenancy import api_key_hash
from tests.helpers import dataset_bytes, wait_for
from tests.orthanc_harness import Orthanc

KEY_A, KEY_B = "orthanc-peer-key-a-1234", "orthanc-peer-key-b-4321"


def test_orthanc_finds_moves_pulls_and_pushes(stack_factory, tmp_path):
    orthanc_dicom = free_port()
    web_port = free_port()
    stack = stack_factory(
        web={"port": web_port},
        ingest={"move_destinations": {"ORTHANC": {"host": "127.0.0.1", "port": orthanc_dicom}}},
        access={"default_tenant": None, "anonymous_tenant": None,
                "tenants": {"a": {"aes": ["CT_A", "ORTHANC"], "api_keys_sha256": [api_key_hash(KEY_A)]},
                            "b": {"aes": ["CT_B"], "api_keys_sha256": [api_key_hash(KEY_B)]}}})
    study_uid, files = write_study(tmp_path / "sent", 4, series=2)
    assert stack.storescu(tmp_path / "sent", calling_ae="CT_A").returncode == 0
    wait_for(lambda: stack.instances_of(study_uid) == 4, 60, what="4 instances catalogued")
    sent = {dcmread(f).SOPInstanceUID: dataset_bytes(f) for f in files}
    base = f"http://127.0.0.1:{web_port}/dicom-web/"
    peer = Orthanc(tmp_path / "orthanc",
                   modalities={"dicomflow": ["DICOMFLOW", "127.0.0.1", stack.port]},
                   dicomweb_servers={"dicomflow": {"Url": base, "HttpHeaders": {"X-API-Key": KEY_A}},
                                     "other": {"Url": base, "HttpHeaders": {"X-API-Key": KEY_B}}},
                   dicom_port=orthanc_dicom)  # the port dicomflow's move destination names
    with peer:
        # C-FIND then C-MOVE, as Orthanc Explorer's "query/retrieve" does
        query = peer.post("/modalities/dicomflow/query", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        answers = peer.get(f"/queries/{query['ID']}/answers?expand")
        assert [a["0020,000d"]["Value"] for a in answers] == [study_uid], answers
        peer.post(f"/queries/{query['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
        assert peer.instances() == sent, peer.log()
        peer.delete_all()

        # its DICOMweb client: QIDO, then a WADO-RS retrieve of the study into Orthanc
        found = peer.post("/dicom-web/servers/dicomflow/get", {"Uri": "/studies"})
        assert [s["0020000D"]["Value"][0] for s in found] == [study_uid], found
        assert peer.post("/dicom-web/servers/other/get", {"Uri": "/studies"}) == []  # tenant b sees nothing
        peer.post("/dicom-web/servers/dicomflow/retrieve", {"Resources": [{"Study": study_uid}]})
        assert peer.instances() == sent, peer.log()
        peer.delete_all()

        # and STOW-RS from Orthanc into dicomflow: a study uploaded into Orthanc, pushed, stored byte-identical
        pushed_uid, pushed_files = write_study(tmp_path / "pushed", 3)
        for f in pushed_files:
            peer.post("/instances", f.read_bytes())
        [orthanc_study] = peer.get("/studies")
        peer.post("/dicom-web/servers/dicomflow/stow", {"Resources": [orthanc_study], "Synchronous": True})
        wait_for(lambda: stack.instances_of(pushed_uid) == 3, 60, what="the pushed study catalogued")
        [row] = [s for s in stack.studies() if s["study_uid"] == pushed_uid]
        assert row["tenant"] == "a"  # the tenant of the key Orthanc's server entry sends
        peer.delete_all()
        peer.post("/dicom-web/servers/dicomflow/retrieve", {"Resources": [{"Study": pushed_uid}]})
        assert peer.instances() == {dcmread(f).SOPInstanceUID: dataset_bytes(f) for f in pushed_files}
