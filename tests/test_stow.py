"""STOW-RS: stored through the SCP's intake (staged, published, acknowledged), answered per PS3.18, read back
byte-identical over WADO-RS; tenants from credentials; bad requests refused with their status."""

from __future__ import annotations

import io
import uuid

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from dicomflow.natsserver import free_port
from dicomflow.synthetic import ct_instance, new_uid
from services.ingest.stow_response import PartOutcome, stow_answer
from shared.config import load_config
from shared.dicom.part10 import NotPart10, read_file_meta
from shared.dicom.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, STUDY_MISMATCH, SUCCESS
from shared.tenancy import api_key_hash
from tests.helpers import encode, wait_for
from tests.test_catalogue import study
from tests.test_dicomweb_wado import data_set_of
from tests.web_harness import WebService

KEY_A, KEY_B = "stow-key-a-123456", "stow-key-b-654321"
CT = "1.2.840.10008.5.1.4.1.1.2"


def part10_file(ds: pydicom.Dataset, implicit: bool = False) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def multipart(files: list[bytes], part_type: str = "application/dicom", boundary: str = "") -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + f + b"\r\n" for f in files)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(url: str, files: list[bytes], key: str = KEY_A, **kw) -> requests.Response:
    body, content_type = multipart(files, **kw)
    return requests.post(url, data=body, headers={"Content-Type": content_type, "X-API-Key": key,
                                                  "Accept": "application/dicom+json"}, timeout=60)


# --- the pure parts -------------------------------------------------------------------------------------------

