"""Consumer-group benchmark: events/s through one member and through three, and the handover gap
(old owner's last message -> new owner's first message on a partition) for graceful leave and crash.

Members are real processes (tests/group_worker.py) on one nats-server started here. Ratios are
against the one-member run and against the crash bound (member TTL + PinnedTTL + 1 s) of the same
run. Last line: one JSON object.

    .venv/bin/python bench/groups.py [--events 30000] [--partitions 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomflow.natsserver import NatsServer, free_port  # noqa: E402
from shared.bus.consumer_group import durable_name  # noqa: E402
from shared.bus.jetstream import api  # noqa: E402
from tests.group_harness import (  # noqa: E402
    Publisher,
    Worker,
    analyse,
    create_stream,
    sop_names,
    start_worker,
)
from tests.helpers import wait_for  # noqa: E402

TTL, HEARTBEAT, PINNED, ACK_WAIT = 2.0, 0.5, 3.0, 6.0
TIMINGS = ["--ttl", str(TTL), "--heartbeat", str(HEARTBEAT), "--pinned", str(PINNED), "--ack-wait", str(ACK_WAIT)]


async def _publish_fast(url: str, n: int, tag: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    items = sop_names(max(1, n // 25), 25, concurrent=50)[:n]
    for i in range(0, len(items), 1000):
        await asyncio.gather(*(js.publish(f"dicom.in.{st}.{tag}{sop}", b'{"n":1}', timeout=30)
                               for st, sop in items[i:i + 1000]))
    await nc.close()


async def _lag(url: str, group: str, partitions: int) -> int:
    nc = await nats.connect(url)
    try:
        total = 0
        for p in range(partitions):
            try:
                ci = await api(nc, f"CONSUMER.INFO.DICOM.{durable_name(group, p)}")
            except Exception:
                return -1
            total += ci["num_pending"] + ci["num_ack_pending"]
        return total
    finally:
        await nc.close()


def throughput(tmp: Path, url: str, members: int, events: int, partitions: int) -> float:
    """No-op events/s of ``members`` members that join first and start on a common signal."""
    group = f"tp{members}"
    gate = tmp / f"{group}.go"
    ws = [start_worker(tmp, url, f"{group}m{i}", "--group", group, "--mode", "count", "--partitions",
                       str(partitions), "--gate", str(gate), *TIMINGS) for i in range(members)]
    try:
        wait_for(lambda: all((tmp / f"{w.member}.log.ready").exists() for w in ws), 60, what="members to join")
        time.sleep(2 * HEARTBEAT + 0.5)  # every member has read the full membership
        gate.write_text("go")
        wait_for(lambda: asyncio.run(_lag(url, group, partitions)) == 0, 300, interval=0.5, what=f"{group} to drain")
        for w in ws:
            w.sigterm(60)
        summaries = [json.loads(w.log.read_text()) for w in ws]
    finally:
        for w in ws:
            w.cleanup()
    counted = sum(s["count"] for s in summaries)
    active = [s for s in summaries if s["count"]]
    span = max(s["last"] for s in active) - min(s["first"] for s in active)
    print(f"  {members} member(s): {counted} events in {span:.2f}s, per member {[s['count'] for s in summaries]}")
    return counted / span if span > 0 else 0.0


def handovers(tmp: Path, url: str, partitions: int, rounds: int) -> dict:
    """A stays; B_k joins, settles, then leaves (SIGTERM) or dies (kill -9); gaps on B_k's partitions."""
    group = "ho"
    extra = ["--group", group, "--partitions", str(partitions), *TIMINGS]
    items = sop_names(2000, 25, concurrent=40)
    pub = Publisher(url, items, rate=400)
    a = start_worker(tmp, url, "A", *extra)
    workers: list[Worker] = [a]
    sessions: list[tuple[str, Worker, float]] = []
    try:
        wait_for(a.ready, 60, what="A to join")
        pub.start()
        for kind in ["graceful"] * rounds + ["crash"] * rounds:
            b = start_worker(tmp, url, f"B{len(sessions)}", *extra)
            workers.append(b)
            wait_for(b.ready, 60, what=f"{b.member} to join")
            wait_for(lambda b=b: b.log.read_text().count("\nE ") > 50, 60, what=f"{b.member} to work")
            time.sleep(1.0)
            t = time.monotonic()
            if kind == "graceful":
                b.sigterm(60)
            else:
                b.kill9()
            sessions.append((kind, b, t))
            # The partitions return to A; a crash's unacked messages come back after ack_wait.
            time.sleep(TTL + PINNED + 1.5 if kind == "crash" else 2.5)
        time.sleep(ACK_WAIT + 1)
        pub.stop.set()
        pub.join(60)
        acked = set(pub.acked)
        wait_for(lambda: acked <= analyse(workers).completed_sops(), 120, interval=1.0,
                 what="every published event handled")
        a.sigterm(60)
    finally:
        pub.stop.set()
        pub.join(30)
        for w in workers:
            w.cleanup()
    res = analyse(workers)
    gaps: dict[str, list[float]] = {"graceful": [], "crash": []}
    for kind, b, _t in sessions:
        b_calls = [c for c in res.calls if c.member == b.member]
        for p in {c.partition for c in b_calls}:
            last_b = max(c.end for c in b_calls if c.partition == p)
            after = [c.start for c in res.calls if c.member == "A" and c.partition == p and c.start >= last_b]
            if after:
                gaps[kind].append(min(after) - last_b)
    return {"gaps": gaps, "lost": len(acked - res.completed_sops()),
            "overlaps": len(res.partition_overlaps) + len(res.study_overlaps), "redelivered": res.redelivered(),
            "published": len(acked)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="graceful leaves and crashes, each")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-groups-") as d:
        tmp = Path(d)
        server = NatsServer(tmp / "nats", free_port(), free_port(), log_file=tmp / "nats.log").start()
        try:
            url = server.url
            create_stream(url, args.partitions)
            print(f"publishing {args.events} events on {args.partitions} partitions")
            asyncio.run(_publish_fast(url, args.events, "x"))
            one = throughput(tmp, url, 1, args.events, args.partitions)
            three = throughput(tmp, url, 3, args.events, args.partitions)
            print(f"events/s: one member {one:,.0f}, three members {three:,.0f} ({three / one:.2f}x)")
            ho = handovers(tmp, url, args.partitions, args.rounds)
        finally:
            server.kill()
    bound = TTL + PINNED + 1
    g, c = ho["gaps"]["graceful"], ho["gaps"]["crash"]
    print(f"graceful handover: {len(g)} partitions, p50 {pct(g, 50):.2f}s p95 {pct(g, 95):.2f}s (target <= 2s)")
    print(f"crash handover: {len(c)} partitions, p50 {pct(c, 50):.2f}s p95 {pct(c, 95):.2f}s "
          f"(bound {bound:.1f}s = TTL {TTL} + PinnedTTL {PINNED} + 1; p95/bound {pct(c, 95) / bound:.2f})")
    print(f"published {ho['published']}, lost {ho['lost']}, overlaps {ho['overlaps']}, "
          f"redelivered {ho['redelivered']}")
    print(json.dumps({
        "events_per_s_one_member": round(one), "events_per_s_three_members": round(three),
        "three_vs_one": round(three / one, 2),
        "graceful_handover_p50_s": round(pct(g, 50), 3), "graceful_handover_p95_s": round(pct(g, 95), 3),
        "crash_handover_p50_s": round(pct(c, 50), 3), "crash_handover_p95_s": round(pct(c, 95), 3),
        "crash_bound_s": bound, "handover_samples": {"graceful": len(g), "crash": len(c)},
        "lost": ho["lost"], "overlaps": ho["overlaps"], "redelivered": ho["redelivered"],
        "partitions": args.partitions, "events": args.events,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
