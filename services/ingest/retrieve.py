"""C-GET and C-MOVE of the one DICOM AE: which instances a request names, where a C-MOVE sends them.

The decisions are :mod:`shared.catalogue.retrieve`'s (identifier -> request, counts -> status); here
the identifier is read, the caller's tenant confines the catalogue look-up (run on the
:class:`~services.ingest.find.Finder`'s search threads, over its lazily opened catalogue), and a
C-MOVE's destination AE is looked up in ``ingest.move_destinations``. Both engines plan with this;
the lean engine sends the sub-operations itself (:mod:`.suboperations`), pynetdicom its own way.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

from shared.audit import records as audit_records
from shared.audit import trail as audit
from shared.catalogue.find import FindError
from shared.catalogue.retrieve import (
    UNABLE_TO_PROCESS,
    UNKNOWN_DESTINATION,
    RetrieveRequest,
    parse_retrieve_identifier,
)
from shared.config import AccessConfig, MoveDestinationConfig
from shared.dicom.json_model import JsonModelError, json_model
from shared.dicom.statuses import failure_cause
from shared.tenancy import tenant_of_ae
from shared.tls import client_context

from . import metrics
from .find import Finder

log = logging.getLogger("dicomflow.ingest.retrieve")

UNABLE_TO_CALCULATE = 0xA701  # Refused: Out of Resources - Unable to calculate number of matches


@dataclass
class Plan:
    """What to send (catalogue rows, in order) and, for a C-MOVE, where; or a refusal (``status`` set)."""

    rows: list[dict] = field(default_factory=list)
    destination: MoveDestinationConfig | None = None
    tls: ssl.SSLContext | None = None  # the destination's, when it takes DICOM over TLS
    status: int | None = None
    comment: str = ""


class Retriever:
    """Plans the C-GETs and C-MOVEs of calling AEs, each confined to its tenant."""

    def __init__(self, finder: Finder, access: AccessConfig, destinations: dict[str, MoveDestinationConfig]):
        self.finder = finder
        self.access = access
        self.destinations = destinations
        # built once: a bad CA or key file fails the start-up, not the first C-MOVE
        self.tls = {ae: client_context(d.tls_ca, d.tls_cert, d.tls_key, d.tls_check_hostname)
                    for ae, d in destinations.items() if d.tls}

    def plan(self, identifier: bytes, transfer_syntax: str, sop_class: str, calling_ae: str,
             move_destination: str | None = None) -> Plan:
        """The instances the request names for ``calling_ae``'s tenant (and the destination of a C-MOVE).

        Audited as the start of a transfer of those instances (or its refusal).
        """
        plan = self._plan(identifier, transfer_syntax, sop_class, calling_ae, move_destination)
        requestor, destination, via, tenant = self._parties(plan, calling_ae, move_destination)
        audit.emit(audit_records.retrieval(requestor, destination, self.finder.ae_title, plan.rows, via, plan.status,
                                           plan.comment, tenant))
        return plan

    def _plan(self, identifier: bytes, transfer_syntax: str, sop_class: str, calling_ae: str,
              move_destination: str | None) -> Plan:
        kind = "C-GET" if move_destination is None else "C-MOVE"
        try:
            request = parse_retrieve_identifier(json_model(identifier, transfer_syntax), sop_class)
        except JsonModelError as exc:
            return self._refuse(kind, calling_ae, UNABLE_TO_PROCESS, f"identifier cannot be read: {exc}")
        except FindError as exc:
            return self._refuse(kind, calling_ae, exc.status, exc.comment)
        tenant = tenant_of_ae(self.access, calling_ae)
        destination = None
        if move_destination is not None:
            destination = self.destinations.get(move_destination.strip())
            if destination is None:
                return self._refuse(kind, calling_ae, UNKNOWN_DESTINATION,
                                    f"unknown move destination {move_destination.strip()!r}")
            if destination.tenants and tenant not in destination.tenants:
                return self._refuse(kind, calling_ae, UNKNOWN_DESTINATION,
                                    f"move destination {move_destination.strip()!r} is not one of this caller's")
        try:
            rows = [] if tenant is None else self.finder.lookup(lambda catalogue: _rows(catalogue, tenant, request))
        except Exception as exc:  # noqa: BLE001 - the database is down or refused: the SCU may ask again later
            log.exception("%s from %s: the catalogue look-up failed", kind, calling_ae)
            return self._refuse(kind, calling_ae, UNABLE_TO_CALCULATE, f"catalogue unavailable: {failure_cause(exc)}")
        log.info("%s %s from %s (tenant %s)%s: %d instances", kind, request.level, calling_ae, tenant,
                 f" to {move_destination.strip()}" if move_destination else "", len(rows))
        return Plan(rows=rows, destination=destination,
                    tls=None if move_destination is None else self.tls.get(move_destination.strip()))

    def finished(self, plan: Plan, calling_ae: str, move_destination: str | None, failed_uids: list[str],
                 status: int) -> None:
        """Audit the end of a retrieval :meth:`plan` began: which instances reached the requestor (C-GET) or
        the destination (C-MOVE), and which did not."""
        requestor, destination, via, tenant = self._parties(plan, calling_ae, move_destination)
        audit.emit(audit_records.retrieved(requestor, destination, self.finder.ae_title, plan.rows, failed_uids, via,
                                           status, tenant))

    def _parties(self, plan: Plan, calling_ae: str, move_destination: str | None):
        """The audit records' requestor, C-MOVE destination (None for a C-GET), kind and tenant of a retrieval."""
        dest = plan.destination
        return (audit_records.dicom_peer(calling_ae, "", True, "source"),
                None if move_destination is None else audit_records.dicom_peer(
                    move_destination, dest.host if dest else "", False, "destination"),
                "C-GET" if move_destination is None else "C-MOVE", tenant_of_ae(self.access, calling_ae) or "")

    @staticmethod
    def _refuse(kind: str, calling_ae: str, status: int, comment: str) -> Plan:
        metrics.retrieves.labels(kind=kind, status=f"0x{status:04X}").inc()
        log.warning("%s from %s refused 0x%04X: %s", kind, calling_ae, status, comment)
        return Plan(status=status, comment=comment)


def _rows(catalogue, tenant: str, request: RetrieveRequest) -> list[dict]:
    return catalogue.retrievable(tenant, request.patient_id, request.study_uids, request.series_uids,
                                 request.sop_uids)
