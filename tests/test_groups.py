"""Study-affine consumer groups against real nats-server processes, members as real OS processes.

Members join and leave while studies stream in (2 -> 3 -> 1, one kill -9, one SIGTERM); every
handled message is logged (partition, member, start, end). Asserted: every acknowledged instance is
handled at least once and recorded exactly once, no two calls on one partition overlap, and no
study is processed by two members at the same time. On a 3-node cluster (R3) the same, plus a
kill -9 of the stream leader losing nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import nats
import pytest

from dicomflow.status import collect, format_text
from shared.bus.membership import ElasticOwnership, live_members, member_reports
from shared.config import load_config
from shared.contract.events import Event
from tests.group_harness import (
    REPO,
    Publisher,
    Worker,
    analyse,
    create_stream,
    init_db,
    recorded_count,
    recorded_sops,
    sop_names,
    start_worker,
)
from tests.helpers import wait_for
from tests.nats_cluster import NatsCluster

PARTITIONS = 8
# Short TTLs so a crash hands over in a few seconds: member TTL 2 s, PinnedTTL 3 s, ack_wait 6 s.
TIMINGS = ["--ttl", "2", "--heartbeat", "0.5", "--pinned", "3", "--ack-wait", "6"]


def _assert_sound(workers: list[Worker], acked: set[str], db) -> None:
    a = analyse(workers)
    assert not a.unfinished_graceful, f"a graceful member left calls unfinished: {a.unfinished_graceful[:3]}"
    missing = acked - a.completed_sops()
    assert not missing, f"{len(missing)} acknowledged instances never handled, e.g. {sorted(missing)[:5]}"
    assert recorded_sops(db) >= acked
    twice = {sop: n for sop, n in a.new_per_sop.items() if n > 1}
    assert not twice, f"recorded more than once: {list(twice.items())[:5]}"
    assert not a.partition_overlaps, f"concurrent calls on one partition: {a.partition_overlaps[:3]}"
    assert not a.study_overlaps, f"a study processed by two members at once: {a.study_overlaps[:3]}"
    return a


def _churn(tmp, url: str, replicas: int, studies: int, instances: int, rate: float):
    """2 members -> a third joins -> one is killed -9 -> one leaves on SIGTERM -> 1 member finishes."""
    create_stream(url, PARTITIONS, replicas)
    db = init_db(tmp / "recorded.sqlite")
    extra = ["--partitions", str(PARTITIONS), "--replicas", str(replicas), "--db", str(db), "--delay", "0.02",
             *TIMINGS]
    workers: list[Worker] = []
    try:
        w1, w2 = (start_worker(tmp, url, m, *extra) for m in ("w1", "w2"))
        workers += [w1, w2]
        wait_for(lambda: w1.ready() and w2.ready(), 60, what="two members to join")
        items = sop_names(studies, instances)
        total = len(items)
        pub = Publisher(url, items, rate)
        pub.start()
        wait_for(lambda: recorded_count(db) >= total * 0.15, 120, what="15% recorded")
        w3 = start_worker(tmp, url, "w3", *extra)
        workers.append(w3)
        wait_for(w3.ready, 60, what="w3 to join")
        wait_for(lambda: recorded_count(db) >= total * 0.4, 120, what="40% recorded")
        w2.kill9()
        wait_for(lambda: recorded_count(db) >= total * 0.65, 120, what="65% recorded")
        assert w3.sigterm(60) == 0
        pub.join(180)
        assert not pub.is_alive() and pub.error is None, pub.error
        assert len(pub.acked) == total
        wait_for(lambda: recorded_count(db) >= total, 120, interval=0.5, what="every instance recorded")
        assert w1.sigterm(60) == 0
        a = _assert_sound(workers, pub.acked, db)
        # Each member really took part, and membership changes moved studies sequentially.
        assert {c.member for c in a.calls} == {"w1", "w2", "w3"}
        spread = sorted(len(m) for m in a.members_per_study().values())
        print(f"calls {len(a.calls)}, redelivered {a.redelivered()}, members per study {spread[0]}..{spread[-1]}")
        return a
    finally:
        for w in workers:
            w.cleanup()


def test_membership_heartbeats_ttl_and_leave(tmp_path, nats_server):
    """In-process members: join, share the partitions, a silent member ages out, a leaver goes at once."""
    from shared.config import GroupConfig

    cfg = GroupConfig(member_ttl_s=1.5, heartbeat_s=0.3)

    async def go():
        nc = await nats.connect(nats_server.url)
        a = ElasticOwnership(nc, "g", "a", 8, cfg)
        b = ElasticOwnership(nc, "g", "b", 8, cfg)
        c = ElasticOwnership(nc, "g", "c", 8, cfg)
        await a.start()
        await b.start()
        await c.start()
        await asyncio.sleep(0.8)
        assert await live_members(nc, "g") == ["a", "b", "c"]
        owned = [a.owned(), b.owned(), c.owned()]
        assert sorted(p for s in owned for p in s) == list(range(8))
        # c goes silent (as after a crash): it ages out after the TTL, and a and b cover everything.
        c._task.cancel()
        t0 = time.monotonic()
        while "c" in await live_members(nc, "g"):
            await asyncio.sleep(0.1)
        assert time.monotonic() - t0 < 10
        await asyncio.sleep(0.8)
        assert a.owned() | b.owned() == set(range(8)) and not a.owned() & b.owned()
        # A member cut off from its own heartbeats fences itself.
        assert c.owned() == set() or time.monotonic() - c._last_ok <= cfg.member_ttl_s
        reports = await member_reports(nc, "g")
        assert set(reports) == {"a", "b"} and reports["a"]["member"] == "a"
        await b.stop()  # graceful: gone at once, not after the TTL
        assert await live_members(nc, "g") == ["a"]
        await asyncio.sleep(0.6)
        assert a.owned() == set(range(8))
        await a.stop()
        await nc.close()

    asyncio.run(go())


def test_group_churn_single_node(tmp_path, nats_server):
    a = _churn(tmp_path, nats_server.url, 1, studies=200, instances=25, rate=600)
    assert len(a.members_per_study()) == 200


def test_status_shows_members_owned_partitions_and_pins(tmp_path, nats_server):
    create_stream(nats_server.url, PARTITIONS)
    extra = ["--partitions", str(PARTITIONS), "--group", "store", *TIMINGS]
    workers = [start_worker(tmp_path, nats_server.url, m, *extra) for m in ("s1", "s2")]
    try:
        wait_for(lambda: all(w.ready() for w in workers), 60, what="members to join")
        from tests.group_harness import Publisher as Pub
        pub = Pub(nats_server.url, sop_names(8, 4), rate=500)
        pub.run()
        config = load_config(overrides={"nats": {"url": nats_server.url}, "stream": {"partitions": PARTITIONS}})

        async def status():
            nc = await nats.connect(nats_server.url)
            try:
                return await collect(nc, config)
            finally:
                await nc.close()

        def settled():
            st = asyncio.run(status())
            g = st["groups"].get("store")
            if not g or set(g["members"]) != {"s1", "s2"}:
                return None
            owned = [p for m in g["members"].values() for p in m["owned"]]
            if sorted(owned) != list(range(PARTITIONS)) or g["lag"]:
                return None
            return st
        st = wait_for(settled, 60, interval=0.5, what="status to show both members owning every partition, lag 0")
        g = st["groups"]["store"]
        assert "member s1" in format_text(st) and "member s2" in format_text(st)
        # The command a user runs shows the same.
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")},
               "DICOMFLOW__NATS__URL": nats_server.url, "DICOMFLOW__STREAM__PARTITIONS": str(PARTITIONS)}
        res = subprocess.run([sys.executable, "-m", "dicomflow", "status", "--json"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert set(json.loads(res.stdout)["groups"]["store"]["members"]) == {"s1", "s2"}
        for part in g["partitions"]:
            assert part["lag"] == 0 and "owner" in part
            if part["pinned_id"]:  # a partition that delivered has a pin, held by the member that owns it
                assert part["owner"] in ("s1", "s2")
                assert part["partition"] in g["members"][part["owner"]]["owned"]
    finally:
        for w in workers:
            w.sigterm(60)
            w.cleanup()


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path).start()
    yield c
    c.stop()


def test_group_churn_cluster_r3(tmp_path, cluster):
    a = _churn(tmp_path, cluster.url, 3, studies=200, instances=25, rate=400)
    assert len(a.members_per_study()) == 200


def test_stream_leader_kill_loses_nothing_acknowledged(tmp_path, cluster):
    create_stream(cluster.url, PARTITIONS, 3)
    db = init_db(tmp_path / "recorded.sqlite")
    extra = ["--partitions", str(PARTITIONS), "--replicas", "3", "--db", str(db), "--delay", "0.002", *TIMINGS]
    workers = [start_worker(tmp_path, cluster.url, m, *extra) for m in ("w1", "w2")]
    try:
        wait_for(lambda: all(w.ready() for w in workers), 60, what="two members to join")
        items = sop_names(60, 20)
        pub = Publisher(cluster.url, items, rate=150)
        pub.start()
        wait_for(lambda: recorded_count(db) >= len(items) * 0.3, 120, what="30% recorded")
        leader = cluster.stream_leader("DICOM")
        cluster.by_name(leader).kill()
        pub.join(240)
        assert not pub.is_alive() and pub.error is None, pub.error
        assert len(pub.acked) == len(items)
        wait_for(lambda: recorded_count(db) >= len(items), 180, what="every acknowledged instance recorded",
                 interval=0.5)
        for w in workers:
            assert w.sigterm(60) == 0
        _assert_sound(workers, pub.acked, db)
        assert cluster.stream_leader("DICOM") != leader
    finally:
        for w in workers:
            w.cleanup()


async def _bounded(aw, timeout: float, what: str):
    """Await ``aw``; on a hang, print every task's stack (a rare stop hang seen once) and fail."""
    try:
        return await asyncio.wait_for(asyncio.shield(aw), timeout)
    except TimeoutError:
        for task in asyncio.all_tasks():
            print(f"pending task: {task!r}", file=sys.stderr)
            task.print_stack(file=sys.stderr)
        raise AssertionError(f"{what} did not finish in {timeout}s") from None


