"""Filesystem object store: one file per object under ``ab/<digest>``, durable before put returns.

Small objects are made durable through the write-ahead log of :mod:`shared.fs_wal` (their file is
visible at once and synced by a later checkpoint); large ones by fsyncing the file and its folder.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from . import fs_wal
from .config import BackendConfig
from .fs_wal import fsync_dir as _fsync_dir
from .objectstore import CorruptObject, ObjectMissing, check_digest, content_digest


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
        # Before anything reads or writes: objects a crashed process acknowledged are only in its log.
        fs_wal.recover(self._wal_dir, self._root, self._restore)

    def _final(self, digest: str) -> tuple[str, str]:
        folder = f"{self._root}/{digest[:2]}"
        return folder, f"{folder}/{digest}"

    def path(self, digest: str) -> Path:
        """Where the object with ``digest`` lives."""
        check_digest(digest)
        return self.root / digest[:2] / digest

    def put(self, digest: str, data: bytes | bytearray | memoryview, meta: dict[str, str] | None = None) -> None:
        check_digest(digest)
        folder, final = self._final(digest)
        if os.path.exists(final):
            return  # content-addressed: the same key holds the same bytes
        if len(data) <= self._wal_max:
            ticket = self._log().append(digest, data)  # durable from here on
            try:
                self._materialize(folder, final, digest, data)
            finally:
                self._log().release(ticket)
            return
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

    def prepare_writer(self) -> None:
        """Ready this process to write: its write-ahead log segments exist before the first put."""
        if self._wal_max > 0:
            self._log().prepare()

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

    def get(self, digest: str) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            try:
                data = self._legacy_path(digest).read_bytes()
            except FileNotFoundError:
                raise ObjectMissing(digest) from None
        if content_digest(data) != digest:
            raise CorruptObject(f"{self.name}: object {digest} does not match its digest")
        return data

    def exists(self, digest: str) -> bool:
        _, final = self._final(check_digest(digest))
        return os.path.exists(final) or self._legacy_path(digest).exists()

    def _legacy_path(self, digest: str) -> Path:
        """Where versions before the write-ahead log kept an object (``ab/cd/<digest>``): still read."""
        return self.root / digest[:2] / digest[2:4] / digest

    def location(self, digest: str) -> str:
        return f"file://{self.path(digest).resolve()}"

    def close(self) -> None:
        """Checkpoint and remove this process's log: after a clean stop every file is durable on its own."""
        if self._wal is not None:
            self._wal.close()
            self._wal = None
