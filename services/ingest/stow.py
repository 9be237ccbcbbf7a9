"""STOW-RS (PS3.18 10.5): ``POST /studies`` and ``/studies/{s}``, the second way in, through the SCP's intake.

Each ``application/dicom`` part of the ``multipart/related`` request is a Part-10 file: its file meta
tells the transfer syntax and UIDs, the data set after it goes to :class:`~.intake.Incoming` as the
chunks arrive (held while small, then streamed to a staging writer), so a request of any size never
sits in memory. The intake then does exactly what it does for a C-STORE: claim-check written
durably, event published and acknowledged by JetStream, and only then the instance counts as stored.
The tenant is the one the request's credentials name (an administrator stores into
``access.default_tenant``); the catalogue records the principal's name as the calling AE, and
``STOW-RS`` as the called AE, which routing rules can match.

The intake (a NATS connection, the staging backend) is opened at the first STOW-RS request, and again
after an open that failed: the read side of the same process must not wait for, or fail with, NATS.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from aiohttp import BodyPartReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import MultipartReader

from services.ingest.connected import ConnectedIntake
from services.ingest.intake import Admission, Incoming, Intake, Received
from services.ingest.stow_response import PartOutcome, stow_answer
from shared.audit import trail as audit
from shared.audit.records import AssociationTally
from shared.config import Config
from shared.dicom.part10 import NotPart10, read_file_meta
from shared.dicom.statuses import CANNOT_UNDERSTAND, TOO_LARGE
from shared.tenancy import Principal
from shared.web.answers import CONFIG, DICOM_JSON, PRINCIPAL, accepts_json, base_url, error, in_thread, path_uid
from shared.web.app import Mount

log = logging.getLogger("dicomflow.ingest.stow")

CALLED_AE = "STOW-RS"
_CHUNK = 1024 * 1024
# No file meta comes near this: a part whose first MiB holds no complete meta group is not a Part-10 file.
_MAX_META = 1024 * 1024


class LazyIntake:
    """The intake of this web process, opened on first use (blocking; an open that fails is tried again)."""

    def __init__(self, config: Config):
        self.config = config
        self._lock = threading.Lock()
        self._connected: ConnectedIntake | None = None

    def get(self) -> Intake:
        """The intake, opened if it is not yet (raises what the NATS connection or the staging backend raised)."""
        with self._lock:
            if self._connected is None:
                self._connected = ConnectedIntake(self.config, f"dicomflow-stow-{os.getpid()}", "stow-nats")
                log.info("STOW-RS intake open: staging %r, NATS %s", self._connected.intake.staging.name,
                         ",".join(self.config.nats_servers()))
            return self._connected.intake

    def close(self) -> None:
        """Drain the NATS connection and close the backends, if they were opened."""
        if self._connected is not None:
            self._connected.close()


_INTAKE = web.AppKey("stow_intake", LazyIntake)


class _Parts(MultipartReader):
    """aiohttp's multipart reader, taking boundaries longer than RFC 2046's 70 characters: Orthanc 1.10's
    DICOMweb client sends a 73-character one (found by its STOW-RS to dicomflow: 400 before)."""

    def _get_boundary(self) -> str:
        boundary = self._mimetype.parameters["boundary"]
        if len(boundary) > 256:
            raise ValueError(f"boundary of {len(boundary)} characters")
        return boundary


def stow(config: Config) -> Mount:
    """STOW-RS's resources as a mount of the DICOMweb application."""
    def add(app: web.Application, prefix: str) -> None:
        app[_INTAKE] = LazyIntake(config)
        app.router.add_resource(f"{prefix}/studies").add_route("POST", _store)
        app.router.add_resource(f"{prefix}/studies/{{study:[^/]+}}").add_route("POST", _store)

        async def close_intake(_app: web.Application) -> None:
            _app[_INTAKE].close()
        app.on_cleanup.append(close_intake)
    return add


def tenant_of_principal(config: Config, principal: Principal) -> str | None:
    """The tenant a STOW-RS request stores into: its principal's, or for an administrator the default tenant."""
    return principal.tenant if principal.tenant is not None else config.access.default_tenant


