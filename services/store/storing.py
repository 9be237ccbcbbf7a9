"""The store's handling of one instance event: policy -> placements -> index -> stored event.

Idempotent: a redelivered event finds its objects present (content-addressed) and its index row
unchanged, and re-publishes the stored event under the same Nats-Msg-Id (de-duplicated). Any
failure raises, so the event is redelivered rather than acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from pydantic import ValidationError

from shared import subjects
from shared.bus import publish_event
from shared.config import Config
from shared.events import InstanceReceived, InstanceRejected, InstanceStored, utcnow
from shared.objectstore import Backends, ObjectMissing
from shared.telemetry import extract_context

from . import metrics, rados_index
from .index import GroupCommit, Index
from .placement import choose_policy, placements_of

log = logging.getLogger("dicomflow.store")
tracer = trace.get_tracer("dicomflow.store")


class Storer:
    """Stores instance events; the handler of the store's consumer group."""

    def __init__(self, config: Config, js: JetStreamContext, backends: Backends, index: Index):
        self.config = config
        self.js = js
        self.backends = backends
        self.index = index
        self._commits = GroupCommit(index)

    def place(self, event: InstanceReceived, placements: list[str]) -> None:
        """Make sure every placement holds the object (blocking; run in a thread)."""
        data = None
        for name in placements:
            backend = self.backends.get(name)
            if name == event.backend:
                # The claim-check itself: the ingest made it durable there; only confirm it is present.
                if not backend.exists(event.digest):
                    raise ObjectMissing(f"{event.digest} is not in staging backend {name!r}")
                continue
            # No exists() first: put is idempotent, and each backend knows whether a rewrite or a check is
            # cheaper (a stat is a synchronous round trip to an OSD per object).
            if data is None:
                data = self.backends.get(event.backend).get(event.digest)  # verifies the digest
            backend.put(event.digest, data, {"sop_uid": event.tags.sop_uid, "study_uid": event.tags.study_uid,
                                             "series_uid": event.tags.series_uid, "size": str(event.size)})
            metrics.bytes_written.labels(name).inc(event.size)

    def _only_local_check(self, event: InstanceReceived, placements: list[str]) -> bool:
        """Whether placing is only confirming the claim-check on a local filesystem (the embedded default)."""
        backends = self.config.storage.backends
        return all(name == event.backend and backends[name].kind == "fs" for name in placements)

    def index_in_rados(self, event: InstanceReceived, policy: str, placements: list[str], stored_at: str) -> None:
        """Add the instance to its study's index object in every RADOS placement (before the SQLite row)."""
        for name in placements:
            backend = self.backends.get(name)
            if rados_index.is_rados(backend):
                rados_index.record_entry(backend, event, policy, placements, stored_at)

    async def handle(self, msg: Msg) -> None:
        """Handle one ``dicom.part.*`` message."""
        with tracer.start_as_current_span("store.instance", context=extract_context(msg.headers),
                                          kind=trace.SpanKind.CONSUMER) as span:
            try:
                event = InstanceReceived.model_validate_json(msg.data)
            except ValidationError as exc:
                # Poison: retrying cannot fix it. Logged and acknowledged; nothing to store.
                log.error("undecodable event on %s dropped: %s", msg.subject, exc)
                metrics.instances.labels("undecodable").inc()
                return
            t = event.tags
            span.set_attribute("dicom.study_uid", t.study_uid)
            span.set_attribute("dicom.sop_uid", t.sop_uid)
            policy = choose_policy(self.config.storage, event.calling_ae, t.institution_name)
            if policy is None:
                await self._reject(event, f"no placement policy for calling AE {event.calling_ae!r} / "
                                          f"institution {t.institution_name!r} and no default policy")
                return
            placements = placements_of(self.config.storage, policy)
            t0 = time.perf_counter()
            try:
                if self._only_local_check(event, placements):
                    self.place(event, placements)  # one stat: a thread hop would cost more than the call
                else:
                    await asyncio.to_thread(self.place, event, placements)
            except Exception:
                metrics.failures.labels("place").inc()
                raise
            metrics.place_seconds.observe(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stored_at = utcnow()
            try:
                if any(rados_index.is_rados(self.backends.get(name)) for name in placements):
                    await asyncio.to_thread(self.index_in_rados, event, policy, placements, stored_at.isoformat())
            except Exception:
                metrics.failures.labels("rados_index").inc()
                raise
            recorded = await self._commits.record(event, policy, placements, stored_at.isoformat())
            metrics.index_seconds.observe(time.perf_counter() - t0)
            metrics.instances.labels(recorded.outcome).inc()
            stored = InstanceStored(tags=t, transfer_syntax_uid=event.transfer_syntax_uid, digest=event.digest,
                                    size=event.size, policy=policy, placements=placements, calling_ae=event.calling_ae,
                                    stored_at=stored_at, replaced_digest=recorded.replaced_digest)
            try:
                await publish_event(self.js, subjects.instance_stored(t.study_uid, t.sop_uid), stored,
                                    stored.msg_id(), self.config.nats.publish_timeout_s)
            except Exception:
                metrics.failures.labels("publish").inc()
                raise

    async def _reject(self, event: InstanceReceived, reason: str) -> None:
        log.error("instance %s of study %s not stored: %s", event.tags.sop_uid, event.tags.study_uid, reason)
        metrics.instances.labels("rejected").inc()
        rej = InstanceRejected(tags=event.tags, digest=event.digest, reason=reason, rejected_at=utcnow())
        await publish_event(self.js, subjects.instance_rejected(event.tags.study_uid, event.tags.sop_uid), rej,
                            f"rejected:{event.tags.sop_uid}:{event.digest[:32]}", self.config.nats.publish_timeout_s)
