"""`dicomflow run` as a supervisor, with real processes: Ctrl-C at any time, two runs on one machine,
a nats-server killed under it, and the run itself killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydicom import dcmread

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from tests.helpers import REPO, Stack, make_config, scu_send, wait_for, write_config


def _processes_with(marker: str) -> list[int]:
    """PIDs of live processes (zombies aside) whose command line mentions ``marker`` (a test's tmp path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _kill_all(marker: str) -> None:
    for pid in _processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_run(config_path: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    return subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(config_path), "run"], cwd=REPO,
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _one_instance(tmp: Path):
    _, files = write_study(tmp, 1)
    return dcmread(files[0])


def test_ctrl_c_while_waiting_for_the_dicom_port_stops_at_once(tmp_path):
    # NATS nowhere: the ingest cannot start, so run is still waiting (up to 60 s) for the DICOM port.
    tree = make_config(tmp_path, f"nats://127.0.0.1:{free_port()}", nats={"connect_timeout_s": 1.0})
    proc = _start_run(write_config(tmp_path, tree), tmp_path / "run.log")
    try:
        wait_for(lambda: any("ingest" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                             for p in _processes_with(str(tmp_path)) if p != proc.pid), 30,
                 what="the ingest started")
        time.sleep(1)
        assert proc.poll() is None and not (Path(tree["data_dir"]) / "run" / "ready").exists()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        assert time.monotonic() - t0 < 10, (tmp_path / "run.log").read_text()[-2000:]
        assert proc.returncode == 0
        assert _processes_with(str(tmp_path)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(str(tmp_path))


def test_a_second_run_on_a_taken_nats_port_fails_at_once_naming_the_setting(tmp_path):
    (tmp_path / "a").mkdir()
    first = Stack(tmp_path / "a", make_config(tmp_path / "a")).start()
    try:
        (tmp_path / "b").mkdir()
        tree = make_config(tmp_path / "b", nats={"port": first.tree["nats"]["port"]})
        log = tmp_path / "b" / "run.log"
        second = _start_run(write_config(tmp_path / "b", tree), log)
        try:
            second.wait(20)
        finally:
            if second.poll() is None:
                second.kill()
        text = log.read_text()
        assert second.returncode == 1, text[-2000:]
        assert f"port {first.tree['nats']['port']} (nats.port) is in use" in text
        assert "DICOMFLOW__NATS__PORT" in text
        assert not (Path(tree["data_dir"]) / "run" / "ready").exists()
        # The first run is untouched: it still stores what it receives.
        ds = _one_instance(tmp_path / "study")
        assert scu_send(first.port, [ds]) == [0]
        wait_for(lambda: first.instances_of(ds.StudyInstanceUID) == 1, 60, what="the instance stored by the first")
    finally:
        first.stop()
        _kill_all(str(tmp_path))


def test_a_killed_nats_server_comes_back_on_its_data_and_ports(tmp_path):
    stack = Stack(tmp_path, make_config(tmp_path)).start()
    conf = str(stack.data_dir / "nats" / "nats-server.conf")
    try:
        [nats_pid] = wait_for(lambda: _processes_with(conf), 10, what="the nats-server process")
        os.kill(nats_pid, signal.SIGKILL)
        wait_for(lambda: [p for p in _processes_with(conf) if p != nats_pid], 20, what="a new nats-server")
        log = stack.log.read_text()
        assert f"nats-server (pid {nats_pid}) exited with -9" in log and "nats-server restarted" in log
        ds = _one_instance(tmp_path / "study")
        # The ingest answers 0xA700 until it has reconnected; the modality's retry is then stored.
        wait_for(lambda: scu_send(stack.port, [ds]) == [0], 60, interval=1, what="the instance accepted")
        wait_for(lambda: stack.instances_of(ds.StudyInstanceUID) == 1, 60, what="the instance stored")
    finally:
        stack.stop()
        _kill_all(str(tmp_path))


def test_a_killed_run_takes_nats_server_and_every_service_with_it(tmp_path):
    # Two receivers: the ingest's own supervisor and its children must go too.
    stack = Stack(tmp_path, make_config(tmp_path, ingest={"workers": 2})).start()
    try:
        children = wait_for(lambda: [p for p in _processes_with(str(tmp_path)) if p != stack.proc.pid]
                            if len(_processes_with(str(tmp_path))) >= 6 else None, 30,
                            what="nats-server, ingest, 2 receivers, store")
        os.kill(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not _processes_with(str(tmp_path)), 30, what=f"the children {children} to end")
        assert time.monotonic() - t0 < 15
    finally:
        _kill_all(str(tmp_path))
