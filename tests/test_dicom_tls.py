"""DICOM over TLS on the SCP, both engines, with dcmtk's own TLS clients (`echoscu +tls`, `storescu +tls`): TLS 1.2+
with the configured certificate; with a client CA, a client without a certificate (or with one of another CA)
is refused, and a certificate acts only as the AE titles it is bound to (its name, or its tenant's AEs)."""

from __future__ import annotations

import socket
import subprocess

import pytest
from pydicom import dcmread

from dicomflow.synthetic import write_study
from tests.helpers import wait_for
from tests.tls_certs import CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CA(folder)
    return {"ca": ca, "server": ca.server(), "modality": ca.client("MODALITY"), "gateway": ca.client("site-gateway"),
            "intruder": ca.client("INTRUDER"), "other": CA(folder / "other", "unknown CA").client("MODALITY")}


def _dcmtk(program: str, port: int, pki, client: str | None, calling: str, *extra: str) -> subprocess.CompletedProcess:
    tls = ["+tls", str(pki[client].key), str(pki[client].cert)] if client else ["+tla"]
    argv = [program, *tls, "+cf", str(pki["ca"].path), "-aet", calling, "-aec", "DICOMFLOW", "-to", "10",
            "-ta", "10", "-td", "10", "127.0.0.1", str(port), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _ok(res: subprocess.CompletedProcess) -> bool:
    return res.returncode == 0 and not any(ln.startswith(("E:", "F:")) for ln in (res.stdout + res.stderr).splitlines())


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_dicom_tls_with_client_certificates_bound_to_aes(stack_factory, tmp_path, pki, engine):
    stack = stack_factory(
        ingest={"engine": engine, "tls_cert": str(pki["server"].cert), "tls_key": str(pki["server"].key),
                "tls_ca": str(pki["ca"].path)},
        access={"tenants": {"site": {"aes": ["MODALITY", "CT2"], "tls_subjects": ["site-gateway"]}}})
    port = stack.port
    # a peer that connects and never says hello holds up no one else's handshake
    silent = socket.create_connection(("127.0.0.1", port))
    # a certificate named after the calling AE; a gateway certificate its tenant lists, for another of its AEs
    assert _ok(_dcmtk("echoscu", port, pki, "modality", "MODALITY"))
    assert _ok(_dcmtk("echoscu", port, pki, "gateway", "CT2"))
    study = tmp_path / "study"
    study_uid, _ = write_study(study, 3)
    res = _dcmtk("storescu", port, pki, "modality", "MODALITY", "+sd", str(study))
    assert _ok(res), res.stdout + res.stderr
    wait_for(lambda: stack.instances_of(study_uid) == 3, 30, what="3 instances stored")
    # refused: no client certificate, one of an unknown CA, one not bound to the calling AE, no TLS at all
    assert not _ok(_dcmtk("echoscu", port, pki, None, "MODALITY"))
    assert not _ok(_dcmtk("echoscu", port, pki, "other", "MODALITY"))
    assert not _ok(_dcmtk("echoscu", port, pki, "intruder", "MODALITY"))
    assert not _ok(_dcmtk("echoscu", port, pki, "modality", "CT2"))  # MODALITY's certificate is not CT2
    plain = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "-to", "5", "-ta", "5",
                            "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
    assert not _ok(plain)
    # the SCP still serves after every refusal
    assert _ok(_dcmtk("echoscu", port, pki, "modality", "MODALITY"))
    silent.close()


def test_anonymous_tls_without_a_client_ca(stack_factory, pki):
    """Without ingest.tls_ca no client certificate is asked for: `+tla` (anonymous TLS) associates; the server's
    certificate is verified by the client against the CA."""
    stack = stack_factory(ingest={"tls_cert": str(pki["server"].cert), "tls_key": str(pki["server"].key)})
    assert _ok(_dcmtk("echoscu", stack.port, pki, None, "ANYONE"))


def test_https_for_dicomweb_and_tls_for_dicom_under_dicomflow_run(stack_factory, tmp_path, pki):
    """`dicomflow run` with web.tls_cert: QIDO-RS over HTTPS, verified against the CA by the client, RetrieveURLs
    in https://; plain HTTP gets no answer."""
    import requests

    from dicomflow.natsserver import free_port

    server = pki["server"]
    stack = stack_factory(ingest={"tls_cert": str(server.cert), "tls_key": str(server.key)},
                          web={"port": free_port(), "tls_cert": str(server.cert), "tls_key": str(server.key)})
    study = tmp_path / "study"
    study_uid, _ = write_study(study, 2)
    assert _ok(_dcmtk("storescu", stack.port, pki, None, "MODALITY", "+sd", str(study)))
    base = f"https://localhost:{stack.tree['web']['port']}/dicom-web"

    def studies(uid: str) -> list[dict]:
        got = requests.get(f"{base}/studies", params={"StudyInstanceUID": uid}, verify=str(pki["ca"].path),
                           timeout=10)
        assert got.status_code in (200, 204), got.text
        return got.json() if got.content else []

    found = wait_for(lambda: studies(study_uid), 30, what="the study over QIDO-RS/HTTPS")
    assert found[0]["00081190"]["Value"][0].startswith("https://localhost:")
    with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust the CA
        requests.get(f"{base}/studies", timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://localhost:{stack.tree['web']['port']}/dicom-web/studies", timeout=10)
    # the router's STOW-RS target sends to it over HTTPS, verified against the CA; without the CA it cannot
    from services.router.targets import SendError
    from services.router.targets.dicomweb import DicomwebTarget
    from shared.config import DicomwebTargetConfig
    from shared.contract.events import ForwardJob
    from shared.dicom.part10 import part10
    from tests.helpers import dataset_bytes

    other_uid, paths = write_study(tmp_path / "other", 1)
    ds = dcmread(paths[0], stop_before_pixels=True)
    job = ForwardJob(target="web", study_uid=other_uid, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
                     sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                     backend="local", digest="0" * 64, size=1, rule="r")
    forwarded = tmp_path / "forwarded.dcm"  # the Part 10 file a forwarder hands its target
    forwarded.write_bytes(part10(dataset_bytes(paths[0]), job.sop_class_uid, job.sop_uid, job.transfer_syntax_uid))
    batch = [(job, forwarded)]
    with pytest.raises(SendError, match="CERTIFICATE_VERIFY_FAILED"):
        DicomwebTarget(DicomwebTargetConfig(url=base), "DICOMFLOW").send(batch)
    DicomwebTarget(DicomwebTargetConfig(url=base, tls_ca=str(pki["ca"].path)), "DICOMFLOW").send(batch)
    stored = wait_for(lambda: studies(other_uid), 30, what="the study sent over STOW-RS/HTTPS")
    assert stored[0]["0020000D"]["Value"] == [other_uid]


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_c_cancel_reaches_the_scp_through_tls(engine, tmp_path, pki):
    """The lean engine looks for a C-CANCEL between C-FIND responses without blocking; through TLS that look must
    not take "nothing decrypted yet" for a closed connection."""
    import ssl

    from shared.tls import server_context
    from tests.test_cfind import cancel_mid_find

    client = ssl.create_default_context(cafile=str(pki["ca"].path))
    cancel_mid_find(engine, tmp_path, tls=server_context(str(pki["server"].cert), str(pki["server"].key)),
                    tls_args=(client, "localhost"))


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_c_move_to_a_destination_over_tls(stack_factory, tmp_path, pki, engine):
    """A C-MOVE destination with ``tls: true`` gets its association over TLS, its certificate verified against
    tls_ca and ours presented: dcmtk's storescp +tls, requiring a client certificate, receives the study. A
    destination whose certificate the configured CA did not sign gets nothing: every sub-operation fails."""
    from dicomflow.natsserver import free_port

    archive_port, untrusted_port = free_port(), free_port()
    gateway = pki["gateway"]
    tls = {"tls": True, "tls_ca": str(pki["ca"].path), "tls_cert": str(gateway.cert), "tls_key": str(gateway.key)}
    stack = stack_factory(ingest={"engine": engine, "move_destinations": {
        "ARCHIVE": {"host": "127.0.0.1", "port": archive_port, **tls},
        "UNTRUSTED": {"host": "127.0.0.1", "port": untrusted_port, **tls}}})
    archive, elsewhere = tmp_path / "archive", tmp_path / "elsewhere"
    archive.mkdir()
    elsewhere.mkdir()
    server, impostor = pki["server"], CA(tmp_path / "impostor", "impostor CA").server()
    # storescp +tls requires and verifies a client certificate by default (-rc)
    scps = [subprocess.Popen(["storescp", "+tls", str(pair.key), str(pair.cert), "+cf", str(pki["ca"].path),
                              "-aet", ae, "+B", "-od", str(out), str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for ae, pair, out, port in (("ARCHIVE", server, archive, archive_port),
                                        ("UNTRUSTED", impostor, elsewhere, untrusted_port))]
    try:
        for port in (archive_port, untrusted_port):
            wait_for(lambda port=port: _listening(port), 20, what=f"storescp on {port}")
        study_uid, files = write_study(tmp_path / "study", 3)
        res = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(stack.port),
                              "+sd", str(tmp_path / "study")], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: stack.instances_of(study_uid) == 3, 30, what="3 instances stored")

        def move(dest: str) -> str:
            out = subprocess.run(["movescu", "-v", "-S", "-aet", "MODALITY", "-aec", "DICOMFLOW", "-aem", dest,
                                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                                  "127.0.0.1", str(stack.port)], capture_output=True, text=True, timeout=120)
            return out.stdout + out.stderr

        moved = move("ARCHIVE")
        assert "Final Move Response (Success)" in moved, moved
        wait_for(lambda: len(list(archive.iterdir())) == 3, 20, what="3 instances at the TLS destination")
        assert {dcmread(f).SOPInstanceUID for f in archive.iterdir()} == {dcmread(f).SOPInstanceUID for f in files}
        refused = move("UNTRUSTED")  # the handshake fails: no sub-operation completes
        assert "Final Move Response (Success)" not in refused, refused
        assert not list(elsewhere.iterdir())
    finally:
        for scp in scps:
            scp.kill()
            scp.wait()
