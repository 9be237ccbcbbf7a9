"""One target's forwarder: pulls its queue, sends batches, retries with backoff, dead-letters.

Each target has its own durable consumer on ROUTER_OUT, so a dead destination only fills its own
queue. Its ack wait is the router group's short ``ack_wait_s``, kept alive by in-progress acks while a batch is
read and sent, so the jobs a killed router held go out again within seconds, not after the longest send. A failed batch is negatively acknowledged per instance with an exponential delay; after
``forward.max_attempts`` an instance goes to DICOM_DLQ with a ``dicom.forward.failed`` event.
Each instance is copied to a Part 10 file in the process's spool (``spool.py``) a chunk at a time, verified
against its digest as it goes, and the target sends the files: the router's memory does not grow with the
instance (a 4 GiB whole-slide image costs what a CT slice does); a batch over ``forward.batch_bytes`` goes as
several sends in order (``decisions.sends``), so the spool's disk is bounded too. A job none of whose copies reads whole and
verified is never sent: missing or corrupt, it is dead-lettered at once; unreadable, retried
(``decisions.settle_unread``). A job whose study was moved to another member of its group (reassign) is handed
on to that member.
What a failure becomes is decided by ``decisions.settle_failure``; of its router member a forwarder
sees only the :class:`StudyRouting` port (assignments, reassignment, health), so it runs alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace

from shared.bus.connection import publish_event
from shared.bus.delivery import Delivery, InProgress, decode, finish
from shared.bus.jetstream import ensure_consumer
from shared.config import Config
from shared.contract import subjects
from shared.contract.events import DeadLetter, ForwardFailed, ForwardJob, utcnow
from shared.contract.uids import uid_name, validate_uid
from shared.dicom.part10 import write_part10
from shared.storage.objectstore import Backends, CorruptObject
from shared.storage.reading import CHUNK, verified_chunks

from . import decisions, metrics
from .spool import Spool
from .targets import SendError, target_for

log = logging.getLogger("dicomflow.router.forward")
tracer = trace.get_tracer("dicomflow.router")
NS = 1_000_000_000


def consumer_config(target: str, ack_wait_s: float) -> dict:
    """The target queue's durable consumer (shared by every router member: they split the work)."""
    return {"durable_name": subjects.forward_durable(target), "deliver_policy": "all", "ack_policy": "explicit",
            "ack_wait": int(ack_wait_s * NS), "max_deliver": -1, "filter_subject": subjects.target_filter(target),
            "max_ack_pending": 4096, "max_waiting": 512}


class UnreadBytes(Exception):
    """No copy of a job's bytes could be read whole and verified; ``problem`` says what it came to."""

    def __init__(self, problem: decisions.Unread, detail: str):
        super().__init__(f"instance bytes {problem}: {detail}")
        self.problem = problem


class StudyRouting(Protocol):
    """What a forwarder needs of its router member (``routing.Router`` is one)."""

    config: Config  # the live configuration: a reload replaces it

    async def member_of(self, group: str, study_uid: str) -> str | None:
        """The study's recorded member of ``group``."""

    async def reassign(self, group: str, study_uid: str, down: str, rule: str) -> bool:
        """Move the whole study off the member ``down``; False when it stays there."""

    async def set_health(self, target: str, up: bool) -> None:
        """Record whether ``target`` accepts associations."""


