"""A consumer-group member as a real OS process, for the group tests and bench/groups.py.

Its handler logs every message it handles to an append-only file (one ``os.write`` per line, so a kill -9 loses
nothing written) and records each instance idempotently in a shared SQLite file, like the store's
index: ``S`` when a call starts, ``E`` with the outcome (``new``/``dup``) when it ends. SIGTERM is
a graceful leave.

    python -m tests.group_worker --nats URL[,URL..] --member w1 --log w1.log [--db rec.sqlite] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import time

import nats

from shared.bus.consumer_group import AllPartitions, PartitionedConsumer
from shared.bus.membership import ElasticOwnership
from shared.config import GroupConfig
from shared.contract.events import Event
from shared.contract.subjects import partition_from_subject


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats", required=True)
    ap.add_argument("--stream", default="DICOM")
    ap.add_argument("--group", default="grp")
    ap.add_argument("--member", required=True)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--log", required=True, help="per-call log file (S/E lines), or the count summary in count mode")
    ap.add_argument("--db", default="", help="SQLite file recording each instance once")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds of simulated work per call")
    ap.add_argument("--mode", choices=["record", "count"], default="record")
    ap.add_argument("--static", action="store_true", help="own every partition (no membership)")
    ap.add_argument("--ttl", type=float, default=2.0)
    ap.add_argument("--heartbeat", type=float, default=0.5)
    ap.add_argument("--pinned", type=float, default=3.0)
    ap.add_argument("--ack-wait", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gate", default="", help="own nothing until this file exists (a common start line)")
    return ap.parse_args(argv)


class Recorder:
    """The handler: log the call, do the 'work', record the instance once."""

    def __init__(self, args: argparse.Namespace):
        self.member = args.member
        self.delay = args.delay
        self.fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.db = None
        if args.db:
            # The file is created (WAL, table) by the test before any worker starts: switching the
            # journal mode from several processes at once fails with "database is locked".
            self.db = sqlite3.connect(args.db, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA synchronous=NORMAL")

    def line(self, text: str) -> None:
        os.write(self.fd, (text + "\n").encode())

    async def handle(self, deliveries) -> list[None]:
        for d in deliveries:
            await self._one(d.subject, d.delivered)
        return [None] * len(deliveries)

    async def _one(self, subject: str, delivered: int) -> None:
        _, _, part, study, sop = subject.split(".")
        p = partition_from_subject(subject)
        start = time.monotonic()
        self.line(f"S {p} {self.member} {start:.6f} {study} {sop} {delivered}")
        if self.delay:
            await asyncio.sleep(self.delay)
        outcome = "-"
        if self.db is not None:
            cur = self.db.execute("INSERT OR IGNORE INTO recorded VALUES (?, ?, ?)", (sop, study, self.member))
            outcome = "new" if cur.rowcount == 1 else "dup"
        self.line(f"E {p} {self.member} {start:.6f} {time.monotonic():.6f} {study} {sop} {delivered} {outcome}")


class Gated:
    """An ownership that owns nothing until the gate file exists (members join first, start together)."""

    def __init__(self, inner, gate: str):
        self.inner = inner
        self.gate = gate
        self.open = False

    def set_reporter(self, report) -> None:
        self.inner.set_reporter(report)

    async def start(self) -> None:
        await self.inner.start()

    def owned(self) -> set[int]:
        self.open = self.open or os.path.exists(self.gate)
        return self.inner.owned() if self.open else set()

    async def live_pins(self) -> set[str] | None:
        return await self.inner.live_pins()

    async def stop(self) -> None:
        await self.inner.stop()


class Counter:
    """A no-op handler that only counts (throughput runs)."""

    def __init__(self):
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    async def handle(self, deliveries) -> list[None]:
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.count += len(deliveries)
        self.last = now
        return [None] * len(deliveries)


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"{args.member} %(levelname)s %(name)s: %(message)s")
    nc = await nats.connect(servers=args.nats.split(","), name=args.member, max_reconnect_attempts=-1,
                            reconnect_time_wait=0.25)
    cfg = GroupConfig(ack_wait_s=args.ack_wait, pinned_timeout_s=args.pinned, member_ttl_s=args.ttl,
                      heartbeat_s=args.heartbeat, batch=args.batch)
    worker = Recorder(args) if args.mode == "record" else Counter()
    ownership = (AllPartitions(args.partitions) if args.static
                 else ElasticOwnership(nc, args.group, args.member, args.partitions, cfg, args.replicas))
    if args.gate:
        ownership = Gated(ownership, args.gate)
    consumer = PartitionedConsumer(nc, args.stream, args.group, args.partitions, worker.handle, cfg, ownership,
                                   args.member, model=Event)  # the test payloads are no InstanceReceived
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await consumer.start()
    if isinstance(worker, Recorder):
        worker.line(f"R {args.member} {time.monotonic():.6f}")
    else:
        with open(args.log + ".ready", "w") as f:
            f.write("ready")
    await stop.wait()
    t0 = time.monotonic()
    await consumer.stop()
    await nc.drain()
    if isinstance(worker, Recorder):
        worker.line(f"X {args.member} {t0:.6f} {time.monotonic():.6f}")
    else:
        with open(args.log, "w") as f:
            json.dump({"member": args.member, "count": worker.count, "first": worker.first, "last": worker.last}, f)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
