"""Filesystem object store: one file per object under ``ab/<digest>``, durable before put returns.

Small objects are made durable through the write-ahead log of :mod:`shared.fs_wal`; their file is
then made visible by background threads (synced by a later checkpoint), because creating and renaming
a file waits for the filesystem's journal whenever another process commits (1-5 ms per instance
measured under load, against 0.1-0.5 ms for the log). Until it is visible, this process reads the
object from memory and any process from the log, through the locator ``put`` returned. Large
objects are made durable by fsyncing their file and its folder.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from . import fs_wal
from .config import BackendConfig
from .fs_wal import fsync_dir as _fsync_dir
from .objectstore import CorruptObject, ObjectMissing, check_digest, content_digest

log = logging.getLogger("dicomflow.fs_store")

# Bytes of logged objects whose files are not visible yet; a put beyond it waits (back-pressure).
_BACKGROUND_BYTES = 64 * 1024 * 1024
_BACKGROUND_THREADS = 2


def _write(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FileObjectStore:
    """Content-addressed objects in a directory; the embedded default's staging and storage.

    One level of 256 folders (``ab/<digest>``), made durably when the store opens: a put never
    creates a folder (a mkdir costs as much as an fsync here, measured). ext4 and XFS index large
    directories, so 256 folders hold tens of millions of objects.
    """

    def __init__(self, name: str, cfg: BackendConfig, data_dir: Path):
        self.name = name
        root = Path(cfg.path)
        self.root = root if root.is_absolute() else Path(data_dir) / root
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Plain strings on the put path: pathlib costs more than the syscalls for small instances.
        self._root = str(self.root)
        self._tmp = str(self.tmp)
        self._make_folders()
        self._wal_dir = str(self.root / "wal")
        self._wal_max = min(cfg.wal_max_object_bytes, cfg.wal_segment_bytes - fs_wal.DATA_START - 64)
        self._wal_cfg = (cfg.wal_segment_bytes, cfg.wal_checkpoint_s)
        self._wal: fs_wal.WriteAheadLog | None = None
        self._wal_lock = threading.Lock()
        self._background = cfg.wal_background_files
        self._pending: dict[str, tuple[bytes, str]] = {}  # logged, file not visible yet: (bytes, locator)
        self._pending_bytes = 0
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._closing = False
        self._stuck = 0  # objects whose file could not be made: left in the log for recovery
        # Before anything reads or writes: objects a crashed process acknowledged are only in its log.
        fs_wal.recover(self._wal_dir, self._root, self._restore)

    def _final(self, digest: str) -> tuple[str, str]:
        folder = f"{self._root}/{digest[:2]}"
        return folder, f"{folder}/{digest}"

    def path(self, digest: str) -> Path:
        """Where the object with ``digest`` lives."""
        check_digest(digest)
        return self.root / digest[:2] / digest

    def put(self, digest: str, data: bytes | bytearray | memoryview, meta: dict[str, str] | None = None) -> str:
        """Store ``data``; durable when it returns. Returns a locator for :meth:`get` / :meth:`exists` in
        other processes while the file is not visible yet ("" when there is none)."""
        check_digest(digest)
        folder, final = self._final(digest)
        pending = self._pending.get(digest)
        if pending is not None:
            return pending[1]  # content-addressed: the same key holds the same bytes
        if os.path.exists(final):
            return ""
        if len(data) <= self._wal_max:
            ticket = self._log().append(digest, data)  # durable from here on
            if not self._background:
                try:
                    self._materialize(folder, final, digest, data)
                finally:
                    self._log().release(ticket)
                return ticket.locator
            self._hand_over(folder, final, digest, data if isinstance(data, bytes) else bytes(data), ticket)
            return ticket.locator
        tmp = f"{self._tmp}/{digest}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rename(tmp, folder, final)
        # The rename is durable only once the directory entry is. It comes last, so on a journalling
        # filesystem the file's fsync already committed the file itself (this is one more commit).
        _fsync_dir(folder)
        return ""

    # -- files made visible in the background ---------------------------------------------------

    def _hand_over(self, folder: str, final: str, digest: str, body: bytes, ticket: fs_wal.Ticket) -> None:
        with self._cond:
            while self._pending_bytes > _BACKGROUND_BYTES and self._queue:
                self._cond.wait(1.0)
            first = digest not in self._pending  # the same object put twice at once: one entry
            if first:
                self._pending[digest] = (body, ticket.locator)
                self._pending_bytes += len(body)
            self._queue.append((folder, final, digest, body, ticket, first))
            while len(self._workers) < _BACKGROUND_THREADS:
                worker = threading.Thread(target=self._make_files, name=f"fs-files-{len(self._workers)}", daemon=True)
                self._workers.append(worker)
                worker.start()
            self._cond.notify_all()

    def _make_files(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                folder, final, digest, body, ticket, first = self._queue.popleft()
            for attempt in range(3):
                try:
                    self._materialize(folder, final, digest, body)
                    break
                except OSError as exc:
                    log.warning("object %s: its file could not be made (%s)%s", digest, exc,
                                "; it stays in the write-ahead log and is replayed at the next start"
                                if attempt == 2 else ", retrying")
                    time.sleep(0.2)
            else:
                with self._cond:
                    self._stuck += 1  # the ticket stays held: its segment is never recycled
                continue
            self._log().release(ticket)
            if first:
                with self._cond:
                    del self._pending[digest]
                    self._pending_bytes -= len(body)
                    self._cond.notify_all()

    def _log(self) -> fs_wal.WriteAheadLog:
        """This process's write-ahead log, started by the first small put (readers never start one)."""
        if self._wal is None:
            with self._wal_lock:
                if self._wal is None:
                    self._wal = fs_wal.WriteAheadLog(self._wal_dir, self._root, *self._wal_cfg)
        return self._wal

    def _materialize(self, folder: str, final: str, digest: str, data: bytes | bytearray | memoryview) -> None:
        """Make the object's file visible, without syncing: the log (or a checkpoint) holds it durably."""
        tmp = f"{self._tmp}/{digest}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write(fd, data)
        finally:
            os.close(fd)
        self._rename(tmp, folder, final)

    def _rename(self, tmp: str, folder: str, final: str) -> None:
        try:
            os.replace(tmp, final)
        except FileNotFoundError:  # the folder was removed behind our back
            os.mkdir(folder)
            _fsync_dir(self._root)
            os.replace(tmp, final)

    def _restore(self, digest: str, data: memoryview) -> None:
        """Recovery: rewrite an object whose file a crash left missing or torn."""
        check_digest(digest)
        folder, final = self._final(digest)
        try:
            with open(final, "rb") as f:
                if content_digest(f.read()) == digest:
                    return
        except FileNotFoundError:
            pass
        self._materialize(folder, final, digest, data)

    def _make_folders(self) -> None:
        """The 256 folders, made once and durably."""
        made = False
        for i in range(256):
            try:
                os.mkdir(f"{self._root}/{i:02x}")
                made = True
            except FileExistsError:
                pass
        if made:
            _fsync_dir(self._root)

    def get(self, digest: str, locator: str = "") -> bytes:
        """The object's bytes, verified; ``locator`` (from :meth:`put`) finds one whose file is not visible yet."""
        pending = self._pending.get(digest)
        if pending is not None:
            return pending[0]
        for attempt in range(2):
            try:
                data = self.path(digest).read_bytes()
                break
            except FileNotFoundError:
                pass
            try:
                data = self._legacy_path(digest).read_bytes()
                break
            except FileNotFoundError:
                pass
            # Not visible yet: in the log. If the log no longer has it, its file exists by now.
            logged = fs_wal.read_at(self._wal_dir, locator, digest) if locator and attempt == 0 else None
            if logged is not None:
                return logged
        else:
            raise ObjectMissing(digest)
        if content_digest(data) != digest:
            raise CorruptObject(f"{self.name}: object {digest} does not match its digest")
        return data

    def exists(self, digest: str, locator: str = "") -> bool:
        """Whether the object is stored; ``locator`` (from :meth:`put`) finds one whose file is not visible yet."""
        _, final = self._final(check_digest(digest))
        if digest in self._pending or os.path.exists(final) or self._legacy_path(digest).exists():
            return True
        if locator and fs_wal.read_at(self._wal_dir, locator, digest) is not None:
            return True
        return os.path.exists(final)

    def _legacy_path(self, digest: str) -> Path:
        """Where versions before the write-ahead log kept an object (``ab/cd/<digest>``): still read."""
        return self.root / digest[:2] / digest[2:4] / digest

    def location(self, digest: str) -> str:
        return f"file://{self.path(digest).resolve()}"

    def close(self) -> None:
        """Make the pending files, checkpoint and remove this process's log: after a clean stop every
        file is durable on its own (objects whose file could not be made stay in the log for recovery)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()
        self._workers.clear()
        if self._wal is not None:
            if self._stuck:
                log.error("%d objects are only in the write-ahead log; they are replayed when the store next opens",
                          self._stuck)
                self._wal.abandon()
            else:
                self._wal.close()
            self._wal = None
