"""QIDO-RS and metadata over HTTP, with dicomweb-client as the client, on both catalogue backends.

Tenancy through real credentials: API keys, and JWTs signed by the test with an RSA key whose JWKS
a local HTTP server publishes (as Keycloak would).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from itertools import count

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from dicomweb_client.api import DICOMwebClient

from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.tenancy import api_key_hash
from tests.test_catalogue import entry, study
from tests.web_harness import WebService

_db = count()
KEY_A, KEY_B, KEY_ADMIN = "key-of-a-0123456789", "key-of-b-0123456789", "key-of-admin-0123456789"


@pytest.fixture(scope="module")
def jwks():
    """An issuer: an RSA key and its JWKS served over HTTP; yields (issuer URL, sign(claims))."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    issuer = f"http://127.0.0.1:{server.server_address[1]}/realms/hospital"

    def sign(claims: dict, signer=key) -> str:
        base = {"iss": issuer, "exp": int(time.time()) + 300, "sub": "user-1"}
        return jwt.encode({**base, **claims}, signer, algorithm="RS256", headers={"kid": "k1"})
    yield issuer, sign
    server.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request, tmp_path, jwks):
    issuer, _ = jwks
    url = "" if request.param == "sqlite" else request.getfixturevalue("pg_cluster").new_database(f"w{next(_db)}")
    config = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path), "catalogue": {"url": url},
        "web": {"max_results": 5, "cors_origins": ["http://viewer.example"]},
        "access": {"anonymous_tenant": None, "admin_api_keys_sha256": [api_key_hash(KEY_ADMIN)],
                   "tenants": {"a": {"aes": ["CT_A"], "api_keys_sha256": [api_key_hash(KEY_A)]},
                               "b": {"aes": ["CT_B"], "api_keys_sha256": [api_key_hash(KEY_B)]}},
                   "jwt": {"issuer": issuer, "jwks_url": f"{issuer}/certs"}}})
    catalogue = open_catalogue(url, tmp_path)
    with WebService(config) as web:
        yield web, catalogue
    catalogue.close()


def client(web, key: str | None = None, token: str | None = None) -> DICOMwebClient:
    headers = {"X-API-Key": key} if key else {"Authorization": f"Bearer {token}"} if token else {}
    return DICOMwebClient(web.url, headers=headers)


def uids(results) -> list[str]:
    return [r["0020000D"]["Value"][0] for r in results]


def test_qido_with_dicomweb_client_and_tenants(service):
    web, catalogue = service
    mine = study(3, series=2, PatientName="Müller^Jürgen", StudyDate="20260110")
    theirs = study(2, PatientName="Other^Person")
    catalogue.record_batch([entry(ds, "a") for ds in mine] + [entry(ds, "b") for ds in theirs])
    a = client(web, KEY_A)
    [found] = a.search_for_studies(search_filters={"PatientName": "müller*"})
    assert found["00201208"]["Value"] == [3] and found["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jürgen"
    assert found["00081190"]["Value"][0] == f"{web.url}/studies/{mine[0].StudyInstanceUID}"
    assert a.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "jür"}) != []
    assert uids(a.search_for_studies()) == [mine[0].StudyInstanceUID]  # never b's
    assert a.search_for_studies(search_filters={"StudyInstanceUID": theirs[0].StudyInstanceUID}) == []
    series = a.search_for_series(study_instance_uid=mine[0].StudyInstanceUID)
    assert sorted(s["00201209"]["Value"][0] for s in series) == [1, 2]
    inst = a.search_for_instances(study_instance_uid=mine[0].StudyInstanceUID,
                                  series_instance_uid=mine[0].SeriesInstanceUID)
    assert [i["00200013"]["Value"][0] for i in inst] == [1, 3]
    admin = client(web, KEY_ADMIN)
    assert len(admin.search_for_studies()) == 2
    assert uids(client(web, KEY_B).search_for_studies()) == [theirs[0].StudyInstanceUID]


def test_ohif_study_list_query(service):
    web, catalogue = service
    catalogue.record_batch([entry(ds, "a") for ds in study(1, StudyDescription="Brain")])
    res = requests.get(f"{web.url}/studies?limit=101&offset=0&fuzzymatching=false&includefield=00081030,00080060",
                       headers={"X-API-Key": KEY_A, "Accept": "application/dicom+json"}, timeout=10)
    assert res.status_code == 200 and res.headers["Content-Type"].startswith("application/dicom+json")
    [one] = res.json()
    assert one["00081030"]["Value"] == ["Brain"] and one["00080061"]["Value"] == ["CT"]
    # a limit above the server's maximum (5 here) is cut, and the Warning says so
    catalogue.record_batch([entry(ds, "a") for n in range(6) for ds in study(1)])
    res = requests.get(f"{web.url}/studies?limit=101", headers={"X-API-Key": KEY_A}, timeout=10)
    assert len(res.json()) == 5 and "exceeded the maximum" in res.headers["Warning"]
    page = requests.get(f"{web.url}/studies?limit=2&offset=6", headers={"X-API-Key": KEY_A}, timeout=10)
    assert len(page.json()) == 1 and "Warning" not in page.headers


