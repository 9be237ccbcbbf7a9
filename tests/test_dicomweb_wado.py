"""WADO-RS retrieve with dicomweb-client: byte-identical data sets, Accept negotiation, tenants, corruption."""

from __future__ import annotations

import io

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.filereader import _read_file_meta_info

from shared.catalogue.entry import InstanceFacts, entry_from_model
from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.dicom.json_model import json_model
from shared.storage.objectstore import Backends, content_digest
from shared.tenancy import api_key_hash
from tests.helpers import encode
from tests.test_catalogue import study
from tests.web_harness import WebService

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
KEY_A, KEY_B = "wado-key-a-12345", "wado-key-b-12345"


@pytest.fixture
def service(tmp_path):
    config = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path),
        "access": {"anonymous_tenant": None,
                   "tenants": {"a": {"api_keys_sha256": [api_key_hash(KEY_A)]},
                               "b": {"api_keys_sha256": [api_key_hash(KEY_B)]}}}})
    catalogue = open_catalogue("", tmp_path)
    backends = Backends(config)
    with WebService(config) as web:
        yield web, catalogue, backends.get("local")
    backends.close()
    catalogue.close()


def store(catalogue, objects, datasets, tenant="a") -> dict[str, bytes]:
    """Stage and catalogue the data sets as the store would; returns SOP UID -> data set bytes."""
    out, entries = {}, []
    for ds in datasets:
        raw = encode(ds)
        digest = content_digest(raw)
        objects.put(digest, raw)
        facts = InstanceFacts(tenant, EXPLICIT, digest, len(raw), "default", ("local",), "MOD", "2026", "2026")
        entries.append(entry_from_model(json_model(raw, EXPLICIT), facts))
        out[ds.SOPInstanceUID] = raw
    catalogue.record_batch(entries)
    return out


