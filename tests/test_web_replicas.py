"""The DICOMweb service scaled out and stopped gracefully, with real processes: ``dicomflow run --web-replicas 2``
serves one port from two processes and loses no request when one is killed; a ``dicomflow web`` sent SIGTERM
in the middle of a large WADO-RS stream finishes it, byte for byte, before it exits."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from dicomflow.natsserver import free_port
from dicomflow.synthetic import ct_instance, new_uid
from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.storage.objectstore import Backends
from shared.tenancy import api_key_hash
from tests.helpers import REPO, wait_for
from tests.test_dicomweb_wado import store

KEY = "replica-key-a-12345"
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _children(parent: int, word: str) -> dict[int, str]:
    """Live child processes of ``parent`` whose command line has ``word`` as an argument: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat[1]) == parent and stat[0] != "Z" and word.encode() in argv:
            found[int(entry.name)] = b" ".join(argv).decode(errors="replace")
    return found


def _served(metrics_port: int) -> float:
    """The QIDO requests one web process has answered 200, from its own /metrics (0 while it starts)."""
    try:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    except requests.ConnectionError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dicomflow_web_requests_total{") and 'route="/dicom-web/studies"' in line
               and 'status="200"' in line)


def _burst(url: str, n: int, threads: int = 12) -> list[int | str]:
    """``n`` QIDO requests from ``threads`` clients, each on a new connection: their statuses (or errors)."""
    def one(_):
        try:
            return requests.get(url, timeout=15).status_code
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def test_run_serves_one_port_from_two_web_replicas_and_a_killed_one_loses_no_later_request(tmp_path):
    web_port, metrics = free_port(), free_port()
    # the metrics ports of run's services are offsets from telemetry.metrics_port: the web's are +80 and +81
    while any(not _port_free(metrics + off) for off in (0, 80, 81)):
        metrics = free_port()
    env = {"PATH": "/usr/bin:/bin", "DICOMFLOW_DATA_DIR": str(tmp_path / "data"),
           "DICOMFLOW__NATS__PORT": str(free_port()), "DICOMFLOW__NATS__MONITOR_PORT": str(free_port()),
           "DICOMFLOW__TELEMETRY__METRICS_PORT": str(metrics)}
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "run", "--dicom-port", str(free_port()),
                             "--web-port", str(web_port), "--web-replicas", "2"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
    url = f"http://127.0.0.1:{web_port}/dicom-web/studies"
    try:
        wait_for(lambda: (tmp_path / "data" / "run" / "ready").exists() or proc.poll() is not None, 90,
                 what="dicomflow run to be ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        webs = wait_for(lambda: (w := _children(proc.pid, "web")) and len(w) == 2 and w, 30, what="two web processes")
        assert all("--listen-fd" in cmd for cmd in webs.values()), webs  # one socket, the supervisor's
        # Both processes answer: each one's own /metrics counts requests it served.
        statuses: list = []
        wait_for(lambda: statuses.extend(_burst(url, 60)) or all(_served(metrics + 80 + i) > 0 for i in (0, 1)),
                 60, interval=0, what="both replicas to serve requests")
        assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]

        # Kill one replica outright: requests made from then on are all answered (by the other, then both).
        victim = min(webs)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in _children(proc.pid, "web"), 10, what="the killed replica to be gone")
        after = _burst(url, 200)
        assert set(after) == {200}, [s for s in after if s != 200][:5]
        # The supervisor restarted it (a new pid on the same socket), and it serves again.
        restarted = wait_for(lambda: (w := _children(proc.pid, "web")) and len(w) == 2 and w, 30,
                             what="the replica restarted")
        assert victim not in restarted and set(webs) & set(restarted)
        assert "restarted" in log.read_text()
        wait_for(lambda: _port_answers(metrics + 80) and _port_answers(metrics + 81), 30, what="metrics back")
        wait_for(lambda: set(_burst(url, 60)) == {200} and all(_served(metrics + 80 + i) > 0 for i in (0, 1)),
                 60, interval=0, what="the restarted replica to serve requests")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _port_answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def large_study(tmp_path):
    """A stored study of 60 CT instances of 512x512 16-bit (about 30 MiB), and the config of its data dir."""
    tree = {"data_dir": str(tmp_path / "data"), "telemetry": {"metrics_port": 0},
            "access": {"anonymous_tenant": None, "tenants": {"a": {"api_keys_sha256": [api_key_hash(KEY)]}}},
            "web": {"port": free_port(), "drain_s": 20}}
    (tmp_path / "data").mkdir()
    config_path = tmp_path / "dicomflow.yaml"
    config_path.write_text(yaml.safe_dump(tree))
    config = load_config(str(config_path), environ={})
    study_uid, series_uid = new_uid(), new_uid()
    datasets = [ct_instance(study_uid, series_uid, i + 1, rows=512, cols=512) for i in range(60)]
    catalogue = open_catalogue("", config.data_path())
    backends = Backends(config)
    try:
        store(catalogue, backends.get("local"), datasets)
    finally:
        backends.close()
        catalogue.close()
    return config_path, config, study_uid


