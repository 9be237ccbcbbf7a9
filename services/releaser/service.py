"""The staging releaser: a sweep every ``release.interval_s`` that removes the staged objects nothing needs.

Stateless but for a cache of what stream messages reference (their bytes never change), so any number
may run and a killed one loses nothing: the next sweep starts from the streams again. The order of the
reads follows the order in which the others hand a reference on, so a reference is never between two
places unseen: the router publishes a job before it acknowledges the instance event (instance stream,
then ROUTER_OUT), a forwarder dead-letters before it acknowledges the job (ROUTER_OUT, then DICOM_DLQ), and
``dlq replay`` queues the job again before it deletes the dead letter (DICOM_DLQ, then ROUTER_OUT again).
Which object goes is decided by :mod:`.decision`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

from shared.bus.connection import connect
from shared.bus.consumer_group import durable_name
from shared.bus.jetstream import JetStreamAPIError, api
from shared.config import Config
from shared.contract import subjects
from shared.contract.events import DeadLetter, ForwardJob, InstanceDeleted, InstanceReceived
from shared.lifecycle import stop_on_signals
from shared.storage.objectstore import Backends, ObjectStore
from shared.telemetry import add_health_check, start_metrics

from . import decision, metrics

log = logging.getLogger("dicomflow.releaser")

NO_MESSAGE = {10037}
NO_STREAM = {10059}


class Incomplete(Exception):
    """A message vanished between the stream's listing and its read: this sweep's view is not whole."""


@dataclass
class SweepReport:
    """What one sweep saw and did."""

    objects: int = 0
    bytes: int = 0
    released: int = 0
    released_bytes: int = 0
    held: dict[str, int] = field(default_factory=dict)
    blocked: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"objects": self.objects, "bytes": self.bytes, "released": self.released,
                "released_bytes": self.released_bytes, "held": self.held, "blocked": self.blocked,
                "seconds": round(self.seconds, 3)}


async def _get(nc: NATS, stream: str, body: dict) -> dict | None:
    """One stored message (None when there is none)."""
    try:
        return (await api(nc, f"STREAM.MSG.GET.{stream}", body))["message"]
    except JetStreamAPIError as exc:
        if exc.err_code in NO_MESSAGE or exc.code == 404:
            return None
        raise


def _data(msg: dict) -> bytes:
    return base64.b64decode(msg.get("data") or b"")


class StreamView:
    """What the streams still reference, read incrementally (a message's digest is read once and cached)."""

    def __init__(self, nc: NATS, config: Config):
        self.nc = nc
        self.config = config
        self.stream = config.stream.name
        self.events: dict[int, tuple[int, str]] = {}  # instance stream seq -> (partition, digest)
        self.events_stream = subjects.stream_names(config.stream)["events"]
        self.deleted: set[str] = set()  # digests of deleted instances
        self.deleted_upto = 0  # every deletion event up to here is in ``deleted``
        self.read_upto = 0  # every instance event up to here is in ``events`` (or below the floors)
        self.low = 0  # the lowest floor at the last read
        self.jobs: dict[int, str] = {}  # ROUTER_OUT seq -> digest
        self.letters: dict[int, str | None] = {}  # DICOM_DLQ seq -> digest (None: not a dead letter)

    async def floors(self) -> dict[int, int]:
        """Per partition, the sequence up to which every required group has acknowledged everything."""
        found: dict[str, int] = {}
        offset = 0
        while True:
            try:
                page = await api(self.nc, f"CONSUMER.LIST.{self.stream}", {"offset": offset})
            except JetStreamAPIError as exc:
                if exc.err_code in NO_STREAM:
                    return {}
                raise
            consumers = page.get("consumers") or []
            for c in consumers:
                found[c["name"]] = int((c.get("ack_floor") or {}).get("stream_seq") or 0)
            offset += len(consumers)
            if not consumers or offset >= int(page.get("total") or 0):
                break
        present = {name.rsplit("-p", 1)[0] for name in found}
        groups = decision.required_groups(bool(self.config.router.rules_file), present)
        return {p: decision.ack_floor({g: found.get(durable_name(g, p)) for g in groups})
                for p in range(self.config.stream.partitions)}

    async def instance_holds(self) -> frozenset[str]:
        """Digests of the instance events some required group may not have acknowledged yet."""
        floors = await self.floors()
        low = min(floors.values(), default=0)
        if low < self.low:
            # A floor went back (a group's consumer made afresh, which redelivers from there): what was evicted
            # below the old floor is pending again, so read it again.
            self.events, self.read_upto = {}, low
        self.low = low
        self.events = {s: v for s, v in self.events.items() if s > low}
        seq = max(low, self.read_upto) + 1
        last = await self._last_seq(self.stream)
        while seq <= last:
            msg = await _get(self.nc, self.stream, {"seq": seq, "next_by_subj": f"{subjects.PART_PREFIX}.>"})
            if msg is None:
                break
            found = int(msg["seq"])
            try:
                ev = InstanceReceived.model_validate_json(_data(msg))
                self.events[found] = (subjects.partition_from_subject(msg["subject"]), ev.digest)
            except ValueError:
                pass  # a poison message names no bytes
            self.read_upto = found
            seq = found + 1
        self.read_upto = max(self.read_upto, last)
        return decision.pending_digests(((s, p, d) for s, (p, d) in self.events.items()), floors)

    async def deleted_digests(self) -> frozenset[str]:
        """Digests named by the deletion events on the events stream (read once each; kept as long as the
        stream keeps its messages, ``stream.events_max_age_days``)."""
        seq = self.deleted_upto + 1
        last = await self._last_seq(self.events_stream)
        while seq <= last:
            msg = await _get(self.nc, self.events_stream, {"seq": seq, "next_by_subj": f"{subjects.DELETED_PREFIX}.>"})
            if msg is None:
                break
            try:
                self.deleted.add(InstanceDeleted.model_validate_json(_data(msg)).digest)
            except ValueError:
                pass  # not a deletion this release understands: it releases nothing
            self.deleted_upto = seq = int(msg["seq"])
            seq += 1
        self.deleted_upto = max(self.deleted_upto, last)
        return frozenset(self.deleted)

    async def _last_seq(self, stream: str) -> int:
        try:
            info = await api(self.nc, f"STREAM.INFO.{stream}")
        except JetStreamAPIError as exc:
            if exc.err_code in NO_STREAM:
                return 0
            raise
        return int(info["state"].get("last_seq") or 0)

    async def _present(self, stream: str) -> list[int]:
        """The sequences of the messages the stream holds now (one STREAM.INFO: an instant's view)."""
        try:
            info = await api(self.nc, f"STREAM.INFO.{stream}", {"deleted_details": True})
        except JetStreamAPIError as exc:
            if exc.err_code in NO_STREAM:
                return []
            raise
        st = info["state"]
        if not st.get("messages"):
            return []
        deleted = set(st.get("deleted") or ())
        return [s for s in range(int(st["first_seq"]), int(st["last_seq"]) + 1) if s not in deleted]

    async def _referenced(self, stream: str, cache: dict, parse) -> frozenset[str]:
        present = await self._present(stream)
        keep = set(present)
        for s in [s for s in cache if s not in keep]:
            del cache[s]
        for s in present:
            if s in cache:
                continue
            msg = await _get(self.nc, stream, {"seq": s})
            if msg is None:
                raise Incomplete(f"{stream} message {s} went before it was read")
            cache[s] = parse(_data(msg))
        return frozenset(d for d in cache.values() if d)

    async def job_holds(self) -> frozenset[str]:
        return await self._referenced(subjects.OUT_STREAM, self.jobs,
                                      lambda b: ForwardJob.model_validate_json(b).digest)

    async def letter_holds(self) -> frozenset[str]:
        def parse(b: bytes) -> str | None:
            try:
                return DeadLetter.model_validate_json(b).job.digest
            except ValueError:
                return None
        return await self._referenced(subjects.DLQ_STREAM, self.letters, parse)

    async def holds(self) -> decision.Holds:
        """Everything the streams reference, read in the order references are handed on (module docstring)."""
        events = await self.instance_holds()
        jobs = await self.job_holds()
        letters = await self.letter_holds()
        jobs |= await self.job_holds()
        return decision.Holds(instance_events=events, forward_jobs=jobs, dead_letters=letters)


class Releaser:
    """Sweeps one staging backend."""

    def __init__(self, config: Config, nc: NATS, backends: Backends | None = None):
        self.config = config
        self.view = StreamView(nc, config)
        self.backends = backends or Backends(config)
        storage = config.storage
        policies = {n: p.placements for n, p in storage.policies.items()}
        self.blocked = decision.staging_is_placement(storage.staging, policies)
        self.placements = decision.placement_backends(storage.staging, policies)

    @property
    def staging(self) -> ObjectStore:
        return self.backends.get(self.config.storage.staging)

    def _placed(self, digest: str) -> bool:
        return any(self.backends.get(b).exists(digest) for b in self.placements)

    async def sweep(self) -> SweepReport:
        """One sweep: list staging, read what the streams reference, release what nothing needs."""
        t0 = time.time()
        report = SweepReport()
        if self.blocked:
            report.blocked = (f"staging backend {self.config.storage.staging!r} is a placement of policy "
                              f"{self.blocked!r}: its objects are stored copies")
        # The grace runs from before anything is read: an event published after this sweep's view was taken
        # comes from a put (or a resend's touch) that is younger than not_after, or whose publish outlived
        # nats.publish_timeout_s (< min_age_s) and was answered as a failure.
        not_after = t0 - self.config.release.min_age_s
        holds = decision.Holds() if self.blocked else await self.view.holds()
        objects = await asyncio.to_thread(lambda: list(self.staging.objects()))
        report.objects = len(objects)
        report.bytes = sum(o.size for o in objects)
        held = dict.fromkeys(decision.REASONS, 0)
        deleted: frozenset[str] | None = None  # read at the first object no placement holds
        for obj in objects:
            if self.blocked:
                continue
            reason = decision.held_by(obj, holds, not_after)
            if reason is None:
                placed = await asyncio.to_thread(self._placed, obj.digest)
                if not placed and deleted is None:
                    deleted = await self.view.deleted_digests()
                v = decision.verdict(obj, holds, not_after, placed, not placed and obj.digest in deleted)
                if isinstance(v, decision.Release):
                    if await asyncio.to_thread(self.staging.remove_unless_touched, obj.digest, not_after):
                        report.released += 1
                        report.released_bytes += obj.size
                        continue
                    reason = decision.YOUNG  # touched by a resend while it was judged
                else:
                    reason = v.reason
            held[reason] += 1
        report.held = {k: v for k, v in held.items() if v}
        report.objects -= report.released
        report.bytes -= report.released_bytes
        report.seconds = time.time() - t0
        metrics.staged_objects.set(report.objects)
        metrics.staged_bytes.set(report.bytes)
        for reason, n in held.items():
            metrics.held.labels(reason).set(n)
        metrics.released.inc(report.released)
        metrics.released_bytes.inc(report.released_bytes)
        metrics.sweep_seconds.observe(report.seconds)
        metrics.sweeps.labels("blocked" if self.blocked else "done").inc()
        if report.released:
            log.info("released %d staged objects (%d bytes); %d objects (%d bytes) stay staged: %s", report.released,
                     report.released_bytes, report.objects, report.bytes, report.held)
        return report

    async def sweep_or_skip(self) -> SweepReport | None:
        """A sweep, or None when the streams' view was not whole (retried at the next sweep: nothing removed)."""
        for _ in range(3):
            try:
                return await self.sweep()
            except Incomplete as exc:
                log.debug("sweep view not whole (%s); reading again", exc)
        metrics.sweeps.labels("incomplete").inc()
        return None

    def close(self) -> None:
        self.backends.close()


async def run_once(config: Config) -> SweepReport | None:
    """One sweep (``dicomflow releaser --once``)."""
    nc = await connect(config, "dicomflow-releaser")
    try:
        releaser = Releaser(config, nc)
        try:
            return await releaser.sweep_or_skip()
        finally:
            releaser.close()
    finally:
        await nc.close()


async def serve(config: Config, metrics_port: int | None = None, stop: asyncio.Event | None = None) -> None:
    """Sweep every ``release.interval_s`` until SIGTERM/SIGINT (or ``stop``)."""
    start_metrics(config.telemetry, metrics_port)
    nc = await connect(config, "dicomflow-releaser")
    releaser = Releaser(config, nc)
    if releaser.blocked:
        log.warning("staging backend %r is a placement of policy %r: its objects are stored copies, none is "
                    "released (the gauges are kept up to date)", config.storage.staging, releaser.blocked)
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    add_health_check("nats", lambda: nc.is_connected)
    log.info("releasing staging backend %r every %gs (grace %gs)", config.storage.staging, config.release.interval_s,
             config.release.min_age_s)
    try:
        while not stop.is_set():
            try:
                await releaser.sweep_or_skip()
            except Exception:
                metrics.sweeps.labels("failed").inc()
                log.exception("release sweep failed; nothing removed after the failure, retrying")
            try:
                await asyncio.wait_for(stop.wait(), config.release.interval_s)
            except TimeoutError:
                pass
    finally:
        releaser.close()
        await nc.drain()
