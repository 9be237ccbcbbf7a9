"""Elastic group membership: members heartbeat into a JetStream KV bucket whose entries expire after
``member_ttl_s``; each member reads the live membership and owns the partitions rendezvous hashing
gives it (:mod:`shared.bus.rendezvous`).

The bucket (``members_<group>``) holds one key per live member; its value is the member's own report
(host, pid, owned partitions, pin ids) so ``dicomflow status`` can show who holds what. Liveness is
the server's view: a key exists until the member purges it (graceful leave) or it ages out (crash).
Membership views may differ for a moment during a change; the pinned consumers make that safe.

Usage (what the store does)::

    ownership = ElasticOwnership(nc, "store", member, partitions, cfg.store.group, replicas=cfg.stream.replicas)
    consumer = PartitionedConsumer(nc, stream, "store", partitions, handler, cfg.store.group, ownership, member)
    await consumer.start()      # joins, heartbeats, pulls what it owns, follows rebalances
    ...
    await consumer.stop()       # leaves: purges its key, finishes and acks in-flight work, unpins
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS

from shared.bus.kv import Bucket, existing_bucket, live_keys, open_bucket
from shared.bus.rendezvous import owned_by
from shared.config import GroupConfig
from shared.lifecycle import cancel_and_wait

log = logging.getLogger("dicomflow.membership")

HEARTBEAT_TIMEOUT_S = 2.0

_KEY_UNSAFE = re.compile(r"[^-_=a-zA-Z0-9]")


def bucket_name(group: str) -> str:
    """The KV bucket holding one group's members."""
    return f"members_{group}"


def member_key(member: str) -> str:
    """A member name made safe as a KV key (one token: no dots, no wildcards)."""
    return _KEY_UNSAFE.sub("_", member)


def default_member_name(prefix: str) -> str:
    """A name unique per process: ``<prefix>-<host>-<pid>``."""
    return member_key(f"{prefix}-{socket.gethostname()}-{os.getpid()}")


async def ensure_bucket(nc: NATS, group: str, ttl_s: float, replicas: int = 1) -> Bucket:
    """Open the group's membership bucket, creating it or updating its TTL; idempotent.

    Writes there are heartbeats, bounded in time so a member cut off from NATS notices within a beat.
    """
    return await open_bucket(nc, bucket_name(group), ttl_s, replicas, timeout=HEARTBEAT_TIMEOUT_S)


async def live_members(nc: NATS, group: str) -> list[str]:
    """The members whose heartbeat has not expired, sorted (empty if the bucket does not exist)."""
    return await live_keys(nc, bucket_name(group))


async def member_reports(nc: NATS, group: str) -> dict[str, dict]:
    """Each live member's last heartbeat value (its report), by member name."""
    bucket = await existing_bucket(nc, bucket_name(group))
    if bucket is None:
        return {}
    members = await bucket.keys()
    entries = await asyncio.gather(*(bucket.get(m) for m in members))
    out: dict[str, dict] = {}
    for m, entry in zip(members, entries, strict=True):
        if entry is None:
            continue  # expired between the listing and the read
        try:
            out[m] = json.loads(entry.value or b"")
        except ValueError:
            out[m] = {}
    return out


class ElasticOwnership:
    """Owns the partitions rendezvous hashing gives this member among the live members.

    Heartbeats every ``cfg.heartbeat_s`` and re-reads the membership at the same pace. If its own
    heartbeats fail for ``cfg.member_ttl_s`` (cut off from NATS) it owns nothing until they succeed
    again: the others will have taken its partitions by then.
    """

    def __init__(self, nc: NATS, group: str, member: str, partitions: int, cfg: GroupConfig, replicas: int = 1):
        self.nc = nc
        self.group = group
        self.member = member_key(member)
        self.partitions = partitions
        self.cfg = cfg
        self.replicas = replicas
        self._report: Callable[[], dict] | None = None
        self._bucket: Bucket | None = None
        self._members: list[str] = []
        self._last_ok = 0.0
        self._started = time.time()
        self._task: asyncio.Task | None = None

    def set_reporter(self, report: Callable[[], dict]) -> None:
        """What each heartbeat carries besides host and pid (the consumer's owned partitions and pins)."""
        self._report = report

    def members(self) -> list[str]:
        """The live members as last read."""
        return list(self._members)

    def owned(self) -> set[int]:
        """The partitions this member should consume now."""
        if time.monotonic() - self._last_ok > self.cfg.member_ttl_s:
            return set()
        return owned_by(self.member, self._members, self.partitions)

    async def live_pins(self) -> set[str] | None:
        """Every pin the live members reported in their last heartbeat (ours included)."""
        reports = await member_reports(self.nc, self.group)
        return {str(pin) for report in reports.values() for pin in (report.get("pins") or {}).values()}

    async def start(self) -> None:
        """Create the bucket if needed, join, and read the membership once before returning."""
        delay = 0.1
        while True:
            # A bucket just created on a cluster answers once its replicas elected a leader; NATS
            # itself may be restarting: keep trying (the caller is not a member before this returns).
            try:
                self._bucket = await ensure_bucket(self.nc, self.group, self.cfg.member_ttl_s, self.replicas)
                await self._tick()
                break
            except Exception as exc:
                log.info("%s/%s: joining: %s; retrying", self.group, self.member, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._task = asyncio.create_task(self._run(), name=f"{self.group}-membership")

    async def stop(self) -> None:
        """Stop heartbeating and leave the membership at once."""
        if self._task:
            await cancel_and_wait(self._task)
            self._task = None
        self._members = []
        if self._bucket is None:
            return  # never joined
        try:
            # Removed, not deleted: a delete marker would keep us in the listing until it aged out.
            await self._bucket.remove(self.member)
        except Exception as exc:  # the key then simply expires after member_ttl_s
            log.warning("%s/%s: leave failed (%s); the membership forgets us after its TTL", self.group,
                        self.member, exc)

    async def _tick(self) -> None:
        value = {"member": self.member, "host": socket.gethostname(), "pid": os.getpid(), "since": self._started,
                 "ts": time.time()}
        if self._report:
            value.update(self._report())
        assert self._bucket is not None
        await self._bucket.put(self.member, json.dumps(value).encode())
        members = await self._bucket.keys()
        if members != self._members:
            log.info("%s: members now %s", self.group, members)
        self._members = members
        self._last_ok = time.monotonic()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s/%s: heartbeat failed: %s", self.group, self.member, exc)