def test_long_handler_keeps_its_message_and_a_failure_is_retried(tmp_path, nats_server):
    """In-progress acks stop a slow call from being redelivered; a raising handler gets the message again."""
    from shared.bus.consumer_group import PartitionedConsumer
    from shared.config import GroupConfig

    create_stream(nats_server.url, 2)
    cfg = GroupConfig(ack_wait_s=1.2, pinned_timeout_s=10, member_ttl_s=2, heartbeat_s=0.5)
    calls: list[tuple[str, int]] = []

    async def handler(deliveries):
        outcomes = []
        for d in deliveries:
            sop = d.subject.split(".")[-1]
            calls.append((sop, d.delivered))
            if sop == "slow":
                await asyncio.sleep(3.0)  # 2.5 x ack_wait
            outcomes.append(RuntimeError("transient") if sop == "flaky" and d.delivered == 1 else None)
        return outcomes

    async def go():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        consumer = PartitionedConsumer(nc, "DICOM", "slowgrp", 2, handler, cfg,
                                       ElasticOwnership(nc, "slowgrp", "m", 2, cfg), "m", model=Event)
        await consumer.start()
        await js.publish("dicom.in.st1.slow", b"{}", headers={"Nats-Msg-Id": "slow"})
        await js.publish("dicom.in.st2.flaky", b"{}", headers={"Nats-Msg-Id": "flaky"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (("slow", 1) in calls and ("flaky", 2) in calls):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # would a redelivery of the slow one come?
        await _bounded(consumer.stop(), 60, "consumer.stop()")
        await _bounded(nc.close(), 20, "nc.close()")

    asyncio.run(go())
    assert [c for c in calls if c[0] == "slow"] == [("slow", 1)]
    assert [c for c in calls if c[0] == "flaky"] == [("flaky", 1), ("flaky", 2)]


def test_slow_batch_keeps_the_pin_so_no_second_member_gets_the_partition(tmp_path, nats_server):
    """A batch that takes several PinnedTTLs to handle must not let another puller in meanwhile."""
    from shared.bus.consumer_group import AllPartitions, PartitionedConsumer, durable_name
    from shared.bus.jetstream import PinnedPuller
    from shared.config import GroupConfig

    create_stream(nats_server.url, 1)
    cfg = GroupConfig(ack_wait_s=30, pinned_timeout_s=1.5, member_ttl_s=2, heartbeat_s=0.5, batch=8)
    handled: list[tuple[float, float]] = []

    async def handler(deliveries):
        for _ in deliveries:
            t0 = time.monotonic()
            await asyncio.sleep(0.6)  # 8 x 0.6 s = 4.8 s per batch, > 3 x PinnedTTL
            handled.append((t0, time.monotonic()))
        return [None] * len(deliveries)

    async def go():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        for i in range(10):
            await js.publish(f"dicom.in.st.s{i}", b"{}", headers={"Nats-Msg-Id": f"s{i}"})
        consumer = PartitionedConsumer(nc, "DICOM", "pin", 1, handler, cfg, AllPartitions(1), "a", model=Event)
        await consumer.start()
        while not handled:
            await asyncio.sleep(0.05)
        # An intruder on the same durable: it must get nothing while "a" is busy with its batch.
        intruder_nc = await nats.connect(nats_server.url)
        intruder = PinnedPuller(intruder_nc, "DICOM", durable_name("pin", 0))
        stolen = []
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            result = await intruder.fetch(1, expires_s=0.5)
            stolen += result.messages
        await _nak_all_of(stolen)
        while len(handled) < 10:
            await asyncio.sleep(0.1)
        await intruder.close()
        await intruder_nc.close()
        await consumer.stop()
        await nc.close()
        return stolen

    stolen = asyncio.run(go())
    assert stolen == [], f"another puller got {len(stolen)} messages while the owner was busy"
    intervals = sorted(handled)
    assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:], strict=False))


