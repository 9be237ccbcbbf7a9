"""The SQLite catalogue: the embedded default (one file; several store processes may write it)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from shared.catalogue.sql import Dialect, SqlCatalogue


def _wal(conn: sqlite3.Connection, within_s: float = 30.0) -> None:
    """Switch to WAL. SQLite answers "database is locked" at once, without the busy timeout, while another
    process is creating or switching the same file (two store workers starting together): retry."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def open_sqlite(path: Path) -> SqlCatalogue:
    """The catalogue in the SQLite file at ``path`` (created with its schema when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE for writers, so two store
        # processes queue on the lock instead of failing on upgrade); reads run in autocommit.
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=True)
        _wal(conn)
        conn.execute("PRAGMA synchronous=FULL")  # a row is durable before the stored event is published
        conn.execute("PRAGMA case_sensitive_like=ON")  # DICOM matching is case-sensitive, as in PostgreSQL
        return conn

    return SqlCatalogue(Dialect("sqlite", connect, "?", begin_write="BEGIN IMMEDIATE"))
