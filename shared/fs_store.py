"""Filesystem object store: one file per object under ``ab/cd/<digest>``, fsynced before put returns."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .config import BackendConfig
from .objectstore import CorruptObject, ObjectMissing, check_digest, content_digest


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileObjectStore:
    """Content-addressed objects in a directory; the embedded default's staging and storage."""

    def __init__(self, name: str, cfg: BackendConfig, data_dir: Path):
        self.name = name
        root = Path(cfg.path)
        self.root = root if root.is_absolute() else Path(data_dir) / root
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Plain strings on the put path: pathlib costs more than the syscalls for small instances.
        self._root = str(self.root)
        self._tmp = str(self.tmp)
        self._folders: set[str] = set()
        self._make_top_folders()

    def path(self, digest: str) -> Path:
        """Where the object with ``digest`` lives."""
        check_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    def put(self, digest: str, data: bytes | bytearray | memoryview, meta: dict[str, str] | None = None) -> None:
        check_digest(digest)
        folder = f"{self._root}/{digest[:2]}/{digest[2:4]}"
        final = f"{folder}/{digest}"
        if os.path.exists(final):
            return  # content-addressed: the same key holds the same bytes
        created = [] if folder in self._folders else self._make_folder(folder)  # parents to fsync
        tmp = f"{self._tmp}/{digest}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:  # the remembered folder was removed behind our back
            self._folders.discard(folder)
            created = self._make_folder(folder)
            os.replace(tmp, final)
        # The rename is durable only once the directory entry is: fsync the parent. A folder created
        # for this object is durable once its own entry is: fsync its parent too. These come last, so
        # on a journalling filesystem the file's fsync already committed the mkdirs (a flush, no commit).
        _fsync_dir(folder)
        for parent in created:
            _fsync_dir(parent)
        if created and len(self._folders) < 70_000:  # 256 + 65,536 shards at most
            # Only now: another thread of this process may skip these fsyncs once the folder is known.
            self._folders.add(os.path.dirname(folder))
            self._folders.add(folder)

    def _make_top_folders(self) -> None:
        """The 256 first-level folders, made once and durably, so puts only ever create the second level."""
        made = False
        for i in range(256):
            try:
                os.mkdir(f"{self._root}/{i:02x}")
                made = True
            except FileExistsError:
                pass
        if made:
            _fsync_dir(self._root)
        self._folders.update(f"{self._root}/{i:02x}" for i in range(256))

    def _make_folder(self, folder: str) -> list[str]:
        """Create a shard folder (and its parent); returns the directories whose entries must be fsynced.

        Remembered, so later puts skip the syscalls. A folder that already existed may have been made
        by another process that has not fsynced it yet, so its parents are synced on first use too.
        """
        created = []
        for path in (os.path.dirname(folder), folder):
            if path in self._folders:
                continue  # made durable by an earlier put of this process
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            created.append(os.path.dirname(path))
        return created[::-1]

    def get(self, digest: str) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(digest) from None
        if content_digest(data) != digest:
            raise CorruptObject(f"{self.name}: object {digest} does not match its digest")
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def location(self, digest: str) -> str:
        return f"file://{self.path(digest).resolve()}"

    def close(self) -> None:
        pass
