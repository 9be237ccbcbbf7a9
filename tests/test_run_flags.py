"""`dicomflow run` passes its SCP and DICOMweb options on to the services it starts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import requests

from dicomflow.natsserver import free_port
from tests.helpers import REPO


def test_run_listens_on_the_port_and_ae_title_of_its_flags(tmp_path):
    port, web_port = free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin", "DICOMFLOW_DATA_DIR": str(tmp_path / "data"),
           "DICOMFLOW__NATS__PORT": str(free_port()), "DICOMFLOW__NATS__MONITOR_PORT": str(free_port()),
           "DICOMFLOW__TELEMETRY__METRICS_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "run", "--dicom-port", str(port), "--ae-title",
                             "FLAGGED", "--host", "127.0.0.1", "--web-port", str(web_port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "run.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        ok = False
        while time.monotonic() < deadline and not ok:
            res = subprocess.run(["echoscu", "-aec", "FLAGGED", "127.0.0.1", str(port)], capture_output=True)
            ok = res.returncode == 0
            time.sleep(0.5)
        assert ok, (tmp_path / "run.log").read_text()[-2000:]
        # DICOMweb on the flagged port
        while True:
            try:
                res = requests.get(f"http://127.0.0.1:{web_port}/dicom-web/studies", timeout=10)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-2000:]
                time.sleep(0.5)
        assert res.status_code == 200 and res.json() == []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
