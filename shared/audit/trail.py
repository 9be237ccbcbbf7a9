"""The audit trail of a process: records are handed over without waiting, kept in DICOM_AUDIT, sent to syslog.

Auditing must never block or fail what it audits (a C-STORE, a query): :func:`emit` puts the record on a
bounded queue of a background thread and returns; a full queue drops the record and counts it
(``dicomflow_audit_records_total{result="dropped"}``). The thread has its own event loop and NATS
connection, publishes each record to the ``DICOM_AUDIT`` stream (``Nats-Msg-Id`` = its id, so a retry
after a lost PubAck is one record), retrying while NATS is away, then forwards it to the syslog audit
repository when one is configured. One trail per process, installed at start-up (:func:`install`),
like the process's metrics registry: the shells call :func:`emit` with no trail to pass around.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import socket
import threading
import time

from prometheus_client import Counter

from shared.audit.message import audit_message
from shared.audit.records import application_start, configuration_digest
from shared.audit.syslog import SyslogSender, frame, syslog_message
from shared.backoff import backoff_delay
from shared.config import Config
from shared.contract import subjects
from shared.contract.events import AuditRecord

log = logging.getLogger("dicomflow.audit")

records = Counter("dicomflow_audit_records_total", "Audit records by what became of them: queued, published "
                  "(stored in DICOM_AUDIT), dropped (queue full, or no trail in this process)", ["result"])
forwarded = Counter("dicomflow_audit_syslog_total", "Audit records sent to the syslog audit repository, by result "
                    "(sent, failed)", ["result"])

_STOP = object()


class AuditTrail:
    """A background publisher of audit records (see the module's docstring)."""

    def __init__(self, config: Config, service: str):
        self.config = config
        self.service = service
        self.source_id = config.audit.source_id or f"dicomflow@{socket.gethostname()}"
        self._limit = config.audit.queue
        self._pending = 0
        self._lost = 0  # records given up on while stopping
        self._give_up_lock = threading.Lock()
        self._syslog_failures = 0
        self._syslog_retry_at = 0.0
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),),
                                        name="audit-trail", daemon=True)
        self._thread.start()

    def emit(self, record: AuditRecord | None) -> None:
        """Queue ``record`` (None: nothing to audit) without waiting; dropped and counted when the queue is full."""
        if record is None:
            return
        if not record.source_id:
            record = record.model_copy(update={"source_id": self.source_id})
        try:
            self._loop.call_soon_threadsafe(self._put, record)
        except RuntimeError:  # the trail's loop has ended (the process is stopping)
            records.labels(result="dropped").inc()

    def _put(self, item) -> None:
        if item is not _STOP and (self._pending >= self._limit or self._closing):
            records.labels(result="dropped").inc()
            return
        if item is not _STOP:
            self._pending += 1
            records.labels(result="queued").inc()
        self._queue.put_nowait(item)

    async def _connect(self):
        from shared.bus.connection import connect
        from shared.bus.jetstream import ensure_stream

        attempt = 0
        while True:
            attempt += 1
            try:
                # nats-py retries an absent server forever inside connect(): bound it, to notice close()
                nc = await asyncio.wait_for(connect(self.config, f"dicomflow-audit-{self.service}-{os.getpid()}"),
                                            self.config.nats.connect_timeout_s + 1)
                await ensure_stream(nc, subjects.audit_stream_config(self.config.stream,
                                                                     self.config.audit.max_age_days))
                return nc
            except Exception as exc:  # noqa: BLE001 - NATS away at start-up: records wait in the queue
                if self._closing:
                    raise
                log.warning("audit trail: NATS not reachable (%s: %s); retrying", type(exc).__name__, exc)
                await self._pause(backoff_delay(attempt, 0.5, 10))
                if self._closing:
                    raise

    async def _main(self) -> None:
        from shared.bus.publish import AsyncPublisher

        sender = SyslogSender(self.config.audit.syslog) if self.config.audit.syslog.host else None
        nc = None
        try:
            nc = await self._connect()
            publisher = AsyncPublisher(nc.jetstream(), self.config.nats.publish_timeout_s)
            while True:
                item = await self._queue.get()
                if item is _STOP:
                    return
                self._pending -= 1
                await self._publish(publisher, item)
                if sender is not None:
                    await asyncio.to_thread(self._forward, sender, item)
        except Exception as exc:  # noqa: BLE001 - stopping while NATS was away: what is left is counted as dropped
            self._give_up(f"{type(exc).__name__}: {exc}")
        finally:
            if sender is not None:
                sender.close()
            if nc is not None:
                try:
                    await nc.drain()
                except Exception:  # noqa: BLE001
                    pass

    async def _publish(self, publisher, record: AuditRecord) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await publisher.publish(record)
                records.labels(result="published").inc()
                return
            except Exception as exc:  # noqa: BLE001 - NATS away: keep the record, later ones wait or drop
                if self._closing:
                    records.labels(result="dropped").inc()
                    self._lost += 1
                    log.warning("audit record %s not published before stop: %s", record.audit_id, exc)
                    return
                log.warning("audit record %s not published (%s); retrying", record.audit_id, exc)
                await self._pause(backoff_delay(attempt, 0.2, 5))

    async def _pause(self, seconds: float) -> None:
        """Sleep before a retry, cut short when :meth:`close` gives up waiting."""
        end = self._loop.time() + seconds
        while not self._closing and self._loop.time() < end:
            await asyncio.sleep(min(0.1, end - self._loop.time()))

    def _forward(self, sender: SyslogSender, record: AuditRecord) -> None:
        # A repository that is away would otherwise cost a connection timeout per record, and the queue
        # behind it (the stream's records too) would fill: after a failure, wait before trying again.
        if time.monotonic() < self._syslog_retry_at:
            forwarded.labels(result="failed").inc()
            return
        msg = syslog_message(audit_message(record, self.source_id, self.config.audit.site_id), record.outcome,
                             record.event_time, socket.gethostname(), self.config.audit.syslog.app_name,
                             str(os.getpid()))
        try:
            sender.send(frame(msg))
            forwarded.labels(result="sent").inc()
            self._syslog_failures = 0
        except (OSError, ValueError) as exc:
            forwarded.labels(result="failed").inc()
            self._syslog_failures += 1
            self._syslog_retry_at = time.monotonic() + backoff_delay(self._syslog_failures, 1.0, 30.0)
            log.warning("audit record %s not sent to syslog %s:%d: %s", record.audit_id,
                        self.config.audit.syslog.host, self.config.audit.syslog.port, exc)

    def close(self, timeout: float = 5.0) -> bool:
        """Publish what is queued (for at most ``timeout`` seconds), then stop the thread.

        True when every record emitted was published; False when some were dropped (NATS away).
        """
        try:
            self._loop.call_soon_threadsafe(self._put, _STOP)
        except RuntimeError:
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():  # NATS away: stop retrying; the rest is dropped and counted
            self._closing = True
            self._thread.join(2)
            if self._thread.is_alive():  # still inside a connection attempt: leave it to die with the process
                self._give_up("NATS unreachable")
        return not self._lost and not self._pending

    def _give_up(self, why: str) -> None:
        """Count what is still queued as dropped (once)."""
        with self._give_up_lock:
            if self._pending:
                log.warning("audit trail stopped with %d records unpublished: %s", self._pending, why)
                records.labels(result="dropped").inc(self._pending)
                self._lost += self._pending
                self._pending = 0


_trail: AuditTrail | None = None
_lock = threading.Lock()


def install(config: Config, service: str) -> AuditTrail | None:
    """Start this process's audit trail (once) and record the start with the configuration's digest.

    None when ``audit.enabled`` is false. Call :func:`close` before the process exits.
    """
    global _trail
    if not config.audit.enabled:
        return None
    with _lock:
        if _trail is None:
            _trail = AuditTrail(config, service)
    _trail.emit(application_start(service, str(os.getpid()), socket.gethostname(),
                                  configuration_digest(config.model_dump(mode="json")), _version()))
    return _trail


def _version() -> str:
    try:
        return importlib.metadata.version("dicomflow")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def emit(record: AuditRecord | None) -> None:
    """Hand ``record`` to this process's trail without waiting (no trail: counted as dropped)."""
    trail = _trail
    if trail is None:
        if record is not None:
            records.labels(result="dropped").inc()
        return
    trail.emit(record)


def close(timeout: float = 5.0) -> None:
    """Flush and stop this process's trail (a later :func:`install` starts a new one)."""
    global _trail
    with _lock:
        trail, _trail = _trail, None
    if trail is not None:
        trail.close(timeout)
