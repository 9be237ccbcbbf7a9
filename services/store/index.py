"""The SQLite index of stored instances (the embedded default's catalogue).

Idempotent on (SOPInstanceUID, digest): recording the same instance twice changes nothing; a
different digest for a known SOP instance replaces the entry and reports the old digest.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shared.contract.events import InstanceReceived

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    policy TEXT NOT NULL,
    placements TEXT NOT NULL,
    patient_id TEXT,
    modality TEXT,
    institution_name TEXT,
    calling_ae TEXT,
    series_number INTEGER,
    instance_number INTEGER,
    series_description TEXT,
    received_at TEXT,
    stored_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
"""


@dataclass(frozen=True)
class Recorded:
    """What recording an instance did."""

    outcome: str  # "new", "same" or "replaced"
    replaced_digest: str | None = None


def _set_wal(conn: sqlite3.Connection, within_s: float = 30.0) -> None:
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


class Index:
    """Thread-safe access to the SQLite index (one connection per thread)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            _set_wal(conn)
            # FULL: a row is durable before the event is acknowledged.
            conn.execute("PRAGMA synchronous=FULL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def record(self, event: InstanceReceived, policy: str, placements: list[str], stored_at: str) -> Recorded:
        """Record a stored instance (idempotent)."""
        return self.record_batch([(event, policy, placements, stored_at)])[0]

    def record_batch(self, items: list[tuple[InstanceReceived, str, list[str], str]]) -> list[Recorded]:
        """Record several instances in one transaction: one fsync for all of them (group commit).

        Each item is (event, policy, placements, stored_at); the results are in the same order.
        """
        conn = self._conn()
        results: list[Recorded] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for event, policy, placements, stored_at in items:
                t = event.tags
                row = conn.execute("SELECT digest FROM instances WHERE sop_uid=?", (t.sop_uid,)).fetchone()
                if row is not None and row["digest"] == event.digest:
                    results.append(Recorded("same"))
                    continue
                conn.execute(
                    "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (t.sop_uid, t.study_uid, t.series_uid, t.sop_class_uid, event.transfer_syntax_uid, event.digest,
                     event.size, policy, json.dumps(placements), t.patient_id, t.modality, t.institution_name,
                     event.calling_ae, t.series_number, t.instance_number, t.series_description,
                     event.received_at.isoformat(), stored_at))
                results.append(Recorded("replaced", row["digest"]) if row is not None else Recorded("new"))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results

    def studies(self) -> list[dict]:
        """One summary per stored study."""
        rows = self._conn().execute(
            "SELECT study_uid, COUNT(*) AS instances, COUNT(DISTINCT series_uid) AS series, SUM(size) AS bytes,"
            " MAX(patient_id) AS patient_id, GROUP_CONCAT(DISTINCT modality) AS modalities,"
            " MAX(institution_name) AS institution_name, MAX(calling_ae) AS calling_ae,"
            " MIN(stored_at) AS first_stored, MAX(stored_at) AS last_stored"
            " FROM instances GROUP BY study_uid ORDER BY last_stored").fetchall()
        return [dict(r) for r in rows]

    def instances(self, study_uid: str) -> list[dict]:
        """Every instance of one study, in series/instance order."""
        rows = self._conn().execute(
            "SELECT * FROM instances WHERE study_uid=? ORDER BY series_number, series_uid, instance_number, sop_uid",
            (study_uid,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["placements"] = json.loads(d["placements"])
            out.append(d)
        return out

    def count(self) -> int:
        """Number of stored instances."""
        return self._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class GroupCommit:
    """Batches index records from concurrent handlers into one transaction per round.

    Handlers of different partitions arrive together; while one transaction commits (fsync), the
    next ones queue and go in the following transaction. Each caller still returns only after its
    own row is durable, so the ack-after-durable rule holds; one writer also means no lock waits.
    """

    def __init__(self, index: Index, max_batch: int = 256):
        self.index = index
        self.max_batch = max_batch
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._running = False

    async def record_many(self, items: list[tuple[InstanceReceived, str, list[str], str]]) -> list[Recorded]:
        """Record several instances (event, policy, placements, stored_at); returns once all are committed."""
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futs, strict=True))
        if not self._running:
            self._running = True
            asyncio.create_task(self._drain())
        return list(await asyncio.gather(*futs))

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                try:
                    results = await asyncio.to_thread(self.index.record_batch, [item for item, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._running = False