def _start_web(config_path: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    return subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(config_path), "web"], cwd=REPO,
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def test_sigterm_lets_a_large_retrieve_in_flight_finish_byte_identical_then_exits(large_study, tmp_path):
    config_path, config, study_uid = large_study
    base = f"http://127.0.0.1:{config.web.port}{config.web.path_prefix}"
    headers = {"X-API-Key": KEY, "Accept": INSTANCE_ACCEPT}
    log = tmp_path / "web.log"
    proc = _start_web(config_path, log)
    try:
        wait_for(lambda: _answers(base) or proc.poll() is not None, 60, what="dicomflow web to answer")
        assert proc.poll() is None, log.read_text()[-3000:]
        whole = requests.get(f"{base}/studies/{study_uid}", headers=headers, timeout=60)
        assert whole.status_code == 200 and len(whole.content) > 25 * 2**20

        # A slow reader: the server is still streaming (held back by the socket) when SIGTERM comes.
        res = requests.get(f"{base}/studies/{study_uid}", headers=headers, timeout=60, stream=True)
        assert res.status_code == 200
        chunks = res.iter_content(256 * 1024)
        got = bytearray(next(chunks))
        proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        time.sleep(1.0)
        assert proc.poll() is None, "exited with a request in flight"
        # It no longer accepts: a new connection is refused while the stream goes on.
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/studies", headers={"X-API-Key": KEY}, timeout=5)
        for chunk in chunks:
            got += chunk
            time.sleep(0.002)
        # the whole answer, byte for byte (each answer has a boundary of its own)
        assert bytes(got).replace(_boundary(res), b"B") == whole.content.replace(_boundary(whole), b"B")
        proc.wait(15)
        assert proc.returncode == 0
        assert time.monotonic() - t_term < config.web.drain_s + 10
        assert "draining" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_is_bounded_by_drain_s(large_study, tmp_path):
    config_path, config, study_uid = large_study
    tree = yaml.safe_load(config_path.read_text())
    tree["web"]["drain_s"] = 1
    config_path.write_text(yaml.safe_dump(tree))
    base = f"http://127.0.0.1:{config.web.port}{config.web.path_prefix}"
    proc = _start_web(config_path, tmp_path / "web.log")
    try:
        wait_for(lambda: _answers(base) or proc.poll() is not None, 60, what="dicomflow web to answer")
        # A client that reads one chunk and then nothing: the stream cannot finish, the drain must not wait on.
        res = requests.get(f"{base}/studies/{study_uid}", headers={"X-API-Key": KEY, "Accept": INSTANCE_ACCEPT},
                           timeout=60, stream=True)
        chunks = res.iter_content(64 * 1024)  # kept: a dropped generator would close the connection
        next(chunks)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert 0.9 < time.monotonic() - t0 < 10
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut short: it never read the rest
            for _ in chunks:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _boundary(res: requests.Response) -> bytes:
    return res.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()


def _answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/studies", headers={"X-API-Key": KEY}, timeout=2).status_code == 200
    except requests.RequestException:
        return False