async def _nak_all_of(msgs):
    for m in msgs:
        await m.nak()


def test_batch_handler_acks_each_success_and_retries_each_failure(tmp_path, nats_server):
    """A pull's messages go to the batch handler together; one failed outcome is redelivered alone."""
    from shared.bus.consumer_group import PartitionedConsumer
    from shared.config import GroupConfig

    create_stream(nats_server.url, 1)
    cfg = GroupConfig(ack_wait_s=5, pinned_timeout_s=10, member_ttl_s=2, heartbeat_s=0.5, batch=64)
    batches: list[list[tuple[str, int]]] = []

    async def batch_handler(deliveries):
        seen = [(d.subject.split(".")[-1], d.delivered) for d in deliveries]
        batches.append(seen)
        return [RuntimeError("transient") if sop == "s07" and n == 1 else None for sop, n in seen]

    async def go():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        for i in range(40):  # published before the member starts: the first pull brings a batch
            await js.publish(f"dicom.in.st1.s{i:02d}", b"{}", headers={"Nats-Msg-Id": f"s{i:02d}"})
        consumer = PartitionedConsumer(nc, "DICOM", "batchgrp", 1, batch_handler, cfg,
                                       ElasticOwnership(nc, "batchgrp", "m", 1, cfg), "m", model=Event)
        await consumer.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ("s07", 2) not in [x for b in batches for x in b]:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # would anything else come back?
        await consumer.stop()
        await nc.close()

    asyncio.run(go())
    calls = [x for b in batches for x in b]
    assert max(len(b) for b in batches) > 1
    assert sorted(sop for sop, n in calls if n == 1) == [f"s{i:02d}" for i in range(40)]
    assert [c for c in calls if c[1] > 1] == [("s07", 2)]
    first = [sop for sop, n in calls if n == 1]
    assert first == sorted(first), "partition order kept within and across batches"


