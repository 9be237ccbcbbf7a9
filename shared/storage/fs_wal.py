"""Write-ahead log for the filesystem object store: one durable barrier per small object.

Making one new file durable on ext4 costs two synchronous metadata flushes (the file's fsync, then
the directory's after the rename; journal commits where the filesystem has a journal) plus a mkdir
for a new shard folder: about 1 ms per instance, most of an ingest's time for small instances. A
write into a pre-zeroed, already-durable segment file followed by ``fdatasync`` flushes only data
blocks, no metadata (~0.1 ms, measured).

So a small object's bytes are appended to a segment and ``fdatasync``-ed (the durable copy), and
only then is the object's file made visible under its digest, without an fsync. Concurrent
writers share one ``fdatasync`` (group commit). A checkpoint later makes the files durable with one
``syncfs`` and recycles the segment. After a crash, whoever opens the store next replays the
records of segments no live process holds: files missing or torn are rewritten from the log.

Records carry the segment's epoch and their blake3 digest, so a torn tail or a stale record from an
earlier use of a recycled segment is recognised and ignored. An active segment is held with
``flock`` by its process; the lock ends with the process, which is how recovery tells orphans.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3

log = logging.getLogger("dicomflow.wal")

SEGMENT_MAGIC = b"DFWALSEG"
RECORD_MAGIC = b"DFWALREC"
_SEGMENT_HEADER = struct.Struct("<8sQ")  # magic, epoch
_RECORD_HEADER = struct.Struct("<8sQQ32s")  # magic, epoch, length, digest
DATA_START = 4096  # the segment header owns the first block
_ZEROS = bytes(1024 * 1024)


def _syncfs_call() -> Callable[[int], None]:
    """``syncfs(fd)`` (flush one filesystem); ``sync()`` where libc lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return lambda fd: os.sync()

    def call(fd: int) -> None:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")

    return call


syncfs = _syncfs_call()


def sync_filesystem(path: str) -> None:
    """Flush every written file and folder of the filesystem that holds ``path``, in one call."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def _lock_if_orphan(path: str) -> int | None:
    """Open and lock a segment no live process holds (its lock ended with it); None if owned or gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buffers: list, offset: int) -> None:
    total = sum(len(b) for b in buffers)
    written = os.pwritev(fd, buffers, offset)
    if written != total:  # rare (signals, huge buffers): finish byte-wise
        joined = b"".join(bytes(b) for b in buffers)[written:]
        offset += written
        view = memoryview(joined)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


@dataclass(eq=False)
class _Segment:
    path: str
    fd: int
    size: int
    epoch: int = 0
    pos: int = DATA_START
    records: int = 0
    writers: int = 0  # appends reserved here whose object file is not visible yet
    done: int = 0  # appends whose bytes are written (group-commit tickets)
    synced: int = 0  # tickets covered by a finished fdatasync
    syncing: bool = False
    opened_at: float = 0.0

    def close(self) -> None:
        os.close(self.fd)  # also releases the flock


@dataclass(frozen=True)
class Ticket:
    """An append that is durable in the log; release it once the object's file is visible."""

    segment: _Segment


