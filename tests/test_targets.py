"""Target kinds: one class per kind of TargetConfig, and a router that cannot send refuses to start.

Against the real things: dcmtk's storescu found (or not) on PATH, a real ``dicomflow router`` process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.router.targets import KINDS, SendError, Target, TargetsUnusable, check_targets, target_for
from services.router.targets.dicom import DicomTarget
from shared.config import BackendConfig, DicomTargetConfig, TargetConfig, kind_models, load_config
from shared.contract.events import ForwardJob
from shared.dicom.part10 import part10
from shared.storage import objectstore
from tests.helpers import REPO


def test_every_configurable_kind_has_its_class():
    assert sorted(KINDS) == sorted(m.model_fields["kind"].default for m in kind_models(TargetConfig))
    assert sorted(objectstore._KINDS) == sorted(m.model_fields["kind"].default for m in kind_models(BackendConfig))
    for kind, cls in KINDS.items():
        assert cls.kind == kind


def test_a_kind_that_leaves_out_a_method_cannot_be_made():
    class Half(Target):
        kind = "half"

        def send(self, batch):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Half(DicomTargetConfig(), "AE")
    with pytest.raises(TypeError, match="kind"):
        type("Nameless", (Target,), {})


def test_probe_addresses_by_kind():
    config = load_config(overrides={"router": {"targets": {
        "pacs": {"host": "pacs.example", "port": 11112},
        "web": {"kind": "dicomweb", "url": "https://web.example/dicomweb"},
        "web8": {"kind": "dicomweb", "url": "http://web.example:8080/"}}}}, environ={})
    got = {name: target_for(t, "AE").probe_address() for name, t in config.router.targets.items()}
    assert got == {"pacs": ("pacs.example", 11112), "web": ("web.example", 443), "web8": ("web.example", 8080)}


def _job(sop_uid: str) -> ForwardJob:
    return ForwardJob(target="pacs", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=sop_uid,
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                      backend="local", digest="0" * 64, size=10, rule="r")


def _file(tmp_path, job: ForwardJob, data: bytes) -> Path:
    """The job's Part 10 file, as the forwarder hands it to a target."""
    path = tmp_path / f"{job.sop_uid}.dcm"
    path.write_bytes(part10(data, job.sop_class_uid, job.sop_uid, job.transfer_syntax_uid))
    return path


def test_storescu_vanishing_before_the_send_is_a_send_error(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "storescu").symlink_to(shutil.which("storescu"))
    monkeypatch.setenv("PATH", str(bin_dir))
    target = DicomTarget(DicomTargetConfig(port=1, timeout_s=5), "DICOMFLOW")
    assert target.check() is None
    (bin_dir / "storescu").unlink()  # e.g. a package upgrade removing it under a running router
    with pytest.raises(SendError, match="cannot run storescu"):
        target.send([(_job("1.2.3.4.5"), _file(tmp_path, _job("1.2.3.4.5"), b"\x08\x00\x60\x00CS\x02\x00CT"))])


def test_check_names_each_target_that_needs_a_missing_program(tmp_path, monkeypatch):
    config = load_config(overrides={"router": {"targets": {
        "pacs": {"kind": "dicom"}, "web": {"kind": "dicomweb", "url": "http://127.0.0.1:1"}}}}, environ={})
    check_targets(config)  # storescu is on the test machine's PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TargetsUnusable) as exc:
        check_targets(config)
    assert "target 'pacs' (dicom) needs dcmtk's storescu" in str(exc.value)
    assert "'web'" not in str(exc.value)  # STOW-RS needs no program


def test_router_without_storescu_refuses_to_start(tmp_path):
    config = tmp_path / "dicomflow.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "var"), "nats": {"url": "nats://127.0.0.1:1"},
        "router": {"targets": {"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": 11112}}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    env["PATH"] = str(tmp_path)  # no storescu there
    res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(config), "router"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "cannot send to configured targets" in res.stderr
    assert "target 'pacs' (dicom) needs dcmtk's storescu, which is not on PATH" in res.stderr


