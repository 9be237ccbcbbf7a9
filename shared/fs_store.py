"""Filesystem object store: one file per object under ``ab/cd/<digest>``, fsynced before put returns."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .config import BackendConfig
from .objectstore import CorruptObject, ObjectMissing, check_digest, content_digest


class FileObjectStore:
    """Content-addressed objects in a directory; the embedded default's staging and storage."""

    def __init__(self, name: str, cfg: BackendConfig, data_dir: Path):
        self.name = name
        root = Path(cfg.path)
        self.root = root if root.is_absolute() else Path(data_dir) / root
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the object with ``digest`` lives."""
        check_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    def put(self, digest: str, data: bytes | bytearray | memoryview, meta: dict[str, str] | None = None) -> None:
        final = self.path(digest)
        if final.exists():
            return  # content-addressed: the same key holds the same bytes
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{digest}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        # The rename is durable only once the directory entry is: fsync the parent.
        dfd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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