class WriteAheadLog:
    """Segments under ``folder``; :meth:`append` returns once the bytes are durable in one of them."""

    def __init__(self, folder: str, fs_root: str, segment_bytes: int, checkpoint_s: float):
        self.folder = folder
        self.fs_root = fs_root
        self.segment_bytes = segment_bytes
        self.checkpoint_s = checkpoint_s
        os.makedirs(folder, exist_ok=True)
        self._cond = threading.Condition()
        self._active: _Segment | None = None
        self._full: list[_Segment] = []
        self._spares: list[_Segment] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._closed = False
        self.checkpoints = 0
        self.syncs = 0  # fdatasync calls: fewer than appends when writers share them
        self.appends = 0
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def prepare(self) -> None:
        """Make the active segment and (through the checkpoint thread) one spare now, before appends need them.

        A new segment is written full of zeros and fsynced (64 MiB by default): done lazily, the
        first append waits for it and the spare's writeback competes with the fdatasyncs of the
        appends that follow. A writer calls this at start-up, before it accepts work.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("write-ahead log is closed")
            if self._active is None:
                self._rotate()  # with no spare left, this wakes the checkpoint thread to make one
            while not self._spares and not self._closed:
                self._cond.wait(1.0)

    # -- appending ------------------------------------------------------------------------------

    def append(self, digest: str, data: bytes | bytearray | memoryview) -> Ticket:
        """Write one record and return once it is durable (possibly sharing another writer's fdatasync)."""
        need = _RECORD_HEADER.size + len(data)
        if need > self.segment_bytes - DATA_START:
            raise ValueError(f"object of {len(data)} bytes does not fit a log segment")
        with self._cond:
            if self._closed:
                raise RuntimeError("write-ahead log is closed")
            seg = self._active
            if seg is None or seg.pos + need > seg.size:
                seg = self._rotate()
            offset = seg.pos
            seg.pos += need
            seg.records += 1
            seg.writers += 1
            self.appends += 1
        try:
            header = _RECORD_HEADER.pack(RECORD_MAGIC, seg.epoch, len(data), bytes.fromhex(digest))
            _write_all(seg.fd, [header, data], offset)
            self._sync(seg)
        except BaseException:
            self.release(Ticket(seg))
            raise
        return Ticket(seg)

    def release(self, ticket: Ticket) -> None:
        """The object's file is visible (or its write failed): the segment may be checkpointed."""
        with self._cond:
            ticket.segment.writers -= 1
            self._cond.notify_all()

    def _sync(self, seg: _Segment) -> None:
        """Group commit: wait until an fdatasync that started after our write has finished."""
        with self._cond:
            seg.done += 1
            ticket = seg.done
            while seg.synced < ticket:
                if seg.syncing:
                    self._cond.wait()
                    continue
                seg.syncing = True
                covers = seg.done
                self.syncs += 1
                self._cond.release()
                try:
                    os.fdatasync(seg.fd)
                finally:
                    self._cond.acquire()
                    seg.syncing = False
                    self._cond.notify_all()
                seg.synced = max(seg.synced, covers)

    def _rotate(self) -> _Segment:
        """Retire the active segment and activate a spare (or a new one). Called with the lock held."""
        if self._active is not None:
            self._full.append(self._active)
            self._wake.set()
        seg = self._spares.pop() if self._spares else self._new_segment()
        seg.epoch = secrets.randbits(63) or 1
        seg.pos, seg.records, seg.done, seg.synced, seg.opened_at = DATA_START, 0, 0, 0, time.monotonic()
        # The epoch must be durable before any record that names it.
        os.pwrite(seg.fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, seg.epoch), 0)
        os.fdatasync(seg.fd)
        self._active = seg
        if not self._spares:
            self._wake.set()  # prepare the next one off the hot path
        return seg

    def _new_segment(self) -> _Segment:
        """A pre-zeroed, fsynced segment file, locked before its name is visible to recovery."""
        name = uuid.uuid4().hex
        tmp = os.path.join(self.folder, f"{name}.new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Real zeros, not fallocate: writing into unwritten extents would make every fdatasync
            # commit the journal (extent conversion), which is the cost this log exists to avoid.
            for offset in range(0, self.segment_bytes, len(_ZEROS)):
                os.pwrite(fd, _ZEROS[: min(len(_ZEROS), self.segment_bytes - offset)], offset)
            os.fsync(fd)
            path = os.path.join(self.folder, f"{name}.wal")
            os.rename(tmp, path)
            fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            raise
        return _Segment(path, fd, self.segment_bytes)

    # -- checkpointing --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(min(1.0, self.checkpoint_s))
            self._wake.clear()
            try:
                self._maybe_retire_idle()
                self.checkpoint()
                self._keep_a_spare()
            except Exception:
                log.exception("write-ahead log checkpoint failed (will retry)")
                self._stop.wait(1.0)

    def _maybe_retire_idle(self) -> None:
        with self._cond:
            seg = self._active
            if seg is not None and seg.records and time.monotonic() - seg.opened_at >= self.checkpoint_s:
                self._full.append(seg)
                self._active = None  # the next append activates a spare

    def _keep_a_spare(self) -> None:
        with self._cond:
            if self._spares or self._closed:
                return
        seg = self._new_segment()
        with self._cond:
            self._spares.append(seg)
            self._cond.notify_all()

    def checkpoint(self) -> int:
        """Make the files of retired segments durable and recycle the segments; returns how many."""
        with self._cond:
            ready = [s for s in self._full if s.writers == 0]
        if not ready:
            return 0
        sync_filesystem(self.fs_root)  # every object file and folder written so far
        with self._cond:
            for seg in ready:
                self._full.remove(seg)
                # Invalidate the header so a recovery does not replay records already durable as files.
                os.pwrite(seg.fd, bytes(_SEGMENT_HEADER.size), 0)
                if len(self._spares) < 2 and not self._closed:
                    self._spares.append(seg)
                else:
                    os.unlink(seg.path)
                    seg.close()
            self.checkpoints += 1
        return len(ready)

    def close(self) -> None:
        """Checkpoint everything and remove the segments (a clean shutdown leaves no log)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if self._active is not None:
                self._full.append(self._active)
                self._active = None
            while any(s.writers for s in self._full):
                self._cond.wait(1.0)
        self._stop.set()
        self._wake.set()
        self._thread.join(30)
        self.checkpoint()
        with self._cond:
            for seg in self._spares:
                os.unlink(seg.path)
                seg.close()
            self._spares.clear()
        fsync_dir(self.folder)


# -- recovery -----------------------------------------------------------------------------------

def read_records(data: bytes | memoryview) -> Iterator[tuple[str, memoryview]]:
    """The valid records of one segment's bytes, in order, up to the first torn or stale one."""
    view = memoryview(data)
    if len(view) < DATA_START:
        return
    magic, epoch = _SEGMENT_HEADER.unpack_from(view, 0)
    if magic != SEGMENT_MAGIC or not epoch:
        return
    pos = DATA_START
    while pos + _RECORD_HEADER.size <= len(view):
        rmagic, repoch, length, digest = _RECORD_HEADER.unpack_from(view, pos)
        start = pos + _RECORD_HEADER.size
        if rmagic != RECORD_MAGIC or repoch != epoch or start + length > len(view):
            return
        body = view[start:start + length]
        if blake3.blake3(body).digest() != digest:
            return  # torn: the write never finished, so it was never acknowledged
        yield digest.hex(), body
        pos = start + length


def recover(folder: str, fs_root: str, restore: Callable[[str, memoryview], None]) -> int:
    """Replay the segments no live process holds; returns the number of records replayed.

    ``restore(digest, data)`` makes the object's file hold ``data`` (written, not yet synced);
    one ``syncfs`` then makes them durable before the segments are removed.
    """
    if not os.path.isdir(folder):
        return 0
    replayed = 0
    claimed: list[tuple[str, int]] = []
    try:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".new"):
                _remove_if_orphan(path)
                continue
            if not name.endswith(".wal"):
                continue
            fd = _lock_if_orphan(path)
            if fd is None:
                continue
            claimed.append((path, fd))
            with open(path, "rb") as f:
                data = f.read()
            for digest, body in read_records(data):
                restore(digest, body)
                replayed += 1
        if claimed:
            sync_filesystem(fs_root)
            for path, _ in claimed:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            fsync_dir(folder)
    finally:
        for _, fd in claimed:
            os.close(fd)
    if replayed:
        log.warning("write-ahead log: replayed %d records from %d orphaned segments", replayed, len(claimed))
    return replayed


def _remove_if_orphan(path: str) -> None:
    """A segment still being zeroed by a process that died: nothing in it was ever written."""
    fd = _lock_if_orphan(path)
    if fd is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
