"""The consumer-group runtime: a member consumes the partitions it owns, one message at a time per
partition, with explicit acks, through pinned pull consumers.

Which partitions a member owns is an :class:`Ownership` (all of them for a lone worker; elastic
membership for a group). Ownership decides who pulls; the server's ``pinned_client`` policy makes a
second puller impossible anyway while members disagree, so a partition (and the studies on it) is
never processed concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from . import subjects
from .config import GroupConfig
from .jetstream_raw import JetStreamAPIError, PinnedPuller, ensure_consumer, pinned_consumer_config, unpin
from .telemetry import LATENCY_BUCKETS

log = logging.getLogger("dicomflow.group")

Handler = Callable[[Msg], Awaitable[None]]

handled = Counter("dicomflow_group_messages_total", "Messages handled, by group and outcome", ["group", "outcome"])
redeliveries = Counter("dicomflow_group_redeliveries_total", "Messages delivered more than once", ["group"])
owned_partitions = Gauge("dicomflow_group_owned_partitions", "Partitions this member owns", ["group", "member"])
rebalances = Counter("dicomflow_group_rebalances_total", "Changes of this member's partition set", ["group"])
handle_seconds = Histogram("dicomflow_group_handle_seconds", "Handler time per message", ["group"], buckets=LATENCY_BUCKETS)
handover_seconds = Histogram("dicomflow_group_release_seconds", "Time to release a partition gracefully", ["group"],
                             buckets=LATENCY_BUCKETS)


def durable_name(group: str, partition: int) -> str:
    """The durable consumer of one group on one partition, e.g. ``store-p07``."""
    return f"{group}-p{partition:02d}"


class Ownership(Protocol):
    """Which partitions this member should consume now."""

    async def start(self) -> None: ...

    def owned(self) -> set[int]: ...

    async def stop(self) -> None: ...


class AllPartitions:
    """A lone worker owns every partition."""

    def __init__(self, partitions: int):
        self._all = set(range(partitions))

    async def start(self) -> None:
        pass

    def owned(self) -> set[int]:
        return set(self._all)

    async def stop(self) -> None:
        pass


class PartitionedConsumer:
    """One member of a consumer group over the partitioned instance stream."""

    def __init__(self, nc: NATS, stream: str, group: str, partitions: int, handler: Handler, cfg: GroupConfig,
                 ownership: Ownership, member: str):
        self.nc = nc
        self.stream = stream
        self.group = group
        self.partitions = partitions
        self.handler = handler
        self.cfg = cfg
        self.ownership = ownership
        self.member = member
        self._tasks: dict[int, asyncio.Task] = {}
        self._stops: dict[int, asyncio.Event] = {}
        self._reconciler: asyncio.Task | None = None
        self._stopping = False

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
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name=f"{self.group}-reconcile")

    def owned_now(self) -> set[int]:
        """Partitions with a running pull loop."""
        return set(self._tasks)

    async def _reconcile_forever(self) -> None:
        while not self._stopping:
            try:
                await self.reconcile()
            except Exception:
                log.exception("%s: reconcile failed", self.group)
            await asyncio.sleep(0.2)

    async def reconcile(self) -> None:
        """Start pulling newly owned partitions, release lost ones."""
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
        except (JetStreamAPIError, Exception) as exc:  # a failed unpin only delays the next owner by PinnedTTL
            log.warning("%s: unpin of partition %d failed: %s", self.group, p, exc)
        handover_seconds.labels(self.group).observe(time.monotonic() - t0)

    async def _pull_loop(self, p: int, stop: asyncio.Event) -> None:
        puller = PinnedPuller(self.nc, self.stream, durable_name(self.group, p))
        try:
            while not stop.is_set():
                try:
                    result = await puller.fetch(self.cfg.batch, expires_s=1.0)
                except Exception as exc:  # NATS reconnecting: keep trying
                    log.debug("%s p%d pull: %s", self.group, p, exc)
                    await asyncio.sleep(0.5)
                    continue
                if result.status in ("400", "409") and not result.messages:
                    log.warning("%s p%d pull refused: %s %s", self.group, p, result.status, result.description)
                    await asyncio.sleep(1.0)
                for i, msg in enumerate(result.messages):
                    if stop.is_set():
                        # Not ours any more: hand the rest back at once rather than after ack_wait.
                        for rest in result.messages[i:]:
                            await rest.nak()
                        break
                    await self._handle(msg)
        finally:
            await puller.close()

    async def _handle(self, msg: Msg) -> None:
        t0 = time.perf_counter()
        try:
            delivered = msg.metadata.num_delivered
        except Exception:
            delivered = 1
        if delivered > 1:
            redeliveries.labels(self.group).inc()
        try:
            await self.handler(msg)
        except Exception as exc:
            delay = min(2 ** min(delivered, 6), 60)
            log.warning("%s: handler failed on %s (delivery %d), retry in %ss: %s", self.group, msg.subject,
                        delivered, delay, exc)
            handled.labels(self.group, "retry").inc()
            await self.nc.publish(msg.reply, b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode())
            return
        await msg.ack()
        handled.labels(self.group, "ok").inc()
        handle_seconds.labels(self.group).observe(time.perf_counter() - t0)

    async def stop(self) -> None:
        """Leave gracefully: release every partition (finish, ack, unpin), then leave the membership."""
        self._stopping = True
        if self._reconciler:
            self._reconciler.cancel()
            try:
                await self._reconciler
            except asyncio.CancelledError:
                pass
        await self.ownership.stop()
        await asyncio.gather(*(self._release(p) for p in list(self._tasks)))
        owned_partitions.labels(self.group, self.member).set(0)
