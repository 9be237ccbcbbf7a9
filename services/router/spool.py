"""Where a router keeps the Part 10 files it is forwarding: one folder per process, removed when it dies.

A forwarded instance is copied from its object store to a file (verified chunk by chunk) and sent from
there, so the router's memory does not grow with the instance. The files of one send live in a folder of
their own, removed once the send is over, failed or not. A process killed mid-send cannot remove its
folder; the next router to start on the machine does: each process holds an advisory lock (``flock``) on
its folder for as long as it lives, the kernel drops it when the process dies, and a folder whose lock
can be taken belongs to no one. A lock rather than a pid: in a container every router is pid 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("dicomflow.router.spool")

# A folder being made is named so first (then locked, then renamed): a sweep takes one only once it is this old
# (what a router killed in between leaves).
_MAKING = ".making-"
_MAKING_AGE_S = 3600.0


def spool_root(configured: str) -> Path:
    """The folder every router process of this machine (of this user, by default) makes its own spool in."""
    # One per user by default: another user's routers could neither write in ours nor sweep it.
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"dicomflow-forward-{os.getuid()}"


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def sweep(root: Path) -> tuple[int, int]:
    """Remove the spools of processes that are gone (their lock is free); (folders, bytes) removed."""
    folders = size = 0
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0, 0
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or (
                    entry.name.startswith(_MAKING) and time.time() - entry.stat().st_mtime < _MAKING_AGE_S):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # swept by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live router's
            size += _size(Path(entry.path))
            shutil.rmtree(entry.path, ignore_errors=True)
            folders += 1
        finally:
            os.close(fd)
    if folders:
        log.warning("removed the forward spool of %d dead router(s) (%d bytes) in %s", folders, size, root)
    return folders, size


class Spool:
    """This process's spool folder under ``root``: locked while the process lives; :meth:`send_folder` per send."""

    def __init__(self, root: Path):
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        sweep(root)
        making = Path(tempfile.mkdtemp(prefix=_MAKING, dir=root))
        self._fd = os.open(making, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: no one else can hold it
        self.path = root / f"{os.getpid()}-{making.name[len(_MAKING):]}"
        making.rename(self.path)  # the lock stays with the folder (it is on the inode)

    @contextlib.contextmanager
    def send_folder(self) -> Iterator[Path]:
        """A fresh folder for one send's files, removed with them when the block ends (however it ends)."""
        folder = Path(tempfile.mkdtemp(dir=self.path))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Remove the folder and let go of it (a router that stops)."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._fd)
