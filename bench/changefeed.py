"""Change feed reading cost: pages of the DICOM_CHANGES stream as an administrator (every entry) and as a tenant that
owns a small share of a busy feed (its pages skip the others' entries inside the reader), on a real nats-server.

Publishes ``--events`` InstanceStored events (``--share`` of them the small tenant's) to the events stream, waits
for the server to copy them into the feed, then reads it with ``shared.changefeed.reading`` as the HTTP service and
``dicomflow events`` do (pages of ``--page``). Prints one JSON line: entries per second for each reader, the
time of a whole page, and of an empty poll at the tail (what a caught-up follower pays each time).

    .venv/bin/python bench/changefeed.py --events 20000 --share 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats  # noqa: E402

from bench._support import log  # noqa: E402
from dicomflow.natsserver import NatsServer, free_port  # noqa: E402
from shared.bus.connection import ensure_streams  # noqa: E402
from shared.changefeed import reading  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.contract import events  # noqa: E402
from shared.contract.subjects import CHANGES_STREAM  # noqa: E402


def stored(i: int, tenant: str) -> events.InstanceStored:
    tags = events.InstanceTags(study_uid=f"1.2.{i // 100}", series_uid=f"1.2.{i // 100}.1", sop_uid=f"1.2.{i}")
    return events.InstanceStored(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest=f"{i:064x}", size=1000,
                                 policy="default", placements=["fs"], calling_ae="CT", stored_at=datetime.now(UTC),
                                 tenant=tenant)


async def read_all(nc, access, scope: str | None, page: int) -> tuple[int, float, float]:
    """(entries, seconds, slowest page) reading the whole feed page by page from sequence 1."""
    n, cursor, slowest = 0, 1, 0.0
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        got = await reading.read(nc, access, scope, page, cursor)
        slowest = max(slowest, time.perf_counter() - t)
        if not got.changes:
            break
        n += len(got.changes)
        cursor = got.through + 1
    return n, time.perf_counter() - t0, slowest


async def run(args: argparse.Namespace, work: Path) -> dict:
    server = NatsServer(work / "nats", free_port(), 0, log_file=work / "nats.log").start()
    try:
        config = load_config(overrides={"nats": {"url": server.url}}, environ={})
        nc = await nats.connect(server.url)
        await ensure_streams(nc, config)
        js = nc.jetstream()
        every = max(1, round(1 / args.share)) if args.share > 0 else 0
        t0 = time.perf_counter()
        for start in range(0, args.events, 1000):
            await asyncio.gather(*(js.publish(e.subject(), e.model_dump_json().encode())
                                   for e in (stored(i, "small" if every and i % every == 0 else "big")
                                             for i in range(start, min(start + 1000, args.events)))))
        while (await reading.bounds(nc)).last < args.events:
            await asyncio.sleep(0.1)
        log(f"{args.events} events published and copied into {CHANGES_STREAM} in {time.perf_counter() - t0:.1f} s")
        out: dict = {"events": args.events, "share": args.share, "page": args.page}
        for name, scope in (("admin", None), ("small_tenant", "small")):
            n, secs, slowest = await read_all(nc, config.access, scope, args.page)
            t = time.perf_counter()
            tail = await reading.read(nc, config.access, scope, args.page, args.events + 1)
            assert not tail.changes
            out[name] = {"entries": n, "seconds": round(secs, 2), "entries_per_s": round(n / secs),
                         "slowest_page_ms": round(slowest * 1000, 1),
                         "empty_tail_poll_ms": round((time.perf_counter() - t) * 1000, 1)}
            log(f"{name}: {out[name]}")
        t = time.perf_counter()
        await reading.latest(nc, config.access, "small")
        out["small_tenant"]["latest_ms"] = round((time.perf_counter() - t) * 1000, 1)
        await nc.close()
        return out
    finally:
        server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20000, help="stored events in the feed (default 20000)")
    p.add_argument("--share", type=float, default=0.01, help="the small tenant's share of them (default 0.01)")
    p.add_argument("--page", type=int, default=200, help="entries per page (default 200, the HTTP maximum)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-changefeed-") as tmp:
        print(json.dumps(asyncio.run(run(args, Path(tmp)))))


if __name__ == "__main__":
    main()
