"""A forward's memory is bounded whatever the instance's size: a real `dicomflow router` process sends a sparse
1 GiB instance to a real dcmtk storescp and to a STOW-RS endpoint, each byte for byte, while its peak RSS (VmHWM
from /proc) grows by less than 64 MiB; its spool holds nothing once the send is over, and a killed router's spool
is removed by the next router to start."""

from __future__ import annotations

import asyncio
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest

from dicomflow.natsserver import free_port
from shared.bus.connection import connect, publish_event
from shared.config import load_config
from shared.contract import subjects
from shared.contract.events import ForwardJob
from shared.dicom.part10 import part10, read_file_meta
from shared.storage.objectstore import Backends, content_digest
from tests.helpers import REPO, encode, make_config, wait_for, write_config
from tests.router_harness import Gateway
from tests.test_retrieve_memory import EXPLICIT, peak_rss_mib, sparse_instance

GIB = 1024 ** 3
ZEROS = bytes(64 * 1024 * 1024)


class HashingStowReceiver:
    """A STOW-RS endpoint that reads each request body a MiB at a time and keeps only its hash and length (the
    test process must not hold a gigabyte either); ``stall`` holds every request until it is set."""

    def __init__(self):
        self.bodies: list[tuple[str, int, str]] = []  # (Content-Type, length, blake3 of the body)
        self.reading = threading.Event()
        self.stall = threading.Event()
        self.stall.set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                outer.reading.set()
                outer.stall.wait()
                left = int(self.headers["Content-Length"])
                hasher, length = blake3.blake3(), 0
                while left:
                    chunk = self.rfile.read(min(left, 1024 * 1024))
                    if not chunk:
                        return
                    hasher.update(chunk)
                    length += len(chunk)
                    left -= len(chunk)
                outer.bodies.append((self.headers["Content-Type"], length, hasher.hexdigest()))
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.stall.set()
        self.server.shutdown()
        self.server.server_close()


def _dataset_digest(head: bytes, zeros: int) -> str:
    hasher = blake3.blake3(head, max_threads=blake3.blake3.AUTO)
    for _ in range(zeros // len(ZEROS)):
        hasher.update(ZEROS)
    return hasher.hexdigest()


def _stow_body_digest(content_type: str, meta: bytes, head: bytes, zeros: int) -> str:
    """The blake3 of the one-instance multipart body a STOW-RS target sends, built from its parts."""
    boundary = re.search(r"boundary=([^;\s]+)", content_type).group(1)
    hasher = blake3.blake3(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + meta + head,
                           max_threads=blake3.blake3.AUTO)
    for _ in range(zeros // len(ZEROS)):
        hasher.update(ZEROS)
    hasher.update(f"\r\n--{boundary}--\r\n".encode())
    return hasher.hexdigest()


def _received_digest(path: Path) -> str:
    """The blake3 of the data set of a Part 10 file storescp wrote, read a chunk at a time."""
    with open(path, "rb") as f:
        offset = read_file_meta(f.read(64 * 1024)).data_offset
        f.seek(offset)
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        while chunk := f.read(16 * 1024 * 1024):
            hasher.update(chunk)
    return hasher.hexdigest()


class Router:
    """One `dicomflow router` process with its configuration, and the jobs the test queues for it."""

    def __init__(self, tmp: Path, nats_url: str, targets: dict):
        (tmp / "rules.yaml").write_text("rules: []\n")
        self.tree = make_config(tmp, nats_url, router={
            "rules_file": str(tmp / "rules.yaml"), "targets": targets,
            "forward": {"backoff_initial_s": 0.2, "backoff_max_s": 1, "spool_dir": str(tmp / "spool")},
            "group": {"ack_wait_s": 2}})  # far shorter than a gigabyte's copy and send: kept alive by InProgress
        self.config_path = write_config(tmp, self.tree)
        self.config = load_config(str(self.config_path), environ={})
        self.spool = tmp / "spool"
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(self.config_path), "router"],
                                     cwd=REPO, env=env, stdout=open(self.tmp / "router.log", "ab"),
                                     stderr=subprocess.STDOUT)
        return self.proc

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def queue(self, target: str, ds, digest: str, size: int) -> None:
        """Queue a forward job for the instance ``ds`` (its bytes staged under ``digest``), once ROUTER_OUT is there."""
        job = ForwardJob(target=target, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                         sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=EXPLICIT,
                         backend=self.config.storage.staging, digest=digest, size=size, rule="test")

        async def go():
            nc = await connect(self.config, "test-forward-memory")
            try:
                for _ in range(200):
                    try:
                        await publish_event(nc.jetstream(), job, 2.0)
                        return
                    except Exception:  # the router has not made ROUTER_OUT yet
                        await asyncio.sleep(0.1)
                raise AssertionError("ROUTER_OUT never appeared")
            finally:
                await nc.close()

        asyncio.run(go())

    def queued(self) -> int:
        """Jobs on ROUTER_OUT (a work queue: a job leaves it once sent)."""
        async def go():
            nc = await connect(self.config, "test-forward-memory")
            try:
                return (await nc.jetstream().stream_info(subjects.OUT_STREAM)).state.messages
            finally:
                await nc.close()

        return asyncio.run(go())

    def deliveries(self, target: str) -> int:
        """Deliveries from ``target``'s queue so far, redeliveries included (a keep-alive that lapsed, a failed send)."""
        async def go():
            nc = await connect(self.config, "test-forward-memory")
            try:
                info = await nc.jetstream().consumer_info(subjects.OUT_STREAM, subjects.forward_durable(target))
                return info.delivered.consumer_seq
            finally:
                await nc.close()

        return asyncio.run(go())

    def spool_files(self) -> list[Path]:
        return [p for p in self.spool.rglob("*") if p.is_file()] if self.spool.exists() else []

    def log(self) -> str:
        return (self.tmp / "router.log").read_text()