def data_set_of(ds: pydicom.Dataset) -> bytes:
    """The data set bytes of a file dicomweb-client returned (after its file meta)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    raw = io.BytesIO(buf.getvalue())
    raw.seek(132)
    _read_file_meta_info(raw)
    return raw.read()


def parts(res: requests.Response) -> list[pydicom.Dataset]:
    """The application/dicom parts of a multipart/related answer."""
    assert res.status_code == 200, res.text
    boundary = res.headers["Content-Type"].split("boundary=")[1].encode()
    out = []
    for part in res.content.split(b"--" + boundary)[1:-1]:
        _, _, body = part.partition(b"\r\n\r\n")
        out.append(pydicom.dcmread(io.BytesIO(body[:-2])))
    return out


def test_study_series_instance_retrieve_byte_identical(service):
    web, catalogue, objects = service
    instances = study(4, series=2)
    sent = store(catalogue, objects, instances)
    client = DICOMwebClient(web.url, headers={"X-API-Key": KEY_A})
    got = client.retrieve_study(instances[0].StudyInstanceUID)
    assert {ds.SOPInstanceUID for ds in got} == set(sent)
    for ds in got:
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT
        assert data_set_of(ds) == sent[ds.SOPInstanceUID]
    series = client.retrieve_series(instances[0].StudyInstanceUID, instances[0].SeriesInstanceUID)
    assert [ds.SOPInstanceUID for ds in series] == [instances[0].SOPInstanceUID, instances[2].SOPInstanceUID]
    one = client.retrieve_instance(instances[1].StudyInstanceUID, instances[1].SeriesInstanceUID,
                                   instances[1].SOPInstanceUID)
    assert data_set_of(one) == sent[instances[1].SOPInstanceUID]
    # another tenant: as if absent
    other = requests.get(f"{web.url}/studies/{instances[0].StudyInstanceUID}", headers={"X-API-Key": KEY_B},
                         timeout=10)
    assert other.status_code == 404


def test_accept_negotiation(service):
    web, catalogue, objects = service
    [ds] = study(1)
    store(catalogue, objects, [ds])
    url = f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    h = {"X-API-Key": KEY_A}
    # dicomweb-client refuses to ask for implicit VR itself: the request is made by hand
    res = requests.get(url, headers={**h, "Accept": f'multipart/related; type="application/dicom"; '
                                                    f'transfer-syntax={IMPLICIT}'}, timeout=10)
    [implicit] = parts(res)
    assert implicit.file_meta.TransferSyntaxUID == IMPLICIT and implicit.PatientName == ds.PatientName
    assert implicit.PixelData == ds.PixelData
    jpeg = requests.get(url, headers={**h, "Accept": 'multipart/related; type="application/dicom"; '
                                                     'transfer-syntax=1.2.840.10008.1.2.4.50'}, timeout=10)
    assert jpeg.status_code == 406 and "transfer-syntax=*" in jpeg.text
    # several ranges with q-values: the preferred one that can be met
    mixed = requests.get(url, headers={**h, "Accept": 'multipart/related; type="application/dicom"; '
                                                      'transfer-syntax=1.2.840.10008.1.2.4.50; q=1, '
                                                      'multipart/related; type="application/dicom"; '
                                                      'transfer-syntax=1.2.840.10008.1.2; q=0.5'}, timeout=10)
    assert mixed.status_code == 200 and "transfer-syntax=1.2.840.10008.1.2\r\n" in mixed.content.decode("latin-1")
    bare = requests.get(url, headers={**h, "Accept": "application/dicom"}, timeout=10)
    assert bare.status_code == 200 and bare.headers["Content-Type"].startswith("application/dicom")
    assert pydicom.dcmread(io.BytesIO(bare.content)).SOPInstanceUID == ds.SOPInstanceUID
    xml = requests.get(url, headers={**h, "Accept": "application/dicom+xml"}, timeout=10)
    assert xml.status_code == 406


def test_a_corrupt_object_fails_the_request_never_silently(service):
    web, catalogue, objects = service
    instances = study(2)
    sent = store(catalogue, objects, instances)
    digest = content_digest(sent[instances[1].SOPInstanceUID])
    path = objects.path(digest)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the pixels
    path.write_bytes(bytes(data))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut before its closing boundary
        res = requests.get(f"{web.url}/studies/{instances[0].StudyInstanceUID}", headers={"X-API-Key": KEY_A},
                           timeout=10, stream=True)
        b"".join(res.iter_content(65536))
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value("dicomflow_web_corrupt_objects_total") >= 1


def test_an_instance_larger_than_a_chunk_streams_whole(service):
    from dicomflow.synthetic import ct_instance, new_uid

    web, catalogue, objects = service
    big = ct_instance(new_uid(), new_uid(), 1, rows=1500, cols=1500)  # 4.5 MB of pixels: several read chunks
    sent = store(catalogue, objects, [big])
    [got] = DICOMwebClient(web.url, headers={"X-API-Key": KEY_A}).retrieve_study(big.StudyInstanceUID)
    assert data_set_of(got) == sent[big.SOPInstanceUID]


def test_a_lone_instance_goes_with_its_length_a_study_chunked(service):
    web, catalogue, objects = service
    instances = study(2)
    sent = store(catalogue, objects, instances)
    ds = instances[0]
    url = f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    h = {"X-API-Key": KEY_A}
    for accept in ('multipart/related; type="application/dicom"; transfer-syntax=*', "application/dicom"):
        res = requests.get(url, headers={**h, "Accept": accept}, timeout=10)
        assert res.status_code == 200, res.text
        assert int(res.headers["Content-Length"]) == len(res.content)
        assert "Transfer-Encoding" not in res.headers
        got = parts(res)[0] if accept.startswith("multipart") else pydicom.dcmread(io.BytesIO(res.content))
        assert data_set_of(got) == sent[ds.SOPInstanceUID]
    # transcoded: the size is not known before it is made, so chunked as before
    res = requests.get(url, headers={**h, "Accept": f'multipart/related; type="application/dicom"; '
                                                    f'transfer-syntax={IMPLICIT}'}, timeout=10)
    assert res.headers.get("Transfer-Encoding") == "chunked" and parts(res)[0].file_meta.TransferSyntaxUID == IMPLICIT
    whole = requests.get(f"{web.url}/studies/{ds.StudyInstanceUID}", headers=h, timeout=10)
    assert whole.headers.get("Transfer-Encoding") == "chunked" and len(parts(whole)) == 2


def corrupt(objects, raw: bytes, at: int) -> None:
    """Flip a byte of a stored object (``at`` from its end)."""
    path = objects.path(content_digest(raw))
    data = bytearray(path.read_bytes())
    data[-at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_lone_instance_gets_500_or_is_cut_short_of_its_length(service, caplog):
    from prometheus_client import REGISTRY

    from dicomflow.synthetic import ct_instance, new_uid

    web, catalogue, objects = service
    small = study(1)[0]
    big = ct_instance(new_uid(), new_uid(), 1, rows=1500, cols=1500)  # several read chunks
    sent = store(catalogue, objects, [small, big])
    for ds in (small, big):
        corrupt(objects, sent[ds.SOPInstanceUID], 10)
        before = REGISTRY.get_sample_value("dicomflow_web_corrupt_objects_total") or 0
        url = f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        if ds is small:  # found corrupt as it is opened, before the answer starts: an error status
            res = requests.get(url, headers={"X-API-Key": KEY_A}, timeout=10)
            assert res.status_code == 500 and "does not match its digest" in res.text
        else:  # found only at its last chunk, after its length and first chunks went out: cut short
            received = 0
            with pytest.raises(requests.exceptions.ChunkedEncodingError):  # urllib3's IncompleteRead
                with requests.get(url, headers={"X-API-Key": KEY_A}, timeout=10, stream=True) as res:
                    assert res.status_code == 200 and "Content-Length" in res.headers
                    for piece in res.iter_content(65536):
                        received += len(piece)
            assert received < len(sent[ds.SOPInstanceUID])  # never the last chunk
        assert REGISTRY.get_sample_value("dicomflow_web_corrupt_objects_total") == before + 1
        assert f"{ds.SOPInstanceUID}: object" in caplog.text and "does not match its digest" in caplog.text


def test_a_lone_instance_no_placement_can_read_gets_503(service):
    web, catalogue, objects = service
    ds = study(1)[0]
    sent = store(catalogue, objects, [ds])
    objects.path(content_digest(sent[ds.SOPInstanceUID])).unlink()  # catalogued, but no placement holds it
    url = f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    res = requests.get(url, headers={"X-API-Key": KEY_A}, timeout=10)
    assert res.status_code == 503 and res.headers["Retry-After"] == "5"


def test_a_streamed_retrieve_names_a_permitted_origin(tmp_path):
    """A viewer served from another origin (OHIF) reads the instances it downloads: CORS on the streamed answer."""
    config = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path), "web": {"cors_origins": ["http://viewer.example"]},
        "access": {"anonymous_tenant": None, "tenants": {"a": {"api_keys_sha256": [api_key_hash(KEY_A)]}}}})
    catalogue = open_catalogue("", tmp_path)
    backends = Backends(config)
    try:
        with WebService(config) as web:
            [ds] = study(1)
            store(catalogue, backends.get("local"), [ds])
            for url in (f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                        f"{ds.SOPInstanceUID}", f"{web.url}/studies/{ds.StudyInstanceUID}"):
                res = requests.get(url, headers={"X-API-Key": KEY_A, "Origin": "http://viewer.example",
                                                 "Accept": 'multipart/related; type="application/dicom"'}, timeout=10)
                assert res.status_code == 200 and len(parts(res)) == 1
                assert res.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
                assert "Content-Length" in res.headers["Access-Control-Expose-Headers"]
                other = requests.get(url, headers={"X-API-Key": KEY_A, "Origin": "http://evil.example"}, timeout=10)
                assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
    finally:
        backends.close()
        catalogue.close()
