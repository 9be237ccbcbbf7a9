"""Orthanc 1.10 with its DICOMweb plugin (Debian's packages) as a real peer: started on free ports in a folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from dicomflow.natsserver import free_port
from tests.helpers import wait_for

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """``with Orthanc(folder, modalities=..., dicomweb_servers=...) as o: o.get("/studies")``.

    Its HTTP port answers loopback only (RemoteAccessAllowed false); its DICOM port binds every interface (Orthanc
    1.10 cannot bind one address), on a free port."""

    def __init__(self, folder: Path, modalities: dict | None = None, dicomweb_servers: dict | None = None,
                 aet: str = "ORTHANC", dicom_port: int | None = None, nagle: bool = False):
        if not shutil.which("Orthanc") or not os.path.exists(PLUGIN):
            pytest.fail("Orthanc and its DICOMweb plugin are missing: run `make test`, which installs them")
        self.folder, self.aet, self.nagle = folder, aet, nagle
        self.http_port, self.dicom_port = free_port(), dicom_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = {"Name": "peer", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
                "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet, "Plugins": [PLUGIN],
                "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                "SyncStorageArea": False,  # a test peer: durability is not what is tested (its default fsyncs)
                "DicomModalities": modalities or {},
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}}}
        (folder / "orthanc.json").write_text(json.dumps(conf))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Orthanc:
        self.proc = subprocess.Popen(["Orthanc", str(self.folder / "orthanc.json")],
                                     stdout=open(self.folder / "orthanc.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self._env())

        def up() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                return requests.get(self.url + "/system", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(up, 60, what="Orthanc")
        return self

    def _env(self) -> dict[str, str]:
        # dcmtk (Orthanc's DICOM layer) leaves Nagle on unless TCP_NODELAY=1: ``nagle=True`` is Orthanc as Debian
        # starts it, which a DICOM peer of it must cope with (40-90 ms stalls per instance otherwise)
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        return env if self.nagle else {**env, "TCP_NODELAY": "1"}

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def log(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")[-4000:]

    def get(self, path: str):
        res = requests.get(self.url + path, timeout=60)
        assert res.status_code == 200, f"{path}: {res.status_code} {res.text}\n{self.log()}"
        return res.json() if "json" in res.headers.get("Content-Type", "") else res.content

    def post(self, path: str, body, timeout: float = 120):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        res = requests.post(self.url + path, data=data, timeout=timeout)
        assert res.status_code == 200, f"{path}: {res.status_code} {res.text}\n{self.log()}"
        return res.json() if res.content and "json" in res.headers.get("Content-Type", "") else res.content

    def delete_all(self) -> None:
        for study in self.get("/studies"):
            requests.delete(f"{self.url}/studies/{study}", timeout=30)

    def instances(self) -> dict[str, bytes]:
        """SOP Instance UID -> data set bytes (after the file meta) of every instance Orthanc holds."""
        from tests.helpers import dataset_bytes

        out = {}
        for i, oid in enumerate(self.get("/instances")):
            path = self.folder / f"got-{i}.dcm"
            path.write_bytes(self.get(f"/instances/{oid}/file"))
            sop = self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"]
            out[sop] = dataset_bytes(path)
            path.unlink()
        return out
