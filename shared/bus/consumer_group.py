"""The consumer-group runtime: a member consumes the partitions it owns, one message at a time per
partition, with explicit acks, through pinned pull consumers.

Which partitions a member owns is an :class:`Ownership`: :class:`AllPartitions` for a lone worker,
:class:`~shared.bus.membership.ElasticOwnership` (KV heartbeats + rendezvous hashing) for a group.
Ownership decides who pulls; the server's ``pinned_client`` policy makes a second puller impossible
anyway while members disagree, so a partition (and the studies on it) is never processed concurrently.

The public API, for every service that consumes the partitioned stream::

    consumer = PartitionedConsumer(nc, stream, group, partitions, handler, cfg, ownership, member)
    await consumer.start()   # declares the durables <group>-pNN, joins, pulls owned partitions
    await consumer.stop()    # graceful leave: stop pulling, finish + ack in-flight, flush, unpin, leave

The consumer decodes each message once into ``model`` (:mod:`shared.bus.delivery`: poison messages
are terminated, logged and counted in ``dicomflow_bus_poison_messages_total``), starts its span
continuing the producer's trace, and awaits ``handler(deliveries)`` once per pull, in order within a
partition, partitions concurrently. The handler returns one outcome per delivery: None acks it, an
exception naks it with a growing delay. It must be idempotent (redeliveries come after a crash or a
lost ack, out of order); the work shared by a pull (one index transaction, concurrent object writes,
pipelined publishes) is why it takes them together. A pull handled longer than a third of
``ack_wait_s`` gets in-progress acks automatically, and while it is being handled the member keeps
pulling (batch 1) at a third of ``pinned_timeout_s`` so its pin cannot lapse under a slow batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel

from shared.backoff import backoff_delay
from shared.bus.delivery import DeliveryHandler, InProgress, decode, finish
from shared.bus.jetstream import (
    PRIORITY_GROUP,
    PinnedPuller,
    consumer_info,
    ensure_consumer,
    pinned_consumer_config,
    unpin,
)
from shared.bus.pin_takeover import Suspect, judge_pin
from shared.config import GroupConfig
from shared.contract import subjects
from shared.contract.events import InstanceReceived
from shared.lifecycle import cancel_and_wait
from shared.telemetry import LATENCY_BUCKETS

log = logging.getLogger("dicomflow.group")

# A failed handler is retried after 2, 4, 8 ... 60 s (by delivery count).
RETRY_INITIAL_S, RETRY_MAX_S = 2.0, 60.0

handled = Counter("dicomflow_group_messages_total", "Messages handled, by group and outcome", ["group", "outcome"])
redeliveries = Counter("dicomflow_group_redeliveries_total", "Messages delivered more than once", ["group"])
owned_partitions = Gauge("dicomflow_group_owned_partitions", "Partitions this member owns", ["group", "member"])
rebalances = Counter("dicomflow_group_rebalances_total", "Changes of this member's partition set", ["group"])
handle_seconds = Histogram("dicomflow_group_handle_seconds", "Handler time per message (a pull's time shared out)",
                           ["group"], buckets=LATENCY_BUCKETS)
handover_seconds = Histogram(
    "dicomflow_group_handover_seconds",
    "Partition handover as this member sees it: release = stop pulling until unpinned (graceful); "
    "acquire = owning a partition with a backlog until its first message arrives",
    ["group", "phase"], buckets=LATENCY_BUCKETS)
pin_takeovers = Counter("dicomflow_group_pin_takeovers_total",
                        "Pins taken from a member that left the membership without unpinning (killed)", ["group"])


def durable_name(group: str, partition: int) -> str:
    """The durable consumer of one group on one partition, e.g. ``store-p07``."""
    return f"{group}-p{partition:02d}"


class Ownership(Protocol):
    """Which partitions this member should consume now."""

    async def start(self) -> None: ...

    def owned(self) -> set[int]: ...

    async def stop(self) -> None: ...

    def set_reporter(self, report: Callable[[], dict]) -> None:
        """Where the member's own report (owned partitions, pins) comes from, for a membership that publishes it."""

    async def live_pins(self) -> set[str] | None:
        """Every pin the live members report holding; None when this ownership cannot tell."""


class AllPartitions:
    """A lone worker owns every partition."""

    def __init__(self, partitions: int):
        self._all = set(range(partitions))

    async def start(self) -> None:
        pass

    def set_reporter(self, report: Callable[[], dict]) -> None:
        pass  # nobody else to tell

    def owned(self) -> set[int]:
        return set(self._all)

    async def live_pins(self) -> set[str] | None:
        return None  # no membership: a pin is only ever released by its holder or by PinnedTTL

    async def stop(self) -> None:
        pass