def test_file_meta_is_read_from_the_head_of_a_part10_file():
    ds = study(1)[0]
    data = part10_file(ds)
    meta = read_file_meta(data)
    assert (meta.transfer_syntax_uid, meta.sop_class_uid, meta.sop_uid) == ("1.2.840.10008.1.2.1", CT,
                                                                             ds.SOPInstanceUID)
    assert data[meta.data_offset:] == encode(ds)
    assert all(read_file_meta(data[:n]) is None for n in (0, 100, 131, 140, meta.data_offset - 1))
    bare = io.BytesIO()
    pydicom.dcmwrite(bare, ds)  # file meta, no preamble: what dicomweb-client sends
    meta = read_file_meta(bare.getvalue())
    assert meta.sop_uid == ds.SOPInstanceUID and bare.getvalue()[meta.data_offset:] == encode(ds)
    with pytest.raises(NotPart10, match="DICM"):
        read_file_meta(b"\0" * 128 + b"NOPE" + b"\0" * 20)
    with pytest.raises(NotPart10, match="TransferSyntaxUID"):
        read_file_meta(b"\0" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\0\0\x02\0\0\0\0\1" + b"\x08\x00\x05\x00CS\0\0")


def test_answer_status_follows_what_was_stored():
    ok = PartOutcome(SUCCESS, CT, "1.2.3", "1.2", "1.2.9")
    bad = PartOutcome(CANNOT_UNDERSTAND, CT, "1.2.4", reason="x")
    busy = PartOutcome(OUT_OF_RESOURCES, CT, "1.2.5")
    status, body = stow_answer([ok], "http://h/dicom-web")
    assert status == 200 and body["00081190"]["Value"] == ["http://h/dicom-web/studies/1.2"]
    [ref] = body["00081199"]["Value"]
    assert ref["00081155"]["Value"] == ["1.2.3"]
    assert ref["00081190"]["Value"] == ["http://h/dicom-web/studies/1.2/series/1.2.9/instances/1.2.3"]
    status, body = stow_answer([ok, bad], "http://h")
    assert status == 202 and body["00081198"]["Value"][0]["00081197"]["Value"] == [CANNOT_UNDERSTAND]
    assert stow_answer([bad, busy], "http://h")[0] == 409
    assert stow_answer([busy, busy], "http://h")[0] == 503  # all transient: worth sending again
    two_studies = [ok, PartOutcome(SUCCESS, CT, "1.3.1", "1.3", "1.3.2")]
    assert "00081190" not in stow_answer(two_studies, "http://h")[1]


# --- against `dicomflow run` ------------------------------------------------------------------------------------

@pytest.fixture
def stack(stack_factory):
    return stack_factory(
        web={"port": free_port()}, ingest={"stream_above_bytes": 64 * 1024, "max_instance_bytes": 8 * 1024 * 1024},
        access={"default_tenant": None, "anonymous_tenant": None,
                "tenants": {"a": {"api_keys_sha256": [api_key_hash(KEY_A)]},
                            "b": {"api_keys_sha256": [api_key_hash(KEY_B)]}}})


def test_stow_then_wado_byte_identical_and_tenant_confined(stack):
    url = f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web"
    instances = study(3, series=2)
    # 2 MiB of pixels: over stream_above_bytes, streamed to staging
    big = ct_instance(instances[0].StudyInstanceUID, new_uid(), 9, rows=1024, cols=1024)
    instances.append(big)
    a = DICOMwebClient(url, headers={"X-API-Key": KEY_A})
    answer = a.store_instances(instances)
    refs = answer.ReferencedSOPSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(ds.SOPInstanceUID for ds in instances)
    assert answer.RetrieveURL == f"{url}/studies/{instances[0].StudyInstanceUID}"
    assert "FailedSOPSequence" not in answer
    # acknowledged means published: the store catalogues every one of them
    study_uid = instances[0].StudyInstanceUID
    wait_for(lambda: stack.instances_of(study_uid) == 4, 60, what="4 instances catalogued")
    got = {ds.SOPInstanceUID: data_set_of(ds) for ds in a.retrieve_study(study_uid)}
    assert got == {ds.SOPInstanceUID: encode(ds) for ds in instances}
    [row] = [s for s in stack.studies() if s["study_uid"] == study_uid]
    assert row["tenant"] == "a"
    b = DICOMwebClient(url, headers={"X-API-Key": KEY_B})
    assert b.search_for_studies(search_filters={"StudyInstanceUID": study_uid}) == []


def test_stow_refusals_name_their_status_and_store_nothing(stack):
    url = f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web"
    [one, other] = study(1) + study(1)
    target = f"{url}/studies/{one.StudyInstanceUID}"
    # another study's instance posted to /studies/{s}: 409, FailureReason 0xC409; with a good one: 202
    res = post(target, [part10_file(other)])
    assert res.status_code == 409, res.text
    assert res.json()["00081198"]["Value"][0]["00081197"]["Value"] == [STUDY_MISMATCH]
    res = post(target, [part10_file(one), part10_file(other)])
    assert res.status_code == 202, res.text
    body = res.json()
    assert body["00081199"]["Value"][0]["00081155"]["Value"] == [one.SOPInstanceUID]
    assert body["00081198"]["Value"][0]["00081155"]["Value"] == [other.SOPInstanceUID]
    # a part that is not a Part-10 file, a truncated data set, a part of another type
    truncated = part10_file(study(1)[0])[:-5000]
    res = post(f"{url}/studies", [b"not dicom at all" * 20, truncated])
    assert res.status_code == 409
    assert [f["00081197"]["Value"] for f in res.json()["00081198"]["Value"]] == [[CANNOT_UNDERSTAND]] * 2
    assert post(f"{url}/studies", [b"{}"], part_type="application/json").status_code == 409
    # an instance over ingest.max_instance_bytes
    huge = ct_instance(new_uid(), new_uid(), 1, rows=2100, cols=2100)  # about 8.4 MiB of pixels
    res = post(f"{url}/studies", [part10_file(huge)])
    assert res.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC003]
    # the request itself: not multipart/related, another part type, no credentials, no parts, JSON not accepted
    res = requests.post(f"{url}/studies", data=part10_file(one), headers={"Content-Type": "application/dicom",
                                                                         "X-API-Key": KEY_A}, timeout=10)
    assert res.status_code == 415
    res = requests.post(f"{url}/studies", data=b"--x--\r\n", headers={
        "Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=x', "X-API-Key": KEY_A}, timeout=10)
    assert res.status_code == 415 and "application/dicom+xml" in res.text
    body, content_type = multipart([part10_file(one)])
    assert requests.post(f"{url}/studies", data=body, headers={"Content-Type": content_type},
                         timeout=10).status_code == 401
    res = requests.post(f"{url}/studies", data=b"--x--\r\n", headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=x', "X-API-Key": KEY_A}, timeout=10)
    assert res.status_code == 400
    res = requests.post(f"{url}/studies", data=body, headers={"Content-Type": content_type, "X-API-Key": KEY_A,
                                                               "Accept": "application/dicom+xml"}, timeout=10)
    assert res.status_code == 406
    assert requests.post(f"{url}/studies/1.2.3%204", data=body, headers={  # a space: no UID may hold one
        "Content-Type": content_type, "X-API-Key": KEY_A}, timeout=10).status_code == 400
    # a boundary longer than RFC 2046's 70 characters, as Orthanc 1.10 sends: taken
    body, content_type = multipart([part10_file(one)], boundary="b" * 73)
    assert requests.post(target, data=body, headers={"Content-Type": content_type, "X-API-Key": KEY_A},
                         timeout=10).status_code == 200
    # OPTIONS names both mounts' methods on the one path
    assert set(requests.options(f"{url}/studies", timeout=10).headers["Allow"].split(", ")) == {"GET", "POST",
                                                                                                "OPTIONS"}
    # of all that, only `one` was stored
    wait_for(lambda: stack.instances_of(one.StudyInstanceUID) == 1, 30, what="the one good instance")
    assert stack.instances_of(other.StudyInstanceUID) == 0
    assert sum(s["instances"] for s in stack.studies()) == 1


def test_stow_without_nats_is_503_and_reads_still_work(tmp_path):
    config = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path), "nats": {"url": f"nats://127.0.0.1:{free_port()}", "connect_timeout_s": 1},
        "access": {"anonymous_tenant": "a"}})
    with WebService(config) as web:
        res = post(f"{web.url}/studies", [part10_file(study(1)[0])], key="")
        assert res.status_code == 503 and res.headers["Retry-After"] == "5", res.text
        assert requests.get(f"{web.url}/studies", timeout=10).status_code == 200


def test_stow_can_be_turned_off(tmp_path):
    config = load_config(None, environ={}, overrides={"data_dir": str(tmp_path), "web": {"stow": False},
                                                       "access": {"anonymous_tenant": "a"}})
    with WebService(config) as web:
        assert post(f"{web.url}/studies", [part10_file(study(1)[0])], key="").status_code == 405
