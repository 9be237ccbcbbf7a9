"""Test helpers shared by the suite: real nats-server processes, the embedded stack, DICOM senders."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomflow.natsserver import NatsServer, free_port, wait_port

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def start_nats(tmp: Path, name: str = "n1") -> NatsServer:
    """A fresh single-node JetStream server on free loopback ports."""
    return NatsServer(tmp / f"nats-{name}", free_port(), free_port(), name=name,
                      log_file=tmp / f"nats-{name}.log").start()


def make_config(tmp: Path, nats_url: str = "", **sections) -> dict:
    """A configuration tree for tests: small partitions, free ports, no metrics endpoint."""
    cfg = {
        "data_dir": str(tmp / "data"),
        "nats": {"url": nats_url, "port": free_port(), "monitor_port": 0, "publish_timeout_s": 2.0},
        "stream": {"partitions": 8, "duplicate_window_s": 120},
        "ingest": {"port": free_port(), "workers": 1},
        "store": {"workers": 1, "group": {"ack_wait_s": 10, "pinned_timeout_s": 4, "member_ttl_s": 2}},
        "telemetry": {"metrics_port": 0},
        "web": {"port": 0},  # a test that reads over DICOMweb gives it a free port
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(tmp: Path, tree: dict) -> Path:
    path = tmp / "dicomflow.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_cli(config_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a dicomflow subcommand against ``config_path`` (no DICOMFLOW_* variables of the test's own environment);
    with ``check`` it must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(config_path), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, f"dicomflow {args} failed: {res.stderr}"
    return res


class Stack:
    """``dicomflow run`` as a user starts it, in a subprocess, with a test config file."""

    def __init__(self, tmp: Path, tree: dict):
        self.tmp = tmp
        self.tree = tree
        self.config_path = write_config(tmp, tree)
        self.data_dir = Path(tree["data_dir"])
        self.port = tree["ingest"]["port"]
        self.ae_title = tree["ingest"].get("ae_title", "DICOMFLOW")
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "stack.log"

    def start(self) -> Stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(self.config_path), "run"],
                                     cwd=REPO, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(lambda: (self.data_dir / "run" / "ready").exists() or self.proc.poll() is not None, 60,
                 what="dicomflow run to be ready")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        wait_port("127.0.0.1", self.port, 10)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a dicomflow subcommand against this stack's config."""
        return run_cli(self.config_path, *args, check=check)

    def studies(self) -> list[dict]:
        return json.loads(self.cli("studies", "--json").stdout)

    def instances_of(self, study_uid: str) -> int:
        return next((s["instances"] for s in self.studies() if s["study_uid"] == study_uid), 0)

    def storescu(self, folder: Path, calling_ae: str = "STORESCU") -> subprocess.CompletedProcess:
        """Send every file of ``folder`` with dcmtk's storescu, one association."""
        return subprocess.run(["storescu", "-aet", calling_ae, "-aec", self.ae_title, "127.0.0.1", str(self.port),
                               "+sd", str(folder)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TCP_NODELAY": "1"})


class _ResumingCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint that, when a request resumes the reactor, also marks it running."""

    def __init__(self, assoc):
        super().__init__()
        self.assoc = assoc

    def set(self) -> None:
        self.assoc._is_paused = False
        super().set()


def _steady_pynetdicom_requests() -> None:
    """Make pynetdicom 3.0's requests safe back to back on a starved CPU (every ``send_*`` of every association
    made in a process that imports this module: the tests, the chaos harness, the benchmarks using it).

    A request pauses the association's reactor thread by clearing a checkpoint and waiting until the reactor says
    it is paused; but that flag still says "paused" from the previous request when the reactor has not run since
    it was resumed. The reactor then wakes, takes the response off the queue as an "unexpected ... service
    message", and the request waits out its DIMSE timeout (seen in CI under load). Marking the reactor running
    when it is resumed makes the next request wait for a real pause.
    """
    from pynetdicom.association import Association

    if getattr(Association, "_steady_requests", False):
        return
    init = Association.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._reactor_checkpoint = _ResumingCheckpoint(self)
        self._reactor_checkpoint.set()

    Association.__init__ = __init__
    Association._steady_requests = True


_steady_pynetdicom_requests()


def proc_status(pid: int, field: str) -> int:
    """A figure of /proc/PID/status (``VmHWM``: peak resident memory in KiB; ``Threads``: a count)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def stack_peaks_kib(stack, command: str) -> dict[int, int]:
    """Peak resident memory (VmHWM, KiB) of each process of a ``dicomflow run`` stack whose command line names
    ``command`` (``store``: its store workers; ``ingest``: the receiver, or the supervisor and its receivers)."""
    peaks = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            if str(stack.config_path).encode() not in argv or command.encode() not in argv:
                continue
            peaks[int(cmdline.parent.name)] = proc_status(int(cmdline.parent.name), "VmHWM")
        except OSError:
            continue
    return peaks


def scu_send(port: int, datasets, ae_title: str = "DICOMFLOW", calling: str = "TESTSCU",
             contexts=(CTImageStorage,), comments: list[str] | None = None) -> list[int]:
    """Send datasets (pydicom Datasets or file paths) over one pynetdicom association; returns the statuses.

    ``comments``, when given, receives each response's Error Comment ("" when none).
    """
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:  # one context per transfer syntax, so the SCP accepts each of them
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
            ae.add_requested_context(cx, ts)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established, "association was not established"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
            if comments is not None:
                comments.append(str(status.get("ErrorComment", "")) if status else "")
    finally:
        assoc.release()
    return statuses


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part-10 file after its file meta information (the data set as sent)."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    meta_len = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[meta_len:]


def encode(ds, implicit: bool = False) -> bytes:
    """A pydicom data set as data set bytes (no file meta), explicit or implicit VR little endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return out.getvalue()


def run_async(coro):
    return asyncio.run(coro)