class PartitionedConsumer:
    """One member of a consumer group over the partitioned instance stream.

    ``model``: what the messages decode as (the partitioned stream carries :class:`InstanceReceived`);
    ``span_name``: the consumer span of each delivery (default ``<group>.instance``). ``handler`` may
    be None for a consumer used only to declare the durables (:meth:`ensure_consumers`).
    """

    def __init__(self, nc: NATS, stream: str, group: str, partitions: int, handler: DeliveryHandler | None,
                 cfg: GroupConfig, ownership: Ownership, member: str, model: type[BaseModel] = InstanceReceived,
                 span_name: str | None = None):
        self.nc = nc
        self.model = model
        self.span_name = span_name or f"{group}.instance"
        self._tracer = trace.get_tracer(f"dicomflow.{group}")
        self.stream = stream
        self.group = group
        self.partitions = partitions
        self.handler = handler
        self.cfg = cfg
        self.ownership = ownership
        self.member = member
        self._tasks: dict[int, asyncio.Task] = {}
        self._stops: dict[int, asyncio.Event] = {}
        self._pullers: dict[int, PinnedPuller] = {}
        self._reconciler: asyncio.Task | None = None
        self._stopping = False
        ownership.set_reporter(self.report)

    async def ensure_consumers(self) -> None:
        """Create (or update) the durable consumer of every partition (idempotent)."""
        for p in range(self.partitions):
            await ensure_consumer(self.nc, self.stream, pinned_consumer_config(
                durable_name(self.group, p), subjects.partition_filter(p), self.cfg.ack_wait_s,
                self.cfg.pinned_timeout_s, self.cfg.max_ack_pending))

    async def start(self) -> None:
        """Declare the consumers, join, and start consuming owned partitions."""
        await self.ensure_consumers()
        await self.ownership.start()
        await self.reconcile()
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name=f"{self.group}-reconcile")

    def owned_now(self) -> set[int]:
        """Partitions with a running pull loop."""
        return set(self._tasks)

    def pins(self) -> dict[int, str]:
        """The pin id the server gave us, per partition we hold a pin on."""
        return {p: pl.pin_id for p, pl in self._pullers.items() if pl.pin_id}

    def report(self) -> dict:
        """What this member publishes in its heartbeat (shown by ``dicomflow status``)."""
        return {"owned": sorted(self._tasks), "pins": {str(p): pin for p, pin in self.pins().items()}}

    async def _reconcile_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.2)
            try:
                await self.reconcile()
            except Exception:
                log.exception("%s: reconcile failed", self.group)

    async def reconcile(self) -> None:
        """Start pulling newly owned partitions, release lost ones."""
        if self._stopping:
            return
        wanted = self.ownership.owned()
        current = set(self._tasks)
        lost, gained = current - wanted, wanted - current
        if lost or gained:
            rebalances.labels(self.group).inc()
            log.info("%s/%s: +%s -%s", self.group, self.member, sorted(gained), sorted(lost))
        await asyncio.gather(*(self._release(p) for p in lost))
        for p in gained:
            self._stops[p] = asyncio.Event()
            self._tasks[p] = asyncio.create_task(self._pull_loop(p, self._stops[p]), name=f"{self.group}-p{p}")
        owned_partitions.labels(self.group, self.member).set(len(self._tasks))

    async def _release(self, p: int) -> None:
        """Graceful release: stop pulling, finish and ack in-flight work, flush, unpin."""
        t0 = time.monotonic()
        self._stops[p].set()
        task = self._tasks.pop(p)
        try:
            await task
        except Exception:
            log.exception("%s: partition %d loop failed", self.group, p)
        del self._stops[p]
        try:
            await self.nc.flush(timeout=5)
            await unpin(self.nc, self.stream, durable_name(self.group, p))
        except Exception as exc:  # a failed unpin only delays the next owner by PinnedTTL
            log.warning("%s: unpin of partition %d failed: %s", self.group, p, exc)
        handover_seconds.labels(self.group, "release").observe(time.monotonic() - t0)

    async def _backlog(self, p: int) -> int:
        try:
            ci = await consumer_info(self.nc, self.stream, durable_name(self.group, p))
            return int(ci.get("num_pending", 0))
        except Exception:
            return 0

    async def _pull_loop(self, p: int, stop: asyncio.Event) -> None:
        puller = PinnedPuller(self.nc, self.stream, durable_name(self.group, p))
        self._pullers[p] = puller
        gained_at = time.monotonic() if await self._backlog(p) else None
        # For PinnedTTL after gaining a partition, a pin held by a member that is gone is taken over.
        orphan_watch = _OrphanWatch(time.monotonic() + self.cfg.pinned_timeout_s)
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                fetch = asyncio.create_task(puller.fetch(self.cfg.batch, expires_s=1.0, linger_s=self.cfg.linger_s))
                await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    # Leaving: a pull that has not delivered is abandoned; anything it brings later
                    # is in the puller's queue and naked below.
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await fetch
                    break
                try:
                    result = fetch.result()
                except Exception as exc:  # NATS reconnecting: keep trying
                    log.debug("%s p%d pull: %s", self.group, p, exc)
                    await asyncio.sleep(0.5)
                    continue
                if result.status in ("400", "409") and not result.messages:
                    log.warning("%s p%d pull refused: %s %s", self.group, p, result.status, result.description)
                    await asyncio.sleep(1.0)
                if not result.messages and puller.pin_id is None and orphan_watch.due(time.monotonic()):
                    await self._take_orphaned_pin(p, orphan_watch)
                if result.messages and gained_at is not None:
                    handover_seconds.labels(self.group, "acquire").observe(time.monotonic() - gained_at)
                    gained_at = None
                keeper = asyncio.create_task(self._keep_pin(puller)) if result.messages else None
                try:
                    if stop.is_set():  # not ours any more: hand them back at once rather than after ack_wait
                        await _nak_all(result.messages)
                    elif result.messages:
                        await self._handle_batch(result.messages)
                finally:
                    if keeper:
                        keeper.cancel()
        finally:
            stop_wait.cancel()
            self._pullers.pop(p, None)
            await _nak_all(await puller.close())

    async def _take_orphaned_pin(self, p: int, watch: _OrphanWatch) -> None:
        """Unpin partition ``p`` if its pin belongs to a member that left without unpinning (see pin_takeover)."""
        watch.next_at = time.monotonic() + self.cfg.heartbeat_s
        try:
            ci = await consumer_info(self.nc, self.stream, durable_name(self.group, p))
            pinned = next((g.get("pinned_client_id") for g in ci.get("priority_groups") or []
                           if g.get("group") == PRIORITY_GROUP), None)
            if not pinned:
                watch.until = 0.0  # nobody holds it: our next pull is pinned
                return
            take, watch.suspect = judge_pin(pinned, await self.ownership.live_pins(), watch.suspect,
                                            time.monotonic(), 2 * self.cfg.heartbeat_s)
            if take:
                await unpin(self.nc, self.stream, durable_name(self.group, p))
                pin_takeovers.labels(self.group).inc()
                watch.until = 0.0
                log.warning("%s/%s: partition %d was pinned to a member that left without unpinning (pin %s): "
                            "taken over", self.group, self.member, p, pinned)
        except Exception as exc:  # NATS busy or reconnecting: PinnedTTL still ends it
            log.debug("%s p%d orphaned-pin check: %s", self.group, p, exc)

    async def _keep_pin(self, puller: PinnedPuller) -> None:
        """While a batch is being handled, pull at a third of PinnedTTL so the pin cannot lapse."""
        period = self.cfg.pinned_timeout_s / 3
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await puller.keep_pin(expires_s=period)

    async def _ack(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):  # a lost ack means a redelivery, which the handler absorbs
            await msg.ack()
        handled.labels(self.group, "ok").inc()

    async def _retry(self, msg: Msg, delivered: int, exc: BaseException) -> None:
        """Negative-acknowledge with a backoff that grows with the delivery count (2 s .. 60 s)."""
        delay = backoff_delay(delivered, RETRY_INITIAL_S, RETRY_MAX_S)
        log.warning("%s: handler failed on %s (delivery %d), retry in %ss: %s", self.group, msg.subject,
                    delivered, delay, exc)
        handled.labels(self.group, "retry").inc()
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)

    async def stop(self) -> None:
        """Leave gracefully: leave the membership, release every partition (finish, ack, unpin)."""
        self._stopping = True
        await cancel_and_wait(self._reconciler)
        await self.ownership.stop()
        await asyncio.gather(*(self._release(p) for p in list(self._tasks)))
        owned_partitions.labels(self.group, self.member).set(0)

    async def _handle_batch(self, msgs: list[Msg]) -> None:
        """One pull's messages decoded, through the handler; ack each success, retry each failure."""
        t0 = time.perf_counter()
        deliveries = await decode(msgs, self.model, self.group, self._tracer, self.span_name)
        if not deliveries:
            return
        for d in deliveries:
            if d.delivered > 1:
                redeliveries.labels(self.group).inc()
        keepalive = InProgress([d.msg for d in deliveries], self.cfg.ack_wait_s / 3)
        try:
            outcomes = await self.handler(deliveries)
            if len(outcomes) != len(deliveries):
                raise RuntimeError(f"handler returned {len(outcomes)} outcomes for {len(deliveries)} deliveries")
        except Exception as exc:
            outcomes = [exc] * len(deliveries)
        finally:
            keepalive.cancel()
        finish(deliveries, outcomes)
        for d, outcome in zip(deliveries, outcomes, strict=True):
            if outcome is None:
                await self._ack(d.msg)
            else:
                await self._retry(d.msg, d.delivered, outcome)
        per_message = (time.perf_counter() - t0) / len(deliveries)
        for _ in deliveries:
            handle_seconds.labels(self.group).observe(per_message)


class _OrphanWatch:
    """A partition's look-out for an orphaned pin: until when to look, when next, what was seen."""

    def __init__(self, until: float):
        self.until = until
        self.next_at = 0.0
        self.suspect: Suspect | None = None

    def due(self, now: float) -> bool:
        return now < self.until and now >= self.next_at


async def _nak_all(msgs: list[Msg]) -> None:
    for m in msgs:
        with contextlib.suppress(Exception):
            await m.nak()
