"""The store copies an instance above ``store.stream_above_bytes`` chunk by chunk: a writer opened with the digest
commits only bytes that match it, a corrupt claim-check commits nothing, and a real ``dicomflow run`` stores a
1 GiB instance in two filesystem placements while its store worker's peak memory barely moves."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import blake3
import pytest

from dicomflow.synthetic import ct_instance, new_uid
from services.store.storing import Storer
from shared.catalogue.sqlite import open_sqlite
from shared.config import Config, FsBackendConfig
from shared.contract.events import InstanceReceived, InstanceTags, utcnow
from shared.dicom.part10 import part10
from shared.storage.fs_store import FileObjectStore
from shared.storage.objectstore import Backends, BufferedWriter, CorruptObject, content_digest
from tests.helpers import encode, stack_peaks_kib, wait_for

EXPLICIT = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("kind", ["file", "buffered"])
def test_a_writer_opened_with_a_digest_commits_only_those_bytes(tmp_path, kind):
    store = FileObjectStore("stage", FsBackendConfig(path=str(tmp_path / "objects")), tmp_path)
    data = os.urandom(300_000)
    make = store.writer if kind == "file" else (lambda limit, digest: BufferedWriter(store, limit, digest))
    w = make(10**9, content_digest(data))
    w.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptObject, match="nothing committed"):
        w.commit()
    assert not list(store.root.glob("??/*")) and os.listdir(store.root / "tmp") == []
    w = make(10**9, content_digest(data))
    w.write(data)
    assert w.commit() == content_digest(data) and store.get(content_digest(data)) == data


def _event(digest: str, size: int, n: int) -> InstanceReceived:
    tags = InstanceTags(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid=f"1.2.3.1.{n}", modality="CT")
    return InstanceReceived(tags=tags, transfer_syntax_uid=EXPLICIT, digest=digest, size=size, backend="stage",
                            calling_ae="CT1", called_ae="DICOMFLOW", received_at=utcnow())


def test_place_many_streams_large_instances_and_a_corrupt_one_commits_nothing(tmp_path):
    config = Config.model_validate({
        "data_dir": str(tmp_path),
        "store": {"stream_above_bytes": 1024 * 1024},
        "storage": {"staging": "stage",
                    "backends": {"stage": {"kind": "fs", "path": "stage"}, "copy1": {"kind": "fs", "path": "c1"},
                                 "copy2": {"kind": "fs", "path": "c2"}},
                    "policies": {"default": {"placements": ["copy1", "copy2"]}}, "default_policy": "default"}})
    backends = Backends(config)
    stage = backends.get("stage")
    bodies = [os.urandom(500_000), os.urandom(9 * 1024 * 1024 + 17), os.urandom(6 * 1024 * 1024)]
    events = []
    for n, body in enumerate(bodies):
        stage.put(content_digest(body), body)
        events.append(_event(content_digest(body), len(body), n))
    # The last one's claim-check went bad on disk after it was received: past the first read chunk.
    with open(stage.path(events[2].digest), "r+b") as f:
        f.seek(5 * 1024 * 1024)
        f.write(b"\xff" * 8)
    # A store worker killed while it streamed an instance into copy1 left its temporary file, unlocked.
    orphan = backends.get("copy1").root / "tmp" / "incoming.killed"
    orphan.write_bytes(b"x" * 1000)
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    whole_reads = []
    original_get = stage.get
    stage.get = lambda digest: whole_reads.append(digest) or original_get(digest)
    storer = Storer(config, None, backends, open_sqlite(tmp_path / "c.sqlite"))
    try:
        errors = storer.place_many([(e, ["copy1", "copy2"]) for e in events])
        assert errors[:2] == [None, None]
        assert isinstance(errors[2], CorruptObject) and "does not match its digest" in str(errors[2])
        assert whole_reads == [events[0].digest]  # only the small one was read whole (once, for both copies)
        for name in ("copy1", "copy2"):
            copy = backends.get(name)
            assert copy.get(events[0].digest) == bodies[0] and copy.get(events[1].digest) == bodies[1]
            assert not copy.exists(events[2].digest)
            # the corrupt copy's temporary file went with it, and the killed worker's was swept
            assert os.listdir(copy.root / "tmp") == []
    finally:
        backends.close()


def _file_digest(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while block := f.read(16 * 1024 * 1024):
            hasher.update(block)
    return hasher.hexdigest()


def test_run_stores_a_1_gib_instance_in_two_placements_with_bounded_store_memory(tmp_path, nats_server,
                                                                                   stack_factory):
    pixels = 1024**3
    ds = ct_instance(new_uid(), new_uid(), 1, rows=8, cols=8)
    del ds.PixelData
    head = encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels)
    path = tmp_path / "big.dcm"  # a sparse file: the pixels are zeros the disk never holds
    with open(path, "wb") as f:
        f.write(part10(head, CT, str(ds.SOPInstanceUID), EXPLICIT))
        f.truncate(f.tell() + pixels)
    hasher = blake3.blake3(head, max_threads=blake3.blake3.AUTO)
    zeros = bytes(64 * 1024 * 1024)
    for _ in range(pixels // len(zeros)):
        hasher.update(zeros)
    digest, size = hasher.hexdigest(), len(head) + pixels
    zeros = None

    stack = stack_factory(nats_server.url, storage={
        "staging": "local",
        "backends": {"local": {"kind": "fs"}, "a": {"kind": "fs", "path": "a"}, "b": {"kind": "fs", "path": "b"}},
        "policies": {"default": {"placements": ["a", "b"]}}, "default_policy": "default"})
    before = stack_peaks_kib(stack, "store")
    assert before
    res = subprocess.run(["storescu", "-aec", stack.ae_title, "127.0.0.1", str(stack.port), str(path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"})
    assert res.returncode == 0 and "Failed" not in res.stderr, res.stderr
    wait_for(lambda: stack.instances_of(str(ds.StudyInstanceUID)) == 1, timeout=300, what="the instance stored")
    after = stack_peaks_kib(stack, "store")
    growth = {pid: (peak - before[pid]) / 1024 for pid, peak in after.items() if pid in before}
    print(f"store worker peak RSS growth while placing a {size / 2**30:.2f} GiB instance twice: "
          f"{max(growth.values()):.1f} MiB ({before} -> {after} KiB)")
    # Read whole it was 1 GiB at least (and held for the second placement).
    assert max(growth.values()) < 128, growth
    for placement in ("a", "b"):
        placed = stack.data_dir / placement / digest[:2] / digest
        assert placed.stat().st_size == size and _file_digest(placed) == digest
        assert os.listdir(stack.data_dir / placement / "tmp") == []