def _storescp_tls(tmp_path, pair, ca):
    from dicomflow.natsserver import free_port, wait_port

    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "+tls", str(pair.key), str(pair.cert), "+cf", str(ca.path), "-vc",
                             "-od", str(out), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, 10)
    return proc, port, out


def test_a_tls_dicom_target_verifies_its_peer_by_default(tmp_path):
    """Against a real `storescp +tls`: verified against the target's CA it sends; with no CA it is verified against
    the system's CAs, which do not know a private CA's certificate, so the send fails; only an explicit
    tls_verify: false accepts any certificate."""
    from pydicom import dcmread

    from dicomflow.synthetic import write_study
    from tests.helpers import dataset_bytes
    from tests.tls_certs import CA

    ca = CA(tmp_path / "pki")
    proc, port, out = _storescp_tls(tmp_path, ca.server(), ca)
    try:
        path = write_study(tmp_path / "study", 1)[1][0]
        ds = dcmread(path, stop_before_pixels=True)
        job = ForwardJob(target="pacs", study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                         sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                         transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, backend="local", digest="0" * 64,
                         size=1, rule="r")
        batch = [(job, _file(tmp_path, job, dataset_bytes(path)))]

        def target(**tls) -> DicomTarget:
            return DicomTarget(DicomTargetConfig(host="127.0.0.1", port=port, ae_title="STORESCP", timeout_s=10,
                                                 tls=True, **tls), "DICOMFLOW")

        with pytest.raises(SendError):
            target().send(batch)  # the system CAs do not vouch for the private CA's server certificate
        assert not list(out.iterdir())
        other = CA(tmp_path / "other", "another CA")
        with pytest.raises(SendError):
            target(tls_ca=str(other.path)).send(batch)  # a CA that did not sign it
        target(tls_ca=str(ca.path)).send(batch)
        assert len(list(out.iterdir())) == 1
        target(tls_verify=False).send(batch)  # the explicit opt-out
        assert len(list(out.iterdir())) == 1  # the same SOP instance, stored again under its name
    finally:
        proc.kill()
        proc.wait()


def test_a_stow_rs_request_is_streamed_with_its_content_length_and_the_same_bytes(tmp_path):
    """The body read from the files as it is sent is byte for byte the multipart body built in memory before, with a
    Content-Length (not chunked): captured raw by a real socket."""
    import re
    import socket
    import threading

    from services.router.targets.dicomweb import DicomwebTarget
    from shared.config import DicomwebTargetConfig

    server = socket.create_server(("127.0.0.1", 0))
    raw = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while True:
                head, sep, body = bytes(raw).partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head) if sep else None
                if length and len(body) >= int(length.group(1)):
                    break
                data = conn.recv(1 << 20)
                if not data:
                    return
                raw.extend(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    batch, datasets = [], []
    for n, size in enumerate((10, 3 * 1024 * 1024 + 7, 0)):  # one over several chunks; an empty data set
        job, data = _job(f"1.2.3.4.{n}"), bytes((i * 7 + n) % 251 for i in range(size))
        batch.append((job, _file(tmp_path, job, data)))
        datasets.append((job, data))
    port = server.getsockname()[1]
    DicomwebTarget(DicomwebTargetConfig(url=f"http://127.0.0.1:{port}/dicom-web", headers={"X-Site": "a"}),
                   "AE").send(batch)
    thread.join(10)
    server.close()
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    boundary = re.search(rb"boundary=([\w-]+)", head).group(1).decode()
    expected = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + part10(data, job.sop_class_uid, job.sop_uid, job.transfer_syntax_uid) + b"\r\n"
                        for job, data in datasets) + f"--{boundary}--\r\n".encode()
    assert body == expected
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /dicom-web/studies HTTP/1.1"
    assert lines[1:5] == ["Accept-Encoding: identity", f"Content-Length: {len(expected)}", f"Host: 127.0.0.1:{port}",
                          f"User-Agent: Python-urllib/{sys.version_info.major}.{sys.version_info.minor}"]
    assert "X-Site: a" in lines and not any(line.lower().startswith("transfer-encoding") for line in lines)
