"""Large instances are streamed to staging as they arrive: the writers, the intake, and the SCP over the wire.

A data set above ``ingest.stream_above_bytes`` is written, hashed and its writeback started piece
by piece; nothing of it may be visible, published or left behind unless it is committed.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from nats.js.api import PubAck
from pydicom import dcmread
from pynetdicom import _config
from pynetdicom.sop_class import CTImageStorage

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from services.ingest import pdu
from services.ingest.intake import Intake, Received
from services.ingest.loopthread import LoopThread
from services.ingest.scp import start_scp
from shared.bus.connection import connect, ensure_streams
from shared.bus.publish_blocking import LoopPublisher
from shared.config import FsBackendConfig, load_config
from shared.dicom.part10 import part10
from shared.dicom.statuses import CANNOT_UNDERSTAND, INVALID_UID, OUT_OF_RESOURCES, SUCCESS, TOO_LARGE
from shared.storage.fs_store import WRITEBACK_STEP, FileObjectStore
from shared.storage.objectstore import Backends, BufferedWriter, content_digest
from tests.helpers import dataset_bytes, scu_send, stack_peaks_kib, wait_for
from tests.test_ingest_scp import _contexts, _rq_bytes

REPO = Path(__file__).resolve().parent.parent


def _store(tmp_path) -> FileObjectStore:
    return FileObjectStore("stage", FsBackendConfig(path=str(tmp_path / "objects")), tmp_path)


def _temporaries(root) -> list[str]:
    return os.listdir(root / "tmp")


def _pieces(data: bytes, size: int):
    view = memoryview(data)
    return [view[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("piece", [4096, 16384, 128 * 1024 + 7])
def test_a_streamed_object_is_durable_byte_identical_and_leaves_no_temporary_file(tmp_path, piece):
    store = _store(tmp_path)
    data = os.urandom(3 * WRITEBACK_STEP + 12345)  # several writeback ranges and a tail
    w = store.writer(10**9)
    for p in _pieces(data, piece):
        w.write(p)
    assert w.size == len(data)
    assert bytes(w.contents()) == data  # what the tags are read from
    assert not store.exists(content_digest(data))  # invisible until committed
    digest = w.commit({"sop_uid": "1.2.3"})
    assert digest == content_digest(data)
    assert store.get(digest) == data
    assert _temporaries(store.root) == []
    w.close()  # idempotent after commit
    assert store.get(digest) == data


@pytest.mark.parametrize("kind", ["file", "buffered"])
def test_a_writer_past_its_limit_keeps_nothing_and_cannot_commit(tmp_path, kind):
    store = _store(tmp_path)
    w = store.writer(100_000) if kind == "file" else BufferedWriter(store, 100_000)
    for p in _pieces(os.urandom(300_000), 65536):
        w.write(p)
    assert w.size == 300_000  # counted, so the intake can name the size it refuses
    assert _temporaries(store.root) == []  # dropped as soon as the limit was passed
    with pytest.raises(ValueError, match="limit"):
        w.commit()
    w.close()
    assert not list(store.root.glob("??/*"))


@pytest.mark.parametrize("kind", ["file", "buffered"])
def test_a_discarded_writer_leaves_nothing_and_a_known_object_is_kept_once(tmp_path, kind):
    store = _store(tmp_path)
    make = (lambda: store.writer(10**9)) if kind == "file" else (lambda: BufferedWriter(store, 10**9))
    data = os.urandom(400_000)
    w = make()
    w.write(data)
    w.close()
    assert _temporaries(store.root) == [] and not list(store.root.glob("??/*"))
    for _ in range(2):  # the second commit finds the object stored: no rewrite, no temporary left
        w = make()
        for p in _pieces(data, 50_000):
            w.write(p)
        assert w.commit() == content_digest(data)
    assert [p.name for p in store.root.glob("??/*")] == [content_digest(data)]
    assert _temporaries(store.root) == []


class _Recorder:
    """A blocking publisher that keeps the events it acknowledged: after ``real`` (a JetStream one) stored them,
    or at once without one (the intake's own tests need no NATS)."""

    def __init__(self, published: list, real=None):
        self.published = published
        self.real = real

    def publish(self, event, msg_id=None) -> PubAck:
        ack = self.real.publish(event, msg_id) if self.real else PubAck(stream="test", seq=len(self.published) + 1)
        self.published.append(event)
        return ack

    def close(self) -> None:
        if self.real:
            self.real.close()


def _instance(tmp_path, rows: int = 512, **changes) -> tuple[bytes, str]:
    """A CT data set (about rows*rows*2 bytes) and its SOPInstanceUID, with attributes changed or removed."""
    _, files = write_study(tmp_path / f"src-{uuid.uuid4().hex}", 1, rows=rows, cols=rows)
    ds = dcmread(files[0])
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(tmp_path / "as-sent.dcm", enforce_file_format=True)
    return dataset_bytes(tmp_path / "as-sent.dcm"), str(ds.SOPInstanceUID)


def _received(data, sop_uid: str) -> Received:
    return Received(data=data, transfer_syntax="1.2.840.10008.1.2.1", sop_class_uid=CTImageStorage,
                    sop_instance_uid=sop_uid, calling_ae="MODALITY", called_ae="DICOMFLOW")


def test_the_intake_commits_a_streamed_instance_only_when_it_is_valid(tmp_path):
    store = _store(tmp_path)
    published = []
    intake = Intake(store, _Recorder(published), 2 * 1024 * 1024, stream_above_bytes=64 * 1024)
    body, sop = _instance(tmp_path)

    def streamed(data: bytes):
        w = intake.open_writer()
        for p in _pieces(data, 16384):
            w.write(p)
        return w

    assert intake.accept(_received(streamed(body), sop)) == (SUCCESS, "")
    assert published[0].digest == content_digest(body) and published[0].size == len(body)
    assert store.get(published[0].digest) == body

    # Another character set: the tags go through pydicom, still read from the mapped file.
    utf8, utf8_sop = _instance(tmp_path, SpecificCharacterSet="ISO_IR 192", InstitutionName="Hôpital Nord")
    assert intake.accept(_received(streamed(utf8), utf8_sop)) == (SUCCESS, "")
    assert published[1].tags.institution_name == "Hôpital Nord"
    assert store.get(published[1].digest) == utf8

    bad, bad_sop = _instance(tmp_path, StudyInstanceUID=None)
    assert intake.accept(_received(streamed(bad), bad_sop))[0] == INVALID_UID
    assert intake.accept(_received(streamed(body[: len(body) // 2]), sop))[0] == CANNOT_UNDERSTAND
    status, comment = intake.accept(_received(streamed(body * 5), sop))
    assert status == TOO_LARGE and str(len(body) * 5) in comment
    # The staging folder vanished (a broken disk): the modality is told to retry, nothing is published.
    os.rmdir(store.root / "tmp")
    status, comment = intake.accept(_received(streamed(body), sop))
    assert status == OUT_OF_RESOURCES and comment.startswith("staging write failed: ")
    store.tmp.mkdir()
    assert len(published) == 2
    assert sorted(p.name for p in store.root.glob("??/*")) == sorted([content_digest(body), content_digest(utf8)])
    assert _temporaries(store.root) == []


@pytest.fixture
def streaming_scp(tmp_path, nats_server):
    """The lean SCP streaming above 64 KiB, refusing above 1 MiB, publishing to a real JetStream."""
    cfg = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "nats": {"url": nats_server.url}, "stream": {"partitions": 4}})
    loop = LoopThread("test-nats")
    nc = loop.call(connect(cfg, "test-ingest"), timeout=10)
    loop.call(ensure_streams(nc, cfg), timeout=30)
    published = []
    publisher = LoopPublisher(nc, loop.loop, 5)
    loop.call(publisher.start(), timeout=10)
    backends = Backends(cfg)
    staging = backends.get("local")
    intake = Intake(staging, _Recorder(published, publisher), 1024 * 1024, stream_above_bytes=64 * 1024)
    port = free_port()
    server = start_scp(intake, "127.0.0.1", port, "DICOMFLOW", 16384, 4, 30, [])
    yield port, staging, published
    server.stop(5)
    loop.call(nc.close(), timeout=5)
    loop.stop()


def test_large_instances_over_the_wire_are_streamed_refused_or_stored(streaming_scp, tmp_path):
    port, staging, published = streaming_scp
    good, good_sop = _instance(tmp_path)  # 512 KiB: streamed
    no_study, no_study_sop = _instance(tmp_path, StudyInstanceUID=None)
    huge, huge_sop = _instance(tmp_path, rows=1024)  # 2 MiB: over the limit
    files = []
    for name, body, sop in [("good", good, good_sop), ("truncated", good[: len(good) // 2], good_sop),
                            ("no_study", no_study, no_study_sop), ("huge", huge, huge_sop)]:
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(part10(body, CTImageStorage, sop, "1.2.840.10008.1.2.1"))
        files.append(path)
    _config.STORE_SEND_CHUNKED_DATASET = True  # the files' bytes exactly as they are
    try:
        statuses = scu_send(port, files)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [SUCCESS, CANNOT_UNDERSTAND, INVALID_UID, TOO_LARGE], [hex(s) for s in statuses]
    assert [e.digest for e in published] == [content_digest(good)]
    assert staging.get(content_digest(good)) == good
    assert [p.name for p in staging.root.glob("??/*")] == [content_digest(good)]
    assert _temporaries(staging.root) == []


def _command_rq(sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set announcing a data set."""
    def elem(e: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, e, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    us = struct.Struct("<H").pack
    rest = b"".join([elem(0x0002, uid(sop_class)), elem(0x0100, us(pdu.C_STORE_RQ)), elem(0x0110, us(1)),
                     elem(0x0700, us(0)), elem(0x0800, us(0)), elem(0x1000, uid(sop_instance))])
    return elem(0x0000, struct.pack("<I", len(rest))) + rest


def _pdv_pdu(cid: int, control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(fragment) + 2, cid, control) + fragment
    return struct.pack(">BxI", pdu.P_DATA_TF, len(pdv)) + pdv


def test_an_association_dropped_inside_a_streamed_data_set_leaves_nothing(streaming_scp, tmp_path):
    port, staging, published = streaming_scp
    body, sop = _instance(tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_rq_bytes("DICOMFLOW", "MODALITY", _contexts()))
        assert sock.recv(6)[0] == pdu.ASSOCIATE_AC
        sock.sendall(_pdv_pdu(1, 0x03, _command_rq(CTImageStorage, sop)))
        for frag in _pieces(body[: 300 * 1024], 16000):  # past stream_above_bytes: a temporary file exists
            sock.sendall(_pdv_pdu(1, 0x00, bytes(frag)))
        wait_for(lambda: _temporaries(staging.root), timeout=10, what="the streamed temporary file")
    # The peer is gone mid-data-set: the receiver discards the partial object.
    wait_for(lambda: not _temporaries(staging.root), timeout=10, what="the temporary file removed")
    time.sleep(0.2)
    assert published == [] and not list(staging.root.glob("??/*"))


def test_a_receiver_does_not_hold_a_large_instance_in_memory(tmp_path, nats_server, stack_factory):
    stack = stack_factory(nats_server.url)
    study, files = write_study(tmp_path / "big", 1, rows=5800, cols=5800)  # a 64 MiB data set
    body = dataset_bytes(files[0])
    assert len(body) > 64 * 1024 * 1024
    before = stack_peaks_kib(stack, "ingest")
    assert before
    res = subprocess.run(["storescu", "-aec", stack.ae_title, "127.0.0.1", str(stack.port), str(files[0])],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    assert res.returncode == 0 and "Failed" not in res.stderr, res.stderr
    wait_for(lambda: stack.instances_of(study) == 1, timeout=60, what="the instance stored")
    growth = {pid: peak - before[pid] for pid, peak in stack_peaks_kib(stack, "ingest").items() if pid in before}
    # Assembled in memory it would have been 64 MiB at least (twice that while joined).
    assert max(growth.values()) < 16 * 1024, growth
    staged = stack.data_dir / "objects" / content_digest(body)[:2] / content_digest(body)
    assert staged.read_bytes() == body
    assert _temporaries(stack.data_dir / "objects") == []


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer_and_live_ones_are_kept(tmp_path):
    store = _store(tmp_path)
    # A receiver killed while an instance streamed in: its temporary file stays, unlocked.
    child = subprocess.run([sys.executable, "-c", f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from shared.config import FsBackendConfig
from shared.storage.fs_store import FileObjectStore
w = FileObjectStore("stage", FsBackendConfig(path={str(store.root)!r}), Path({str(tmp_path)!r})).writer(10**9)
w.write(os.urandom(3 * 1024 * 1024))
os.kill(os.getpid(), 9)
"""], timeout=60)
    assert child.returncode == -9
    (orphan,) = _temporaries(store.root)
    live = store.writer(10**9)  # a writer of a live process, as old as the orphan
    live.write(os.urandom(1000))
    fresh = store.tmp / "0123.fresh"  # a put's temporary file of a moment ago: unlocked, but young
    fresh.write_bytes(b"x")
    old = time.time() - 3600
    for name in _temporaries(store.root):
        if name != fresh.name:
            os.utime(store.tmp / name, (old, old))
    store.prepare_writer()  # what a receiver does when it starts
    left = set(_temporaries(store.root))
    assert orphan not in left and fresh.name in left and len(left) == 2
    assert live.commit() == live.digest() and store.exists(live.digest())
    assert store.sweep_temporaries(min_age_s=0) == (1, 1)  # now only the put's file is left, and unlocked