async def _store(request: web.Request) -> web.StreamResponse:
    if not accepts_json(request.headers.get("Accept", "")):
        return error(406, f"STOW-RS answers {DICOM_JSON} only")
    content_type = parse_mimetype(request.headers.get("Content-Type", ""))
    if (content_type.type, content_type.subtype) != ("multipart", "related"):
        return error(415, f"STOW-RS takes multipart/related; type=\"application/dicom\", not {request.content_type}")
    media = content_type.parameters.get("type", "").strip('"').lower()
    if media != "application/dicom":
        return error(415, f'only type="application/dicom" parts are stored (not {media or "no type"}): '
                          "DICOM JSON or XML metadata with bulk data is not accepted")
    config = request.app[CONFIG]
    study = path_uid(request, "study") if "study" in request.match_info else None
    principal: Principal = request[PRINCIPAL]
    tenant = tenant_of_principal(config, principal)
    if tenant is None:
        return error(403, "this administrator's STOW-RS names no tenant and access.default_tenant is not set")
    try:
        intake = await in_thread(request, request.app[_INTAKE].get)
    except Exception as exc:  # noqa: BLE001 - NATS or staging unreachable: the client may send again later
        log.warning("STOW-RS refused: intake unavailable: %s: %s", type(exc).__name__, exc)
        return error(503, f"cannot store now: {type(exc).__name__}: {exc}", **{"Retry-After": "5"})
    outcomes: list[PartOutcome] = []
    try:
        reader = _Parts(request.headers, request.content)
        while (part := await reader.next()) is not None:
            if isinstance(part, MultipartReader):
                await _drain(part)
                outcomes.append(PartOutcome(CANNOT_UNDERSTAND, "", "", reason="a nested multipart part"))
                continue
            outcomes.append(await _store_part(request, intake, part, principal, tenant, study))
    except (ValueError, AssertionError) as exc:  # aiohttp's multipart parser: a malformed body
        log.warning("STOW-RS from %s refused 400: malformed multipart/related body: %s (Content-Type %s)",
                    principal.name, exc, request.headers.get("Content-Type"))
        return error(400, f"malformed multipart/related body: {exc}")
    if not outcomes:
        log.warning("STOW-RS from %s refused 400: no parts (Content-Type %s)", principal.name,
                    request.headers.get("Content-Type"))
        return error(400, "the request has no parts")
    status, body = stow_answer(outcomes, base_url(request))
    audit.emit(_audit_record(request, principal, outcomes))
    failed = [o for o in outcomes if o.status]
    log.info("STOW-RS from %s (tenant %s): %d stored, %d failed%s", principal.name, tenant,
             len(outcomes) - len(failed), len(failed),
             "".join(f"; {o.sop_uid or '?'}: 0x{o.status:04X} {o.reason}" for o in failed[:5]))
    headers = {"Retry-After": "5"} if status == 503 else {}
    # no "; charset=" parameter: dicomweb-client reads the answer only when the media type is exactly this
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type=DICOM_JSON, headers=headers)


def _audit_record(request: web.Request, principal: Principal, outcomes: list[PartOutcome]):
    """The request's audit record: like an association's, what it stored of which studies (or why not)."""
    tally = AssociationTally(principal.name, "STOW-RS", request.remote or "", via="STOW-RS")
    for o in outcomes:
        tally.add(o.status, o.study_uid, o.sop_class_uid, o.reason)
    return tally.record()


async def _drain(part: BodyPartReader | MultipartReader) -> None:
    if isinstance(part, MultipartReader):
        while (inner := await part.next()) is not None:
            await _drain(inner)
    else:
        await part.release()


async def _store_part(request: web.Request, intake: Intake, part: BodyPartReader, principal: Principal, tenant: str,
                      study: str | None) -> PartOutcome:
    """Read one part into the intake as it arrives; what became of it."""
    media = part.headers.get("Content-Type", "application/dicom").split(";")[0].strip().lower()
    if media != "application/dicom":
        await part.release()
        return PartOutcome(CANNOT_UNDERSTAND, "", "", reason=f"a part of type {media}")
    head, meta, incoming, received = bytearray(), None, None, 0
    try:
        while chunk := await part.read_chunk(_CHUNK):
            if meta is None:
                head += chunk
                meta = read_file_meta(head)
                if meta is None:
                    if len(head) > _MAX_META:
                        raise NotPart10(f"no complete file meta in the first {_MAX_META} bytes")
                    continue
                chunk, head = bytes(head[meta.data_offset:]), bytearray()
                incoming = Incoming(intake)
            received += len(chunk)
            if received > intake.max_instance_bytes:
                await part.release()
                incoming.discard()
                return PartOutcome(TOO_LARGE, meta.sop_class_uid, meta.sop_uid,
                                   reason=f"instance over {intake.max_instance_bytes} bytes")
            if incoming.writer is None and incoming.held + len(chunk) <= intake.stream_above_bytes:
                incoming.add(chunk)  # held in memory: nothing blocks
            else:
                await in_thread(request, incoming.add, chunk)  # a staging write
    except NotPart10 as exc:
        await part.release()
        return PartOutcome(CANNOT_UNDERSTAND, "", "", reason=f"not a DICOM Part-10 file: {exc}")
    except BaseException:
        if incoming is not None:
            await in_thread(request, incoming.discard)
        raise
    if meta is None:
        return PartOutcome(CANNOT_UNDERSTAND, "", "", reason="not a DICOM Part-10 file: it ends inside the file meta")
    admitted: Admission = await in_thread(request, intake.admit, Received(
        data=incoming.take(), transfer_syntax=meta.transfer_syntax_uid, sop_class_uid=meta.sop_class_uid,
        sop_instance_uid=meta.sop_uid, calling_ae=principal.name, called_ae=CALLED_AE, tenant=tenant,
        study_uid=study))
    return PartOutcome(admitted.status, meta.sop_class_uid, meta.sop_uid, admitted.study_uid, admitted.series_uid,
                       admitted.comment)
