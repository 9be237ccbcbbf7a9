"""Driving consumer-group members as real processes and checking what they did.

Shared by the group tests (single node and cluster) and bench/groups.py: a paced publisher that
retries until JetStream acknowledges (so "acknowledged" is exact even across a leader kill), worker
processes (tests/group_worker.py), and the analysis of their per-call logs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nats

from shared.bus.jetstream import ensure_stream
from shared.config import StreamConfig
from shared.contract.subjects import instance_stream_config

REPO = Path(__file__).resolve().parent.parent


def create_stream(url: str, partitions: int, replicas: int = 1, name: str = "DICOM") -> None:
    """The partitioned instance stream, exactly as the services declare it."""
    async def go():
        nc = await nats.connect(servers=url.split(","))
        try:
            cfg = StreamConfig(name=name, partitions=partitions, replicas=replicas, duplicate_window_s=120)
            await ensure_stream(nc, instance_stream_config(cfg))
        finally:
            await nc.close()
    asyncio.run(go())


def sop_names(studies: int, instances: int, concurrent: int = 10) -> list[tuple[str, str]]:
    """(study token, sop token) of every instance; ``concurrent`` studies arrive interleaved (several
    modalities sending at once), so a study's instances span membership changes."""
    out = []
    for first in range(0, studies, concurrent):
        block = range(first, min(first + concurrent, studies))
        out += [(f"st{s:04d}", f"st{s:04d}i{i:03d}") for i in range(instances) for s in block]
    return out


class Publisher(threading.Thread):
    """Publishes instance events at about ``rate``/s, each retried until acknowledged."""

    def __init__(self, url: str, items: list[tuple[str, str]], rate: float, window: int = 25):
        super().__init__(daemon=True)
        self.url = url
        self.items = items
        self.rate = rate
        self.window = window
        self.acked: set[str] = set()
        self.retries = 0
        self.error: BaseException | None = None
        self.max_stall_s = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._go())
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    async def _one(self, js, study: str, sop: str) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await js.publish(f"dicom.in.{study}.{sop}", b'{"sop":"%s"}' % sop.encode(), timeout=2.0,
                                 headers={"Nats-Msg-Id": sop})
                self.acked.add(sop)
                return
            except Exception:
                self.retries += 1
                self.max_stall_s = max(self.max_stall_s, time.monotonic() - t0)
                await asyncio.sleep(0.2)

    async def _go(self) -> None:
        nc = await nats.connect(servers=self.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.25)
        js = nc.jetstream()
        t0 = time.monotonic()
        for i in range(0, len(self.items), self.window):
            if self.stop.is_set():
                break
            chunk = self.items[i:i + self.window]
            await asyncio.gather(*(self._one(js, st, sop) for st, sop in chunk))
            ahead = t0 + (i + len(chunk)) / self.rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await nc.close()


@dataclass
class Worker:
    """One tests/group_worker.py process."""

    member: str
    log: Path
    proc: subprocess.Popen
    killed_at: float | None = None

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            out = self.log.with_suffix(".out")
            raise AssertionError(f"{self.member} exited with {self.proc.returncode}: "
                                 f"{out.read_text()[-2000:] if out.exists() else ''}")
        return self.log.exists() and f"R {self.member} " in self.log.read_text()

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.killed_at = time.monotonic()

    def sigterm(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_worker(tmp: Path, url: str, member: str, *extra: str) -> Worker:
    log = tmp / f"{member}.log"
    out = open(tmp / f"{member}.out", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tests.group_worker", "--nats", url, "--member", member,
                             "--log", str(log), *extra], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return Worker(member, log, proc)


def init_db(db: Path) -> Path:
    """The shared record of handled instances (what the workers' idempotent 'store' writes)."""
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS recorded (sop TEXT PRIMARY KEY, study TEXT, member TEXT)")
    return db


def recorded_count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("SELECT count(*) FROM recorded").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0


def recorded_sops(db: Path) -> set[str]:
    with sqlite3.connect(db, timeout=30) as con:
        return {r[0] for r in con.execute("SELECT sop FROM recorded")}


@dataclass
class Call:
    partition: int
    member: str
    start: float
    end: float
    study: str
    sop: str
    delivered: int
    outcome: str
    completed: bool


@dataclass
class Analysis:
    calls: list[Call] = field(default_factory=list)
    unfinished_graceful: list[Call] = field(default_factory=list)
    partition_overlaps: list[tuple[Call, Call]] = field(default_factory=list)
    study_overlaps: list[tuple[Call, Call]] = field(default_factory=list)
    new_per_sop: dict[str, int] = field(default_factory=dict)

    def completed_sops(self) -> set[str]:
        return {c.sop for c in self.calls if c.completed}

    def redelivered(self) -> int:
        return sum(1 for c in self.calls if c.delivered > 1)

    def members_per_study(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = defaultdict(set)
        for c in self.calls:
            out[c.study].add(c.member)
        return out


def _overlaps(calls: list[Call]) -> list[tuple[Call, Call]]:
    """Pairs of calls whose intervals intersect (sweep over start times)."""
    found = []
    ordered = sorted(calls, key=lambda c: c.start)
    latest: Call | None = None
    for c in ordered:
        if latest is not None and c.start < latest.end:
            found.append((latest, c))
        if latest is None or c.end > latest.end:
            latest = c
    return found


def analyse(workers: list[Worker]) -> Analysis:
    """Pair every call's start and end line; a call a kill -9 interrupted ends at the kill."""
    res = Analysis()
    for w in workers:
        if not w.log.exists():
            continue
        open_calls: dict[tuple[str, str], tuple[int, float, str, int]] = {}
        for line in w.log.read_text().splitlines():
            f = line.split()
            if f[0] == "S":
                open_calls[(f[3], f[5])] = (int(f[1]), float(f[3]), f[4], int(f[6]))
            elif f[0] == "E":
                open_calls.pop((f[3], f[6]), None)
                res.calls.append(Call(int(f[1]), f[2], float(f[3]), float(f[4]), f[5], f[6], int(f[7]), f[8], True))
                if f[8] == "new":
                    res.new_per_sop[f[6]] = res.new_per_sop.get(f[6], 0) + 1
        for (_, sop), (p, start, study, delivered) in open_calls.items():
            end = w.killed_at if w.killed_at is not None else float("inf")
            call = Call(p, w.member, start, end, study, sop, delivered, "?", False)
            res.calls.append(call)
            if w.killed_at is None:
                res.unfinished_graceful.append(call)
    by_part: dict[int, list[Call]] = defaultdict(list)
    by_study: dict[str, list[Call]] = defaultdict(list)
    for c in res.calls:
        by_part[c.partition].append(c)
        by_study[c.study].append(c)
    for calls in by_part.values():
        res.partition_overlaps.extend(_overlaps(calls))
    for calls in by_study.values():
        res.study_overlaps.extend((a, b) for a, b in _overlaps(calls) if a.member != b.member)
    return res
