"""The filesystem store's write-ahead log on the real filesystem: durable appends shared by
concurrent writers, checkpoints that recycle segments, and recovery after a killed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared.config import FsBackendConfig
from shared.storage import fs_wal
from shared.storage.fs_store import FileObjectStore
from shared.storage.objectstore import ObjectMissing, content_digest
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent


def _store(root: Path, **cfg) -> FileObjectStore:
    return FileObjectStore("local", FsBackendConfig(path=str(root), wal_segment_bytes=1024 * 1024, **cfg), root)


def _blobs(n: int, size: int = 3000, seed: int = 0) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        data = (f"{seed}-{i}-".encode() * (size // 8 + 1))[:size]
        out[content_digest(data)] = data
    return out


def _segments(root: Path) -> list[Path]:
    return sorted((root / "wal").glob("*.wal"))


def test_small_objects_go_through_the_log_and_a_clean_close_leaves_none(tmp_path):
    store = _store(tmp_path / "o")
    blobs = _blobs(20)
    for digest, data in blobs.items():
        store.put(digest, data)
        assert store.get(digest) == data  # visible at once, before any checkpoint
    assert store._wal is not None and store._wal.appends == 20
    assert _segments(tmp_path / "o"), "an active segment while the store is open"
    big = os.urandom(2 * 1024 * 1024)  # above wal_max_object_bytes: fsynced on its own
    store.put(content_digest(big), big)
    assert store._wal.appends == 20
    store.close()
    assert _segments(tmp_path / "o") == []
    reopened = _store(tmp_path / "o")
    assert all(reopened.get(d) == data for d, data in blobs.items())
    assert reopened.get(content_digest(big)) == big


def test_a_prepared_writer_makes_no_segment_while_it_writes(tmp_path):
    store = _store(tmp_path / "o")
    assert _segments(tmp_path / "o") == [], "readers never start a log"
    store.prepare_writer()
    prepared = _segments(tmp_path / "o")
    assert len(prepared) == 2, "the active segment and a spare, zeroed and synced before the first put"
    assert all(p.stat().st_size == 1024 * 1024 for p in prepared)
    blobs = _blobs(30)
    for digest, data in blobs.items():
        store.put(digest, data)
    assert _segments(tmp_path / "o") == prepared, "the puts appended to the prepared segment"
    assert store._wal.appends == 30
    store.close()
    assert _segments(tmp_path / "o") == []
    assert all(_store(tmp_path / "o").get(d) == data for d, data in blobs.items())
    no_log = _store(tmp_path / "n", wal_max_object_bytes=0)
    no_log.prepare_writer()
    assert no_log._wal is None and _segments(tmp_path / "n") == []


def test_concurrent_writers_share_fdatasyncs(tmp_path):
    store = _store(tmp_path / "o")
    blobs = list(_blobs(400).items())
    errors = []

    def writer(part):
        try:
            for digest, data in part:
                store.put(digest, data)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(blobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    wal = store._wal
    assert wal.appends == 400
    assert wal.syncs < wal.appends, (wal.syncs, wal.appends)
    assert all(store.get(d) == data for d, data in blobs)
    store.close()


def test_checkpoint_recycles_segments_and_a_recycled_segment_replays_nothing(tmp_path):
    root = tmp_path / "o"
    store = _store(root, wal_checkpoint_s=0.2)
    for digest, data in _blobs(300, size=6000).items():  # ~1.8 MiB: rotates the 1 MiB segments
        store.put(digest, data)
    wait_for(lambda: store._wal.checkpoints >= 2, 10, what="checkpoints")
    # Recycled segments are kept as spares with an invalidated header: a recovery finds no records.
    assert all(list(fs_wal.read_records(p.read_bytes())) == [] for p in _segments(root)
               if store._wal._active is None or str(p) != store._wal._active.path)
    store.close()


def _child(root: Path, count: int, seed: int) -> subprocess.Popen:
    code = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from tests.test_fs_wal import _store, _blobs
store = _store(__import__('pathlib').Path({str(root)!r}), wal_checkpoint_s=3600)
for digest, data in _blobs({count}, seed={seed}).items():
    store.put(digest, data)
print('written', flush=True)
time.sleep(3600)
"""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def test_objects_of_a_killed_process_are_recovered_from_its_log(tmp_path):
    """A power loss can leave acknowledged objects' files missing or torn; only the log has them."""
    root = tmp_path / "o"
    _store(root).close()
    child = _child(root, 50, seed=7)
    try:
        assert child.stdout.readline().strip() == b"written"
        assert len(_segments(root)) >= 1
        # While the writer lives, its segments are its own: opening the store replays nothing.
        assert fs_wal.recover(str(root / "wal"), str(root), lambda d, b: None) == 0
        assert _segments(root)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    blobs = _blobs(50, seed=7)
    digests = sorted(blobs)
    paths = [root / d[:2] / d for d in digests]  # not opening a store: that would recover
    assert all(p.read_bytes() == blobs[d] for p, d in zip(paths, digests, strict=True))
    # What a crash before the checkpoint may leave: some files gone, some torn.
    for p in paths[:10]:
        p.unlink()
    for p in paths[10:20]:
        with open(p, "r+b") as f:
            f.truncate(100)
    recovered = _store(root)  # recovery runs before the store is used
    assert _segments(root) == []
    assert all(recovered.get(d) == blobs[d] for d in digests)
    recovered.close()


def test_a_torn_tail_is_ignored(tmp_path):
    root = tmp_path / "o"
    store = _store(root, wal_checkpoint_s=3600)
    blobs = _blobs(3)
    for digest, data in blobs.items():
        store.put(digest, data)
    seg = store._wal._active
    # Simulate a crash in the middle of a fourth append: header written, body cut short.
    torn = b"never acknowledged" * 100
    header = fs_wal._RECORD_HEADER.pack(fs_wal.RECORD_MAGIC, seg.epoch, len(torn), bytes.fromhex(content_digest(torn)))
    os.pwrite(seg.fd, header + torn[:50], seg.pos)
    records = list(fs_wal.read_records(Path(seg.path).read_bytes()))
    assert [d for d, _ in records] == list(blobs)
    store.close()


def test_objects_in_the_earlier_two_level_layout_are_still_read(tmp_path):
    root = tmp_path / "o"
    data = b"stored by an earlier version" * 50
    digest = content_digest(data)
    legacy = root / digest[:2] / digest[2:4] / digest
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(data)
    store = _store(root)
    assert store.exists(digest) and store.get(digest) == data
    assert store.read_range(digest, 10, 5) == (data[10:15], len(data))
    with pytest.raises(ObjectMissing):
        store.read_range(content_digest(b"never stored"), 0, 10)
    store.close()
