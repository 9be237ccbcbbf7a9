"""The health endpoints the Kubernetes probes and compose healthchecks call, on real service processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

from dicomflow.natsserver import free_port
from tests.helpers import REPO, make_config, start_nats, wait_for, write_config


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def test_store_and_ingest_report_ready_only_while_connected(tmp_path):
    nats = start_nats(tmp_path)
    procs = []
    try:
        cfg = write_config(tmp_path, make_config(tmp_path, nats.url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        ports = {"store": free_port(), "ingest": free_port()}
        for name, port in ports.items():
            procs.append(subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(cfg), name,
                                           "--metrics-port", str(port)], cwd=REPO, env=env,
                                          stdout=open(tmp_path / f"{name}.log", "ab"), stderr=subprocess.STDOUT))
        for name, port in ports.items():
            wait_for(lambda p=port: _get(p, "/readyz")[0] == 200, 60, what=f"{name} ready")
            status, body = _get(port, "/readyz")
            assert body["ok"] is True and body["checks"]["nats"] is True, body
            assert _get(port, "/healthz")[0] == 200
            assert b"python_info" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert set(_get(ports["ingest"], "/readyz")[1]["checks"]) == {"nats", "scp_accepting"}
        assert set(_get(ports["store"], "/readyz")[1]["checks"]) == {"nats", "group_member"}

        # NATS gone: both stop being ready (a pod would leave its Service), but stay alive (no restart loop).
        nats.kill()
        for name, port in ports.items():
            wait_for(lambda p=port: _get(p, "/readyz")[0] == 503, 60, what=f"{name} not ready without NATS")
            assert _get(port, "/healthz")[0] == 200
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        nats.kill()
