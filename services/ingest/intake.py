"""The path of one received instance: validate -> digest -> claim-check -> publish -> status.

Knows nothing of sockets: the SCP shell hands over the bytes and the request, this answers the
DICOM status. Success is returned only after the bytes are durable in the staging backend and
JetStream has acknowledged the event; anything else is a failure status, so the modality keeps
the instance and an acknowledged instance is never lost.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace

from services.ingest import metrics
from shared.bus.publish import Publisher
from shared.contract.events import InstanceReceived, utcnow
from shared.contract.uids import MAX_UID_LEN
from shared.dicom.statuses import (
    NAMES,
    OUT_OF_RESOURCES,
    SOP_CLASS_MISMATCH,
    SOP_INSTANCE_MISMATCH,
    STUDY_MISMATCH,
    SUCCESS,
    TOO_LARGE,
    Rejection,
    failure_cause,
)
from shared.dicom.tags import file_meta_length, read_tags
from shared.storage.objectstore import ObjectStore, ObjectWriter, content_digest

log = logging.getLogger("dicomflow.ingest")
tracer = trace.get_tracer("dicomflow.ingest")

@dataclass(frozen=True)
class Received:
    """One instance as a shell received it (a C-STORE request, a STOW-RS part).

    ``data`` is the data set's bytes, or for a large one the staging backend's writer that took
    them as they arrived (:meth:`Intake.open_writer`); the intake commits or discards it.
    ``tenant``: the tenant the sender's credentials name (STOW-RS); None: decided from the calling
    AE (and a gateway's InstitutionName). ``study_uid``: the only study the sender may add to.
    """

    data: bytes | ObjectWriter
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae: str
    called_ae: str
    tenant: str | None = None
    study_uid: str | None = None  # the study the request is confined to (STOW-RS /studies/{s}); None: any


class Incoming:
    """One received data set as its fragments arrive (a C-STORE's PDVs, a STOW-RS part's chunks): held in
    memory while small, then streamed.

    Once it outgrows the intake's ``stream_above_bytes`` it goes to a staging writer piece by piece
    (written, hashed, writeback started), so the receiver never holds a large instance whole and
    the disk works while the rest is still on the wire.
    """

    __slots__ = ("intake", "parts", "held", "writer")

    def __init__(self, intake: Intake):
        self.intake = intake
        self.parts: list[memoryview] = []
        self.held = 0
        self.writer: ObjectWriter | None = None

    def add(self, fragment: bytes | memoryview) -> None:
        """Take the next piece of the data set."""
        if self.writer is not None:
            self.writer.write(fragment)
            return
        self.parts.append(fragment)
        self.held += len(fragment)
        if self.held > self.intake.stream_above_bytes:
            self.writer = self.intake.open_writer()
            for part in self.parts:
                self.writer.write(part)
            self.parts = []

    def take(self) -> bytes | ObjectWriter:
        """The whole data set: its bytes, or the writer that holds them (the intake commits or discards it)."""
        return self.writer if self.writer is not None else b"".join(self.parts)

    def discard(self) -> None:
        """Drop what was received (a staging writer discards its uncommitted object)."""
        if self.writer is not None:
            self.writer.close()
        self.parts = []


@dataclass(frozen=True)
class Admission:
    """What the intake answered for one instance (the UIDs are empty where the data set could not be read)."""

    status: int
    comment: str
    study_uid: str = ""
    series_uid: str = ""


class Intake:
    """Turns received instances into durable bytes plus an acknowledged event."""

    def __init__(self, staging: ObjectStore, publisher: Publisher, max_instance_bytes: int,
                 stream_above_bytes: int = 256 * 1024,
                 tenant_of: Callable[[str, str], str | None] = lambda calling_ae, institution: "",
                 strict_uids: bool = False):
        self.staging = staging
        self.strict_uids = strict_uids  # PS3.5 9.1 UIDs only (ingest.strict_uids)
        self.publisher = publisher
        self.tenant_of = tenant_of  # (calling AE, InstitutionName) -> tenant: shared.tenancy.tenant_of_instance
        self.max_instance_bytes = max_instance_bytes
        self.stream_above_bytes = stream_above_bytes
        self.receiver = f"{socket.gethostname()}/{os.getpid()}"

    def open_writer(self) -> ObjectWriter:
        """Where the SCP shell puts a data set that outgrew ``stream_above_bytes``, piece by piece."""
        return self.staging.writer(self.max_instance_bytes)

    def accept(self, rcv: Received) -> tuple[int, str]:
        """Handle one instance; returns (DICOM status, error comment)."""
        admitted = self.admit(rcv)
        return admitted.status, admitted.comment

    def admit(self, rcv: Received) -> Admission:
        """Handle one instance; returns its status, error comment and, where they could be read, its UIDs."""
        start = time.perf_counter()
        seen: dict = {}  # what admit needs back: "tags", and "writer" where _accept opened one
        with tracer.start_as_current_span("ingest.c_store", kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("dicom.calling_ae", rcv.calling_ae)
            span.set_attribute("dicom.size", _size(rcv.data))
            try:
                status, comment = self._accept(rcv, span, seen)
            except Rejection as rej:
                status, comment = rej.status, rej.reason
            finally:
                for writer in (_writer(rcv.data), seen.get("writer")):
                    if writer is not None:
                        writer.close()  # discards what was not committed
            span.set_attribute("dicom.status", f"0x{status:04X}")
            if status != SUCCESS:
                span.set_status(trace.Status(trace.StatusCode.ERROR, comment))
                log.warning("C-STORE from %s sop=%s refused 0x%04X (%s): %s", rcv.calling_ae,
                            rcv.sop_instance_uid[:64], status, NAMES.get(status, "?"), comment)
        metrics.instances.labels(status=f"0x{status:04X}").inc()
        metrics.latency.observe(time.perf_counter() - start)
        tags = seen.get("tags")
        return Admission(status, comment, tags.study_uid if tags else "", tags.series_uid if tags else "")

    def _without_head(self, writer: ObjectWriter, skip: int) -> ObjectWriter:
        """A new staging writer holding what ``writer`` holds after its first ``skip`` bytes (``writer`` closed)."""
        rest = self.open_writer()
        try:
            with memoryview(writer.contents()) as whole, whole[skip:] as tail:  # released before writer closes
                rest.write(tail)
        except BaseException:
            rest.close()
            raise
        finally:
            writer.close()
        return rest

    def _accept(self, rcv: Received, span: trace.Span, seen: dict) -> tuple[int, str]:
        data = rcv.data
        size = _size(data)
        if size > self.max_instance_bytes:
            raise Rejection(TOO_LARGE, f"instance of {size} bytes exceeds {self.max_instance_bytes}")
        writer = _writer(data)
        if writer is not None and writer.failure is not None:
            return _not_durable(writer.failure)
        if skip := file_meta_length(data if writer is None else writer.contents()):
            # the sender sent its file after the preamble: what is stored is the data set after the meta
            metrics.tolerated.labels(kind="file_meta_in_data_set").inc()
            if writer is None:
                data = bytes(memoryview(data)[skip:])
            else:
                data = writer = seen["writer"] = self._without_head(writer, skip)  # admit closes it
                if writer.failure is not None:
                    return _not_durable(writer.failure)
            size = _size(data)
        tags = read_tags(data if writer is None else writer.contents(), rcv.transfer_syntax, self.strict_uids)
        seen["tags"] = tags
        span.set_attribute("dicom.study_uid", tags.study_uid)
        span.set_attribute("dicom.sop_uid", tags.sop_uid)
        if not _same_instance(tags.sop_uid, rcv.sop_instance_uid.strip()):
            raise Rejection(SOP_INSTANCE_MISMATCH,
                            f"data set SOPInstanceUID {tags.sop_uid} differs from the request's {rcv.sop_instance_uid[:64]}")
        if tags.sop_class_uid and rcv.sop_class_uid and tags.sop_class_uid != rcv.sop_class_uid.strip():
            raise Rejection(SOP_CLASS_MISMATCH,
                            f"data set SOPClassUID {tags.sop_class_uid} differs from the request's {rcv.sop_class_uid}")
        if rcv.study_uid is not None and tags.study_uid != rcv.study_uid:
            raise Rejection(STUDY_MISMATCH, f"instance of study {tags.study_uid}, posted to study {rcv.study_uid}")
        meta = {"sop_uid": tags.sop_uid, "study_uid": tags.study_uid}
        t0 = time.perf_counter()
        try:
            if writer is None:
                digest = content_digest(data)
                self.staging.put(digest, data, meta)
            else:
                digest = writer.commit(meta)
        except Exception as exc:
            return _not_durable(exc)
        metrics.staging_latency.observe(time.perf_counter() - t0)
        event = InstanceReceived(tags=tags, transfer_syntax_uid=rcv.transfer_syntax, digest=digest,
                                 size=size, backend=self.staging.name, calling_ae=rcv.calling_ae,
                                 called_ae=rcv.called_ae, received_at=utcnow(), receiver=self.receiver,
                                 receipt=uuid.uuid4().hex,
                                 tenant=rcv.tenant if rcv.tenant is not None
                                 else self.tenant_of(rcv.calling_ae, tags.institution_name) or "")
        t0 = time.perf_counter()
        try:
            self.publisher.publish(event)  # in this thread, under the c_store span: the store continues its trace
        except Exception as exc:
            metrics.failures.labels(stage="publish").inc()
            log.warning("event of %s not acknowledged: %s: %s", tags.sop_uid, type(exc).__name__, exc)
            return OUT_OF_RESOURCES, f"event not acknowledged by NATS: {failure_cause(exc)}"
        metrics.publish_latency.observe(time.perf_counter() - t0)
        metrics.bytes_received.inc(size)
        return SUCCESS, ""


def _same_instance(data_set_uid: str, request_uid: str) -> bool:
    """Whether the request names the data set's SOP instance. dcmtk keeps a command's UIDs in 64 characters
    (DIC_UI_LEN): its storescu sends a longer SOP Instance UID cut there, which its storescp takes."""
    return data_set_uid == request_uid or (len(request_uid) == MAX_UID_LEN < len(data_set_uid)
                                           and data_set_uid.startswith(request_uid))


def _not_durable(exc: BaseException) -> tuple[int, str]:
    """The answer when the claim-check could not be written: out of resources, so the modality retries."""
    metrics.failures.labels(stage="staging").inc()
    log.warning("claim-check not written: %s: %s", type(exc).__name__, exc)
    return OUT_OF_RESOURCES, f"staging write failed: {failure_cause(exc)}"


_BYTES = (bytes, bytearray, memoryview)


def _writer(data: bytes | ObjectWriter) -> ObjectWriter | None:
    return None if isinstance(data, _BYTES) else data


def _size(data: bytes | ObjectWriter) -> int:
    return len(data) if isinstance(data, _BYTES) else data.size