def test_linger_gathers_a_trickle_into_batches_without_waiting_for_a_full_one(tmp_path, nats_server):
    """Events arriving one by one are handled in a few batches (linger), each started within the linger."""
    from shared.bus.consumer_group import AllPartitions, PartitionedConsumer
    from shared.config import GroupConfig

    create_stream(nats_server.url, 1)
    cfg = GroupConfig(ack_wait_s=10, pinned_timeout_s=10, member_ttl_s=2, heartbeat_s=0.5, batch=64, linger_s=0.4)
    batches: list[tuple[float, list[str]]] = []
    published: dict[str, float] = {}

    async def batch_handler(deliveries):
        batches.append((time.monotonic(), [d.subject.split(".")[-1] for d in deliveries]))
        return [None] * len(deliveries)

    async def go():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        consumer = PartitionedConsumer(nc, "DICOM", "linger", 1, batch_handler, cfg, AllPartitions(1), "m",
                                       model=Event)
        await consumer.start()
        await asyncio.sleep(0.3)
        for i in range(20):  # a slow sender: one event every 10 ms, 200 ms in all
            published[f"s{i:02d}"] = time.monotonic()
            await js.publish(f"dicom.in.st1.s{i:02d}", b"{}", headers={"Nats-Msg-Id": f"t{i:02d}"})
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(len(b) for _, b in batches) < 20:
            await asyncio.sleep(0.05)
        await consumer.stop()
        await nc.close()

    asyncio.run(go())
    assert [s for _, b in batches for s in b] == [f"s{i:02d}" for i in range(20)]
    assert len(batches) <= 3, f"a trickle of 20 came in {len(batches)} batches: {batches}"
    for handled_at, subjects_ in batches:  # nobody waited for a full batch of 64
        assert handled_at - published[subjects_[0]] < 0.4 + 1.0


