"""The router's forward spool (services/router/spool.py): a live process's folder is kept by every sweep, a dead
one's removed; a send's folder goes with its files however the send ends. Real processes, a real filesystem."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from services.router.spool import Spool, sweep
from tests.helpers import REPO

HOLDER = """
import sys, time
from pathlib import Path
from services.router.spool import Spool
spool = Spool(Path(sys.argv[1]))
with spool.send_folder() as folder:
    (folder / "00000-1.2.3.dcm").write_bytes(b"x" * 4096)
    print(spool.path, flush=True)
    time.sleep(600)
"""


def test_a_live_process_spool_is_kept_and_a_dead_ones_removed(tmp_path):
    root = tmp_path / "spool"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        held = root / os.path.basename(holder.stdout.readline().strip())
        assert held.name.startswith(f"{holder.pid}-")
        mine = Spool(root)  # sweeps at start: the live holder's folder stays
        assert held.is_dir() and sweep(root) == (0, 0)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert sweep(root) == (1, 4096)
        assert not held.exists() and mine.path.is_dir()  # this process's own is kept: it holds it
        mine.close()
        assert list(root.iterdir()) == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_send_folder_is_removed_however_the_send_ends(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(RuntimeError):
        with spool.send_folder() as folder:
            (folder / "a.dcm").write_bytes(b"a")
            raise RuntimeError("the target refused")
    assert not folder.exists() and list(spool.path.iterdir()) == []
    spool.close()


def test_the_default_spool_is_the_users_own_in_the_system_temporary_folder(tmp_path):
    import tempfile
    from pathlib import Path

    from services.router.spool import spool_root

    assert spool_root("") == Path(tempfile.gettempdir()) / f"dicomflow-forward-{os.getuid()}"
    assert spool_root(str(tmp_path / "big-disk")) == tmp_path / "big-disk"
    spool = Spool(tmp_path / "fresh")
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700  # made by the spool: no one else's to write in
    spool.close()
