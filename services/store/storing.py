"""The store's handling of one instance event: versions -> policy -> placements -> catalogue -> stored event.

Idempotent: a redelivered event finds its objects present (content-addressed) and its catalogue row
unchanged, and re-publishes the stored event under the same Nats-Msg-Id (de-duplicated). Any
failure raises, so the event is redelivered rather than acknowledged.

Versions: every receipt of an instance is an event of its own (the ingest's ``receipt``), so the
catalogue, not JetStream's duplicate window, tells a version from a resend, whatever the time between
them (:func:`~shared.catalogue.sql.version_outcome`): the same bytes again are recorded once and publish
no second stored event, and an older version redelivered after a newer one changes nothing (the last
version answered with success wins). Both are settled before anything is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from opentelemetry import trace

from shared.bus.delivery import Delivery
from shared.bus.publish import AsyncPublisher
from shared.catalogue.sql import SqlCatalogue, version_outcome
from shared.config import Config
from shared.contract.events import InstanceReceived, InstanceRejected, InstanceStored, utcnow
from shared.storage.objectstore import Backends, Capability, ObjectMissing
from shared.storage.reading import verified_chunks

from . import metrics, study_index
from .cataloguing import catalogue_entry
from .index import GroupCommit, Recorded
from .placement import choose_policy, placements_of, tenant_of_event
from .placement_plan import BackendPlan, Check, Copy, plan_placements
from .rejection_notes import handle_note, may_be_note

log = logging.getLogger("dicomflow.store")

# A streamed copy's read size: few round trips to an OSD per object, little memory per copy.
STREAM_CHUNK = 4 * 1024 * 1024


@dataclass(eq=False)
class _Item:
    """One instance of a batch with a placement policy, on its way through the steps."""

    index: int
    event: InstanceReceived
    tenant: str
    policy: str
    placements: list[str]
    span: trace.Span
    seq: int = 0  # stream sequence of the event: which of two versions was answered last
    stored_at: datetime | None = None
    recorded: Recorded | None = None


class Storer:
    """Stores instance events; the handler of the store's consumer group."""

    def __init__(self, config: Config, js: JetStreamContext, backends: Backends, catalogue: SqlCatalogue):
        self.config = config
        self.js = js
        self.publisher = AsyncPublisher(js, config.nats.publish_timeout_s)
        self.backends = backends
        self.catalogue = catalogue
        self._commits = GroupCommit(catalogue)
        self._writers_prepared: set[str] = set()  # backends this process has streamed into

    def _only_local_check(self, event: InstanceReceived, placements: list[str]) -> bool:
        """Whether placing is only confirming the claim-check on a local filesystem (the embedded default)."""
        backends = self.config.storage.backends
        return all(name == event.backend and backends[name].kind == "fs" for name in placements)

    # ---------------------------------------------------------------- batches
    async def handle_batch(self, deliveries: list[Delivery[InstanceReceived]]) -> list[BaseException | None]:
        """Handle one pull's instance events together; one outcome per delivery (None: acknowledge).

        Per instance, in this order of durability: the object in every placement, then its entry in the
        RADOS study index objects, then the catalogue rows, then the stored event. The work is shared by
        the batch: objects written concurrently, one index write per study and backend, one catalogue
        transaction, stored events published back to back and their PubAcks awaited together. Under a
        backlog a pull brings many messages, so the store gets cheaper per instance as it falls behind.
        The consumer decoded the events (parking poison ones) and started and ends their spans.
        """
        outcomes: list[BaseException | None] = [None] * len(deliveries)
        work: list[_Item] = []
        for i, d in enumerate(deliveries):
            event, span = d.event, d.span
            span.set_attribute("dicom.study_uid", event.tags.study_uid)
            span.set_attribute("dicom.sop_uid", event.tags.sop_uid)
            tenant = tenant_of_event(self.config.access, event)
            if tenant != event.tenant:  # an event of a version before tenants: the tenant travels with it from here
                event = event.model_copy(update={"tenant": tenant})
            span.set_attribute("dicom.tenant", tenant)
            policy = choose_policy(self.config, tenant, event.calling_ae, event.tags.institution_name)
            if policy is None:
                try:
                    await self._reject(event, f"no placement policy for tenant {tenant!r} (calling AE "
                                              f"{event.calling_ae!r}, institution {event.tags.institution_name!r}) "
                                              f"and no default policy", span)
                except Exception as exc:
                    outcomes[i] = exc
                continue
            work.append(_Item(i, event, tenant, policy, placements_of(self.config.storage, policy), span,
                              d.stream_seq))
        work = await self._current_versions(work, outcomes)
        await self._place_batch(work, outcomes)
        await self._index_batch(work, outcomes)
        await self._publish_batch(work, outcomes)
        await self._apply_rejection_notes(work, outcomes)
        return outcomes

    async def _current_versions(self, work: list[_Item], outcomes: list[BaseException | None]) -> list[_Item]:
        """The items that bring a version the catalogue does not hold (or a redelivery of the event that
        brought it); a resend of the held bytes or an older version is acknowledged here and goes no further."""
        if not work:
            return work
        try:
            held: dict[tuple[str, str], tuple[str, int]] = {}
            for tenant in {it.tenant for it in work}:
                sops = [it.event.tags.sop_uid for it in work if it.tenant == tenant]
                found = await asyncio.to_thread(self.catalogue.versions, tenant, sops)
                held.update(((tenant, sop), v) for sop, v in found.items())
        except Exception as exc:
            metrics.failures.labels("versions").inc()
            for it in work:
                outcomes[it.index] = exc
            return []
        keep = []
        for it in work:  # in stream order: a later item of the batch sees the version an earlier one brings
            key = (it.tenant, it.event.tags.sop_uid)
            outcome = version_outcome(held.get(key), it.event.digest, it.seq).outcome
            if outcome in ("resent", "stale"):
                metrics.instances.labels(outcome).inc()
                log.info("instance %s (%s, stream sequence %d): %s, nothing to store", it.event.tags.sop_uid,
                         it.event.digest[:16], it.seq, "the version held, received again" if outcome == "resent"
                         else f"older than the version held ({held[key][0][:16]}, sequence {held[key][1]})")
                it.span.set_attribute("store.outcome", outcome)
                continue
            held[key] = (it.event.digest, it.seq)
            keep.append(it)
        return keep

    async def _apply_rejection_notes(self, work: list[_Item], outcomes: list[BaseException | None]) -> None:
        """Stored rejection notes (KOS titled with a rejection code of CID 7010) delete what they reference, after the note is stored."""
        for it in work:
            if outcomes[it.index] is None and may_be_note(self.config, it.event):
                try:
                    await handle_note(self.config, self.js, self.catalogue, self.backends, it.event, it.tenant,
                                      it.placements)
                except Exception as exc:
                    log.exception("rejection note %s not applied", it.event.tags.sop_uid)
                    metrics.failures.labels("rejection_note").inc()
                    outcomes[it.index] = exc

    async def _place_batch(self, work: list[_Item], outcomes: list[BaseException | None]) -> None:
        t0 = time.perf_counter()
        local, remote = [], []
        for it in work:
            (local if self._only_local_check(it.event, it.placements) else remote).append(it)
        if local:  # only stats of local files: a thread hop would cost more than the calls
            errors = self.place_many([(it.event, it.placements) for it in local])
            for it, err in zip(local, errors, strict=True):
                outcomes[it.index] = err
        if remote:
            errors = await asyncio.to_thread(self.place_many, [(it.event, it.placements) for it in remote])
            for it, err in zip(remote, errors, strict=True):
                outcomes[it.index] = err
        failed = sum(1 for it in work if outcomes[it.index] is not None)
        if failed:
            metrics.failures.labels("place").inc(failed)
        if work:
            per = (time.perf_counter() - t0) / len(work)
            for _ in work:
                metrics.place_seconds.observe(per)

    def place_many(self, items: list[tuple[InstanceReceived, list[str]]]) -> list[Exception | None]:
        """Make sure every placement holds each instance's object, backend by backend (blocking).

        Follows :func:`placement_plan.plan_placements`: the staging backend itself is only checked
        (the ingest made the claim-check durable there); other backends get the bytes, read back from
        staging and verified, with their writes in flight together (``put_many``). No exists() first:
        put is idempotent, and each backend knows whether a rewrite or a check is cheaper (a stat is a
        synchronous round trip to an OSD per object). An instance above ``store.stream_above_bytes`` is
        streamed instead (:meth:`copy_streamed`), after the backend's batch.
        """
        errors: list[Exception | None] = [None] * len(items)
        held: dict[int, bytes] = {}  # bytes read at an instance's first copy, until its last copy took them
        plans = plan_placements([(event.backend, placements) for event, placements in items],
                                [event.size for event, _ in items], self.config.store.stream_above_bytes)
        for backend_plan in plans:
            taken: list[int] = []  # the instance of each write put_many got, in its order
            streamed: list[Copy] = []  # the copies too large to hold, left to copy_streamed
            writes = self._writes(backend_plan, items, errors, held, taken, streamed)
            results = self.backends.get(backend_plan.backend).put_many(writes)
            for i, err in zip(taken, results, strict=True):
                if err is None:
                    metrics.bytes_written.labels(backend_plan.backend).inc(items[i][0].size)
                else:
                    errors[i] = err
                    held.pop(i, None)
            for step in streamed:
                if errors[step.item] is not None:
                    continue
                event = items[step.item][0]
                try:
                    self.copy_streamed(event, step.source, backend_plan.backend)
                except Exception as exc:
                    errors[step.item] = exc
                    continue
                metrics.bytes_written.labels(backend_plan.backend).inc(event.size)
                metrics.streamed.labels(backend_plan.backend).inc()
        return errors

    def copy_streamed(self, event: InstanceReceived, source: str, backend: str) -> None:
        """Copy one instance's object from ``source`` into ``backend`` chunk by chunk (blocking).

        The source's chunks are verified against the digest on the way (the last one is handed on only
        once the whole object matched), and the destination's writer commits only bytes that hash to
        it: a mismatch raises CorruptObject, as a whole read's does, and nothing is committed.
        """
        target = self.backends.get(backend)
        if backend not in self._writers_prepared:
            # As a receiver does at start-up: a store worker killed mid-copy left its unlocked temporary file
            # (as large as the instance) in this backend, which the next worker to stream there removes.
            target.prepare_writer()
            self._writers_prepared.add(backend)
        writer = target.writer(event.size, event.digest)
        try:
            for data, _ in verified_chunks(self.backends.get(source), event.digest, event.size, STREAM_CHUNK):
                writer.write(data)
                if writer.failure is not None:
                    raise writer.failure
            writer.commit({"sop_uid": event.tags.sop_uid, "study_uid": event.tags.study_uid,
                           "series_uid": event.tags.series_uid})
        finally:
            writer.close()

    def _writes(self, plan: BackendPlan, items: list[tuple[InstanceReceived, list[str]]],
                errors: list[Exception | None], held: dict[int, bytes], taken: list[int], streamed: list[Copy]):
        """The writes of one backend's plan, produced as the backend takes them.

        Lazily: the first writes are in flight while later claim-checks are still being read and
        verified. A failed check or read goes to ``errors`` (the instance is left out of the later
        backends); each write produced is noted in ``taken``; a copy to stream goes to ``streamed``.
        """
        backend = self.backends.get(plan.backend)
        for step in plan.steps:
            i = step.item
            if errors[i] is not None:
                continue
            event = items[i][0]
            if isinstance(step, Copy) and step.stream:
                streamed.append(step)
                continue
            try:
                if isinstance(step, Check):
                    if not backend.exists(event.digest):
                        raise ObjectMissing(f"{event.digest} is not in staging backend {plan.backend!r}")
                    continue
                body = held.pop(i, None)
                if body is None:
                    body = self.backends.get(step.source).get(event.digest)  # verifies the digest
            except Exception as exc:
                errors[i] = exc
                held.pop(i, None)
                continue
            taken.append(i)
            if step.keep:
                held[i] = body
            yield event.digest, body, {"sop_uid": event.tags.sop_uid, "study_uid": event.tags.study_uid,
                                       "series_uid": event.tags.series_uid}
            body = None

    async def _index_batch(self, work: list[_Item], outcomes: list[BaseException | None]) -> None:
        t0 = time.perf_counter()
        placed = [it for it in work if outcomes[it.index] is None]
        stored_at = utcnow()
        for it in placed:
            it.stored_at = stored_at
        indexed_items = [it for it in placed if any(self._keeps_study_index(n) for n in it.placements)]
        if indexed_items:
            errors = await asyncio.to_thread(self.index_in_study_indexes, indexed_items)
            for it, err in zip(indexed_items, errors, strict=True):
                if err is not None:
                    outcomes[it.index] = err
                    metrics.failures.labels("study_index").inc()
        ready = [it for it in placed if outcomes[it.index] is None]
        if not ready:
            return
        try:
            entries = await asyncio.to_thread(self._entries, ready)
            recorded = await self._commits.record_many(entries)
        except Exception as exc:
            for it in ready:
                outcomes[it.index] = exc
            return
        for it, rec in zip(ready, recorded, strict=True):
            it.recorded = rec
            metrics.instances.labels(rec.outcome).inc()
        per = (time.perf_counter() - t0) / len(ready)
        for _ in ready:
            metrics.index_seconds.observe(per)

    def _entries(self, items: list[_Item]):
        """The catalogue entries of placed instances, each from its object's head in staging (blocking)."""
        return [catalogue_entry(self.backends.get(it.event.backend), it.event, it.tenant, it.policy, it.placements,
                                it.stored_at.isoformat(), it.seq) for it in items]

    def _keeps_study_index(self, name: str) -> bool:
        return Capability.STUDY_INDEX in self.backends.get(name).capabilities

    def index_in_study_indexes(self, items: list[_Item]) -> list[Exception | None]:
        """One index write per study and placement that keeps a study index (RADOS omaps, the filesystem
        store's index files) for the whole batch, in flight together (blocking)."""
        errors: list[Exception | None] = [None] * len(items)
        by_backend: dict[str, dict[str, list[int]]] = {}  # backend -> study -> positions in items
        for k, it in enumerate(items):
            for name in it.placements:
                if self._keeps_study_index(name):
                    by_backend.setdefault(name, {}).setdefault(it.event.tags.study_uid, []).append(k)
        for name, by_study in by_backend.items():
            studies = list(by_study.values())
            entries = [[(items[k].event, items[k].policy, items[k].placements, items[k].stored_at.isoformat())
                        for k in members] for members in studies]
            try:
                outcomes = study_index.record_studies(self.backends.get(name), entries)
            except Exception as exc:
                outcomes = [exc] * len(studies)
            for members, err in zip(studies, outcomes, strict=True):
                if err is not None:
                    for k in members:
                        errors[k] = err
        return errors

    async def _publish_batch(self, work: list[_Item], outcomes: list[BaseException | None]) -> None:
        # A version another writer recorded meanwhile ("resent", "stale") publishes nothing.
        ready = [it for it in work if outcomes[it.index] is None and it.recorded is not None
                 and it.recorded.outcome in ("new", "replaced", "same")]
        coros = []
        for it in ready:
            t, e = it.event.tags, it.event
            stored = InstanceStored(tags=t, transfer_syntax_uid=e.transfer_syntax_uid, digest=e.digest, size=e.size,
                                    policy=it.policy, placements=it.placements, calling_ae=e.calling_ae,
                                    stored_at=it.stored_at, replaced_digest=it.recorded.replaced_digest,
                                    tenant=it.tenant, source_seq=it.seq)
            coros.append(self.publisher.publish(stored, span=it.span))
        # gather starts them in order: the stored events of a partition are published in its order.
        results = await asyncio.gather(*coros, return_exceptions=True)
        for it, res in zip(ready, results, strict=True):
            if isinstance(res, BaseException):
                outcomes[it.index] = res
                metrics.failures.labels("publish").inc()

    async def _reject(self, event: InstanceReceived, reason: str, span: trace.Span) -> None:
        log.error("instance %s of study %s not stored: %s", event.tags.sop_uid, event.tags.study_uid, reason)
        metrics.instances.labels("rejected").inc()
        rej = InstanceRejected(tags=event.tags, digest=event.digest, reason=reason, rejected_at=utcnow())
        await self.publisher.publish(rej, span=span)
