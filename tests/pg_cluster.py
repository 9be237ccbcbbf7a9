"""A throw-away PostgreSQL server for tests and benchmarks: ``initdb`` + ``pg_ctl`` on a free loopback port.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<version>/bin``). PostgreSQL
refuses to run as root, so as root the cluster is owned by and run as the ``postgres`` user the package
creates. fsync stays on: the catalogue's durability is part of what the tests check.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dicomflow.natsserver import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} is missing: install Debian's postgresql (make test does)")
    return path


class PgCluster:
    """One PostgreSQL server in ``root``; :attr:`dsn` names its database ``dicomflow``."""

    def __init__(self, root: Path | None = None):
        # Not under pytest's tmp_path: its folders are private to root, and the server runs as postgres.
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="dicomflow-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.dsn = f"postgresql://{self.user}@127.0.0.1:{self.port}/dicomflow"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> PgCluster:
        """initdb (C locale, trust on loopback), start, create the ``dicomflow`` database."""
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "--locale=C",
                  "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'"
                       "\nmax_connections = 200\nshared_buffers = 128MB\n")
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while True:
            res = self._run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                            "dicomflow", check=False)
            if res.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"createdb failed: {res.stderr}")
            time.sleep(0.2)

    def kill(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: like a crash, no checkpoint)."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        """Start it again on the same port and data (after :meth:`kill`)."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def new_database(self, name: str) -> str:
        """A fresh, empty database on this server; returns its DSN."""
        import psycopg
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        """Stop and remove the cluster."""
        self.kill("fast")
        shutil.rmtree(self.root, ignore_errors=True)