@pytest.mark.parametrize("path, status, reason", [
    ("/studies?StudyDate=2026-01-01", 400, "neither a date"),
    ("/studies?NoSuchKeyword=1", 400, "neither a DICOM keyword nor a tag"),
    ("/studies?limit=ten", 400, "limit"),
    ("/studies/1.2.*/series", 400, "which no UID may hold"),
    ("/studies?offset=99999999999", 400, "largest this server allows"),
])
def test_malformed_requests_get_400_with_the_reason(service, path, status, reason):
    web, _ = service
    res = requests.get(web.url + path, headers={"X-API-Key": KEY_A}, timeout=10)
    assert res.status_code == status and reason in res.text and reason in res.headers["Warning"]


def test_credentials(service, jwks):
    web, catalogue = service
    _, sign = jwks
    catalogue.record_batch([entry(ds, "a") for ds in study(1)])
    url = f"{web.url}/studies"
    assert requests.get(url, timeout=10).status_code == 401  # anonymous_tenant: null
    assert requests.get(url, headers={"X-API-Key": "wrong"}, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Basic eDp5"}, timeout=10).status_code == 401
    assert len(client(web, token=sign({"tenant": "a"})).search_for_studies()) == 1
    assert client(web, token=sign({"tenant": "b"})).search_for_studies() == []
    assert len(client(web, token=sign({"realm_access": {"roles": ["dicomflow-admin"]}})).search_for_studies()) == 1
    for bad in (sign({"tenant": "a", "exp": int(time.time()) - 10}),  # expired
                sign({"tenant": "a", "iss": "http://elsewhere"}),  # another issuer
                sign({"tenant": "nobody"}),  # a tenant nobody configured
                sign({"tenant": "a"}, signer=rsa.generate_private_key(public_exponent=65537, key_size=2048))):
        res = requests.get(url, headers={"Authorization": f"Bearer {bad}"}, timeout=10)
        assert res.status_code == 401, res.text


def test_metadata_from_the_catalogue_with_etag(service):
    web, catalogue = service
    instances = study(3)
    catalogue.record_batch([entry(ds, "a") for ds in instances])
    a = client(web, KEY_A)
    meta = a.retrieve_series_metadata(instances[0].StudyInstanceUID, instances[0].SeriesInstanceUID)
    assert [m["00080018"]["Value"][0] for m in meta] == [ds.SOPInstanceUID for ds in instances]
    sop = instances[0].SOPInstanceUID
    assert meta[0]["7FE00010"]["BulkDataURI"] == (f"{web.url}/studies/{instances[0].StudyInstanceUID}/series/"
                                                 f"{instances[0].SeriesInstanceUID}/instances/{sop}/bulkdata/7FE00010")
    url = f"{web.url}/studies/{instances[0].StudyInstanceUID}/metadata"
    first = requests.get(url, headers={"X-API-Key": KEY_A}, timeout=10)
    again = requests.get(url, headers={"X-API-Key": KEY_A, "If-None-Match": first.headers["ETag"]}, timeout=10)
    assert again.status_code == 304
    assert requests.get(url, headers={"X-API-Key": KEY_B}, timeout=10).status_code == 404  # b: as if absent
    xml = requests.get(url, headers={"X-API-Key": KEY_A, "Accept": "application/dicom+xml"}, timeout=10)
    assert xml.status_code == 406


def test_requests_are_counted_by_route_and_status(service):
    from prometheus_client import REGISTRY

    web, _ = service
    route = "/dicom-web/studies"

    def count(status: str) -> float:
        return REGISTRY.get_sample_value("dicomflow_web_requests_total",
                                         {"route": route, "method": "GET", "status": status}) or 0.0
    ok, bad = count("200"), count("400")
    requests.get(f"{web.url}/studies", headers={"X-API-Key": KEY_A}, timeout=10)
    requests.get(f"{web.url}/studies?limit=x", headers={"X-API-Key": KEY_A}, timeout=10)
    assert count("200") == ok + 1 and count("400") == bad + 1
    assert REGISTRY.get_sample_value("dicomflow_web_request_seconds_count", {"route": route}) >= 2


def test_cors_preflight_and_headers(service):
    web, _ = service
    pre = requests.options(f"{web.url}/studies", headers={
        "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET"}, timeout=10)
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    res = requests.get(f"{web.url}/studies", headers={"Origin": "http://viewer.example", "X-API-Key": KEY_A},
                       timeout=10)
    assert res.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    other = requests.get(f"{web.url}/studies", headers={"Origin": "http://evil.example", "X-API-Key": KEY_A},
                         timeout=10)
    assert "Access-Control-Allow-Origin" not in other.headers
    # an answer raised as an exception (a bad UID in the path: 400) names the origin too
    bad = requests.get(f"{web.url}/studies/{'9' * 1000}/metadata", headers={"Origin": "http://viewer.example",
                                                                     "X-API-Key": KEY_A}, timeout=10)
    assert bad.status_code == 400 and bad.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