def test_typed_consumer_parks_a_poison_message_and_continues_the_producers_trace(tmp_path, nats_server, caplog):
    """Garbage on a partition is terminated once (never redelivered), logged and counted; the event after
    it is handled, decoded, in a consumer span whose parent is the publisher's span."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import REGISTRY

    from shared.bus.consumer_group import AllPartitions, PartitionedConsumer, durable_name
    from shared.bus.publish import AsyncPublisher
    from shared.config import GroupConfig
    from shared.contract.events import InstanceReceived, InstanceTags, utcnow
    from shared.telemetry import setup_tracing

    exporter = InMemorySpanExporter()
    provider = setup_tracing("test", load_config(environ={}).telemetry, exporter=exporter)
    create_stream(nats_server.url, 1)
    # ack_wait 1 s: a poison message that were only left unacknowledged would be back within the test.
    cfg = GroupConfig(ack_wait_s=1, pinned_timeout_s=10, member_ttl_s=2, heartbeat_s=0.5, batch=8)
    handled = []

    async def handler(deliveries):
        handled.extend(deliveries)
        return [None] * len(deliveries)

    tags = InstanceTags(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1")
    event = InstanceReceived(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest="ab" * 32, size=10,
                             backend="local", calling_ae="MOD", called_ae="DICOMFLOW", received_at=utcnow())
    before = REGISTRY.get_sample_value("dicomflow_bus_poison_messages_total", {"group": "poisongrp"}) or 0

    async def go():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        terminated = []

        async def on_terminated(m):
            terminated.append(json.loads(m.data))

        await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.DICOM.{durable_name('poisongrp', 0)}",
                           cb=on_terminated)
        bad = await js.publish("dicom.in.st1.garbage", b"\x00 not an event", headers={"Nats-Msg-Id": "garbage"})
        with trace.get_tracer("test").start_as_current_span("producer") as producer:
            good = await AsyncPublisher(js, 5).publish(event)
        consumer = PartitionedConsumer(nc, "DICOM", "poisongrp", 1, handler, cfg, AllPartitions(1), "m")
        await consumer.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not handled:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # 2.5 x ack_wait: a redelivery of either message would have come
        await consumer.stop()
        await nc.flush()
        await nc.close()
        return bad, good, producer, terminated

    bad, good, producer, terminated = asyncio.run(go())
    assert [(d.event, d.stream_seq, d.delivered) for d in handled] == [(event, good.seq, 1)]
    assert [t["stream_seq"] for t in terminated] == [bad.seq], "terminated once, never redelivered"
    after = REGISTRY.get_sample_value("dicomflow_bus_poison_messages_total", {"group": "poisongrp"})
    assert after - before == 1
    parked = [r.getMessage() for r in caplog.records if "poison message" in r.getMessage()]
    assert len(parked) == 1 and "dicom.part.0.st1.garbage" in parked[0] and f"stream seq {bad.seq}" in parked[0]
    provider.force_flush()
    spans = [s for s in exporter.get_finished_spans() if s.name == "poisongrp.instance"]
    assert len(spans) == 1, "one consumer span, for the decodable event only"
    span, parent = spans[0], producer.get_span_context()
    assert span.kind == trace.SpanKind.CONSUMER
    assert span.context.trace_id == parent.trace_id and span.parent.span_id == parent.span_id
    assert handled[0].span.get_span_context().span_id == span.context.span_id