class Forwarder:
    """Sends one target's queue."""

    def __init__(self, nc: NATS, routing: StudyRouting, backends: Backends, target: str, spool: Spool):
        self.nc = nc
        self.spool = spool
        self.js = nc.jetstream()
        self.routing = routing
        self.backends = backends
        self.target = target
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    @property
    def cfg(self):
        return self.routing.config.router

    @property
    def timeout(self) -> float:
        return self.routing.config.nats.publish_timeout_s

    async def start(self) -> None:
        await ensure_consumer(self.nc, subjects.OUT_STREAM, consumer_config(self.target, self.cfg.group.ack_wait_s))
        self._task = asyncio.create_task(self._run(), name=f"forward-{self.target}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, 120)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _run(self) -> None:
        sub = await self.js.pull_subscribe_bind(subjects.forward_durable(self.target), stream=subjects.OUT_STREAM)
        try:
            while not self._stop.is_set():
                try:
                    msgs = await sub.fetch(self.cfg.forward.batch, timeout=1.0)
                except TimeoutError:
                    continue
                except Exception as exc:  # NATS reconnecting
                    log.debug("%s: fetch: %s", self.target, exc)
                    await asyncio.sleep(0.5)
                    continue
                try:
                    await self.send(msgs)
                except Exception:
                    log.exception("%s: batch handling failed; the jobs are redelivered", self.target)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def send(self, msgs: list[Msg]) -> None:
        """Send one fetched batch and settle every message (ack, nak with delay, or dead-letter).

        Each job is decoded once (a poison one is terminated and counted, ``group`` = this forwarder)
        with a ``router.forward_job`` span continuing the router's trace; the batch's ``router.forward``
        span is a child of the first job's and links the others, so ingest -> router -> forward is one trace.
        """
        deliveries = await decode(msgs, ForwardJob, f"forward-{self.target}", tracer, "router.forward_job")
        outcomes: dict[int, BaseException | None] = {id(d): None for d in deliveries}
        try:
            await self._send(deliveries, outcomes)
        finally:
            finish(deliveries, [outcomes[id(d)] for d in deliveries])

    async def _send(self, deliveries: list[Delivery[ForwardJob]], outcomes: dict[int, BaseException | None]) -> None:
        jobs: list[Delivery[ForwardJob]] = []
        moved: dict[tuple[str, str], str] = {}
        for d in deliveries:
            job = d.event
            if job.group:
                key = (job.group, job.study_uid)
                if key not in moved:
                    moved[key] = await self.routing.member_of(job.group, job.study_uid) or self.target
                if moved[key] != self.target:
                    with trace.use_span(d.span, end_on_exit=False):
                        await self._hand_on(d.msg, job, moved[key])
                    continue
            jobs.append(d)
        if not jobs:
            return
        unread: list[tuple[Delivery[ForwardJob], UnreadBytes]] = []
        failed: list[Delivery[ForwardJob]] = []
        failure: SendError | None = None
        # Copying and sending may outlast the short ack wait: the jobs stay ours while we work on them.
        with InProgress([d.msg for d in jobs], self.cfg.group.ack_wait_s / 3):
            for part in decisions.sends([d.event.size for d in jobs], self.cfg.forward.batch_bytes):
                if failure is not None:  # not tried: they would arrive before what failed (versions keep their order)
                    failed += [jobs[i] for i in part]
                    continue
                with self.spool.send_folder() as folder:
                    ready = []
                    for i in part:
                        d = jobs[i]
                        # Numbered: two versions of one instance in a batch (A, B, A) are two files, sent in order.
                        path = folder / f"{i:05d}-{uid_name(validate_uid(d.event.sop_uid, 'SOPInstanceUID'))}.dcm"
                        try:
                            await asyncio.to_thread(self._copy, d.event, path)
                        except UnreadBytes as exc:
                            outcomes[id(d)] = exc
                            unread.append((d, exc))
                            continue
                        ready.append((d, path))
                    if ready:
                        failure = await self._send_files(ready)
                if failure is not None:
                    failed += [d for d, _ in ready]
        # settled after the keep-alive stopped: an in-progress ack must not undo a delay
        for d, exc in unread:
            await self._unread(d.msg, d.event, exc)
        if failure is not None:
            for d in failed:
                outcomes[id(d)] = failure
            await self._failed([(d.msg, d.event) for d in failed], str(failure))

    async def _send_files(self, ready: list[tuple[Delivery[ForwardJob], Path]]) -> SendError | None:
        """Send one batch of copied instances, and acknowledge them once the target has taken them all."""
        tcfg = self.cfg.targets[self.target]
        t0 = time.perf_counter()
        links = [trace.Link(d.span.get_span_context()) for d, _ in ready[1:]]
        with tracer.start_as_current_span("router.forward", links=links,
                                          context=trace.set_span_in_context(ready[0][0].span)) as span:
            span.set_attribute("router.target", self.target)
            span.set_attribute("router.instances", len(ready))
            try:
                await asyncio.to_thread(target_for(tcfg, self.cfg.forward.calling_ae).send,
                                        [(d.event, path) for d, path in ready])
            except SendError as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                return exc
        metrics.send_seconds.labels(self.target).observe(time.perf_counter() - t0)
        await self.routing.set_health(self.target, True)
        metrics.target_up.labels(self.target).set(1)
        for d, _ in ready:
            await d.msg.ack()
            metrics.forwarded.labels(self.target).inc()
            metrics.forwarded_bytes.labels(self.target).inc(d.event.size)
        return None

    def _copy(self, job: ForwardJob, path: Path) -> None:
        """Write the job's instance to ``path`` as its Part 10 file, a chunk at a time, verified against its digest
        before the last chunk is written (blocking). From staging, else from a placement: the staging releaser
        removes a staged object only once it is placed and no job names it, but a job made later (an on-complete
        rule, a study moved whole to another gateway) reads the stored copy; so does a job whose staged copy is
        corrupt or unreadable. Raises :class:`UnreadBytes` when no copy could be copied whole."""
        policies = self.routing.config.storage.policies.values()
        names = dict.fromkeys([job.backend, *(b for p in policies for b in p.placements)])
        problems: list[tuple[str, decisions.Unread, str]] = []
        for name in names:
            try:
                store = self.backends.get(name)
                head, size = store.read_range(job.digest, 0, CHUNK)
                with open(path, "wb") as f:
                    chunks = (data for data, _ in verified_chunks(store, job.digest, size, CHUNK, head))
                    write_part10(f, chunks, job.sop_class_uid, job.sop_uid, job.transfer_syntax_uid)
            except KeyError as exc:  # ObjectMissing, or a backend no longer configured
                problems.append((name, "missing", str(exc)))
                continue
            except CorruptObject as exc:
                log.error("%s: instance %s: the copy in %r does not match its digest: %s", self.target, job.sop_uid,
                          name, exc)
                metrics.corrupt_objects.labels(self.target).inc()
                problems.append((name, "corrupt", str(exc)))
                continue
            except OSError as exc:  # an I/O error, a Ceph timeout; or the spool's disk
                log.warning("%s: instance %s: cannot copy from %r: %s", self.target, job.sop_uid, name, exc)
                problems.append((name, "unreadable", str(exc)))
                continue
            if problems:
                why = "; ".join(f"{n} {p}" for n, p, _ in problems if p != "missing") or "no longer staged"
                log.warning("%s: instance %s read from placement %r: %s", self.target, job.sop_uid, name, why)
            return
        raise UnreadBytes(decisions.unread_problem(p for _, p, _ in problems),
                          "; ".join(f"{n}: {p} ({detail})" for n, p, detail in problems))

    async def _unread(self, msg: Msg, job: ForwardJob, exc: UnreadBytes) -> None:
        """Settle a job none of whose copies could be read (retry or dead letter: ``decisions.settle_unread``)."""
        metrics.unread.labels(self.target, exc.problem).inc()
        attempts = _attempts(msg)
        settlement = decisions.settle_unread(exc.problem, attempts, self.cfg.forward, str(exc))
        if isinstance(settlement, decisions.DeadLetter):
            await self._dead_letter(msg, job, settlement.reason, attempts)
            return
        log.warning("%s: instance %s not read, retried in %.1fs: %s", self.target, job.sop_uid, settlement.delay, exc)
        await msg.nak(delay=settlement.delay)

    async def _hand_on(self, msg: Msg, job: ForwardJob, target: str) -> None:
        """The study lives on another member now: queue the job there, and drop it here."""
        new = job.model_copy(update={"target": target})
        await publish_event(self.js, new, self.timeout)
        await msg.ack()

    async def _failed(self, ready: list[tuple[Msg, ForwardJob]], reason: str) -> None:
        log.warning("%s: %d instances not sent: %s", self.target, len(ready), reason)
        await self.routing.set_health(self.target, False)
        metrics.target_up.labels(self.target).set(0)
        reassigned: set[tuple[str, str]] = set()
        for msg, job in ready:
            metrics.forward_failures.labels(self.target).inc()
            attempts = _attempts(msg)
            group = self.cfg.groups.get(job.group) if job.group else None
            settlement = decisions.settle_failure(attempts, group.on_member_down if group else None, self.cfg.forward,
                                                  reason)
            if isinstance(settlement, decisions.Reassign):
                key = (job.group, job.study_uid)
                if key in reassigned or await self.routing.reassign(job.group, job.study_uid, self.target, job.rule):
                    reassigned.add(key)
                    await msg.ack()  # resent whole to the new member
                    continue
                settlement = settlement.otherwise
            if isinstance(settlement, decisions.DeadLetter):
                await self._dead_letter(msg, job, settlement.reason, attempts)
                continue
            await msg.nak(delay=settlement.delay)

    async def _dead_letter(self, msg: Msg, job: ForwardJob, reason: str, attempts: int) -> None:
        log.error("%s: instance %s of study %s dead-lettered after %d attempts: %s", self.target, job.sop_uid,
                  job.study_uid, attempts, reason)
        now = utcnow()
        seq = msg.metadata.sequence.stream
        dl = DeadLetter(job=job, reason=reason, attempts=attempts, failed_at=now, job_sequence=seq)
        await publish_event(self.js, dl, self.timeout)
        ff = ForwardFailed(target=self.target, study_uid=job.study_uid, sop_uid=job.sop_uid, reason=reason,
                           attempts=attempts, failed_at=now, job_sequence=seq)
        await publish_event(self.js, ff, self.timeout)
        metrics.dead_letters.labels(self.target).inc()
        await msg.ack()


def _attempts(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1
