"""Who an HTTP request's audit records name: its principal and the address it came from."""

from __future__ import annotations

from aiohttp import web

from shared.audit import trail as audit
from shared.audit.records import retrieval
from shared.contract.events import AuditParticipant

from .answers import PRINCIPAL


def requestor(request: web.Request) -> AuditParticipant:
    """The requesting participant of ``request`` (after authentication): principal name, client address."""
    principal = request.get(PRINCIPAL)
    return AuditParticipant(user_id=principal.name if principal is not None else "-", requestor=True,
                            host=request.remote or "", role="source")


def audit_retrieval(request: web.Request, rows: list[dict], via: str) -> None:
    """Record that ``request`` is answered with the instances of ``rows`` (WADO-RS, WADO-URI, rendered, frames)."""
    principal = request.get(PRINCIPAL)
    audit.emit(retrieval(requestor(request), None, "DICOMweb", rows, via,
                         tenant=(principal.tenant if principal is not None else None) or ""))