def _small(objects):
    """A small staged instance (the warm-up forward); (data set, digest, size)."""
    from dicomflow.synthetic import ct_instance, new_uid

    ds = ct_instance(new_uid(), new_uid(), 1, rows=8, cols=8)
    raw = encode(ds)
    digest = content_digest(raw)
    objects.put(digest, raw)
    return ds, digest, len(raw)


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_a_1_gib_instance_is_forwarded_byte_identical_within_64_mib(tmp_path, nats_server, kind):
    gateway = Gateway(tmp_path, "GW").start() if kind == "dicom" else None
    stow = HashingStowReceiver() if kind == "dicomweb" else None
    target = gateway.target(timeout_s=120) if gateway else {"kind": "dicomweb", "url": stow.url, "timeout_s": 120}
    router = Router(tmp_path, nats_server.url, {"T": target})
    backends = Backends(router.config)
    objects = backends.get(router.config.storage.staging)
    small, small_digest, small_size = _small(objects)
    big, head, digest, total = sparse_instance(objects, GIB)
    backends.close()
    proc = router.start()
    try:
        router.queue("T", small, small_digest, small_size)  # a first forward: the router's imports, its threads
        if gateway:
            wait_for(lambda: small.SOPInstanceUID in gateway.received(), 60, what="the small instance at storescp")
        else:
            wait_for(lambda: stow.bodies, 60, what="the small instance's STOW-RS request")
        wait_for(lambda: router.queued() == 0, 30, what="the small job acknowledged")
        before = peak_rss_mib(proc.pid)
        t0 = time.monotonic()
        router.queue("T", big, digest, total)
        wait_for(lambda: router.queued() == 0, 240, interval=0.5, what="the 1 GiB job sent and acknowledged")
        took = time.monotonic() - t0
        grew = peak_rss_mib(proc.pid) - before
        print(f"{kind}: router peak RSS {before:.0f} MiB before, +{grew:.1f} MiB while forwarding a "
              f"{total / GIB:.2f} GiB instance in {took:.1f} s")
        assert grew < 64, grew
        meta = part10(b"", big.SOPClassUID, big.SOPInstanceUID, EXPLICIT)
        if gateway:
            files = [f for f in gateway.dir.iterdir() if f.name.endswith(big.SOPInstanceUID)]
            assert len(files) == 1, files
            assert _received_digest(files[0]) == digest  # the data set byte for byte
        else:
            assert len(stow.bodies) == 2  # the small and the big instance, each once: no redelivery mid-send
            content_type, length, body_digest = stow.bodies[-1]
            assert length == len(meta) + total + _framing(content_type)
            assert body_digest == _stow_body_digest(content_type, meta, head, total - len(head))
        assert router.spool_files() == []  # the copy is gone with the send
        assert "dead-lettered" not in router.log()
        assert router.deliveries("T") == 2  # each job once: the copy and the send outlasted the ack wait, kept alive
    finally:
        router.stop()
        if gateway:
            gateway.kill()
        if stow:
            stow.close()


def _framing(content_type: str) -> int:
    boundary = re.search(r"boundary=([^;\s]+)", content_type).group(1)
    return len(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n") + len(f"\r\n--{boundary}--\r\n")


def test_a_killed_routers_spool_is_removed_by_the_next_router(tmp_path, nats_server):
    """SIGKILL a router while its copy of a 64 MiB instance waits on a stalled STOW-RS endpoint: its spool file is
    left, and the next router to start removes it (the job itself is sent again, by that router)."""
    stow = HashingStowReceiver()
    stow.stall.clear()
    router = Router(tmp_path, nats_server.url, {"T": {"kind": "dicomweb", "url": stow.url, "timeout_s": 120}})
    backends = Backends(router.config)
    big, head, digest, total = sparse_instance(backends.get(router.config.storage.staging), 64 * 1024 * 1024)
    backends.close()
    try:
        killed = router.start()
        router.queue("T", big, digest, total)
        assert stow.reading.wait(60), router.log()
        left = router.spool_files()
        assert [p.stat().st_size for p in left] == [total + len(part10(b"", big.SOPClassUID, big.SOPInstanceUID,
                                                                       EXPLICIT))]
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        stow.stall.set()  # the killed router's request ends unread
        assert all(p.exists() for p in left)
        router.start()
        wait_for(lambda: not any(p.exists() for p in left), 60, what="the dead router's spool removed")
        wait_for(lambda: "removed the forward spool of 1 dead router" in router.log(), 10, what="the removal logged")
        wait_for(lambda: router.queued() == 0, 120, interval=0.5, what="the job sent by the new router")
        content_type, length, body_digest = stow.bodies[-1]
        assert body_digest == _stow_body_digest(content_type, part10(b"", big.SOPClassUID, big.SOPInstanceUID,
                                                                     EXPLICIT), head, total - len(head))
        assert router.spool_files() == []
    finally:
        router.stop()
        stow.close()
