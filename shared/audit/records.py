"""The audit record of each audited action, built from plain facts (no I/O): who, what, which studies, outcome.

The shells (SCP, DICOMweb, CLI, service start) call these and hand the record to
:func:`shared.audit.trail.emit`. Who is what follows PS3.15 A.5.3: the party that asked is the requestor;
for stores the sending modality is the Source and our AE the Destination; for a retrieval our AE is the
Source and the receiver (the C-GET caller, the C-MOVE destination, the WADO client) the Destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime

from shared.contract.events import AuditParticipant, AuditQuery, AuditRecord, AuditStudy, utcnow

SUCCESS = 0x0000


def _id() -> str:
    return uuid.uuid4().hex


def dicom_peer(ae_title: str, host: str, requestor: bool, role: str) -> AuditParticipant:
    """A DICOM application entity as a participant (AlternativeUserID ``AETITLES=<ae>``, as PS3.15 A.5.2.1)."""
    ae = ae_title.strip()
    return AuditParticipant(user_id=ae or "-", alternative_user_id=f"AETITLES={ae}" if ae else "",
                            requestor=requestor, host=host, role=role)  # type: ignore[arg-type]


def studies_of(rows: Iterable[dict]) -> list[AuditStudy]:
    """One participant object per study of catalogue rows (``study_uid``, ``sop_class_uid``), with counts."""
    by_study: dict[str, dict[str, int]] = {}
    for row in rows:
        classes = by_study.setdefault(row["study_uid"], {})
        sop_class = row.get("sop_class_uid") or ""
        classes[sop_class] = classes.get(sop_class, 0) + 1
    return [AuditStudy(study_uid=uid, sop_classes=classes) for uid, classes in by_study.items()]


def _outcome(done: int, failed: int) -> str:
    """success when nothing failed, minor when some did, serious when all did."""
    if not failed:
        return "success"
    return "minor-failure" if done else "serious-failure"


class AssociationTally:
    """What one association stored, counted as its C-STOREs are answered; one audit record at its end.

    One record per association, not per instance, so auditing costs the hot path a dict update.
    Thread-safe for the pynetdicom engine, whose handlers of one association may run on several threads.
    """

    __slots__ = ("calling_ae", "called_ae", "host", "via", "started_at", "studies", "failed", "comments", "_lock")

    def __init__(self, calling_ae: str, called_ae: str, host: str, via: str = "DIMSE"):
        """``via``: DIMSE (an association: AE titles) or STOW-RS (an HTTP request: the caller's principal)."""
        self.calling_ae, self.called_ae, self.host, self.via = calling_ae.strip(), called_ae.strip(), host, via
        self.started_at = utcnow()
        self.studies: dict[str, dict[str, int]] = {}
        self.failed = 0
        self.comments: list[str] = []
        self._lock = threading.Lock()

    def add(self, status: int, study_uid: str, sop_class_uid: str, comment: str = "") -> None:
        """Count one answered C-STORE (a failure status counts as failed, with its first few comments)."""
        with self._lock:
            if status == SUCCESS or (status & 0xF000) == 0xB000:  # success, or a warning: stored
                classes = self.studies.setdefault(study_uid, {})
                classes[sop_class_uid] = classes.get(sop_class_uid, 0) + 1
            else:
                self.failed += 1
                if len(self.comments) < 3:
                    self.comments.append(f"0x{status:04X} {comment}".strip())

    @property
    def stored(self) -> int:
        """Instances stored so far."""
        return sum(sum(c.values()) for c in self.studies.values())

    def record(self, ended_at: datetime | None = None) -> AuditRecord | None:
        """The association's record: instances transferred (action C) with every study; None when it stored
        nothing and nothing failed (an echo, a query or a retrieval, which have their own records)."""
        stored = self.stored
        if not stored and not self.failed:
            return None
        description = f"{self.failed} of {stored + self.failed} instances refused: " + "; ".join(self.comments) \
            if self.failed else ""
        return AuditRecord(
            audit_id=_id(), kind="association", action="C", outcome=_outcome(stored, self.failed),
            outcome_description=description, event_time=ended_at or utcnow(), started_at=self.started_at,
            participants=[dicom_peer(self.calling_ae, self.host, True, "source") if self.via == "DIMSE" else
                          AuditParticipant(user_id=self.calling_ae, requestor=True, host=self.host, role="source"),
                          dicom_peer(self.called_ae, "", False, "destination")],
            studies=[AuditStudy(study_uid=uid, sop_classes=classes) for uid, classes in self.studies.items()],
            detail={"via": self.via, "instances_stored": str(stored), "instances_failed": str(self.failed)})


def association_rejected(calling_ae: str, called_ae: str, host: str, reason: str) -> AuditRecord:
    """An association refused for its AE titles: a failed authentication of the calling AE (PS3.15 User Authentication)."""
    return AuditRecord(
        audit_id=_id(), kind="authentication", action="E", outcome="minor-failure",
        outcome_description=f"association rejected: {reason}", event_time=utcnow(),
        participants=[dicom_peer(calling_ae, host, True, "source"), dicom_peer(called_ae, "", False, "destination")],
        detail={"protocol": "DICOM", "called_ae": called_ae.strip()})


def authentication_failed(user: str, host: str, reason: str, protocol: str) -> AuditRecord:
    """Credentials refused (an HTTP request's API key or JWT; a DICOM peer's identity)."""
    return AuditRecord(
        audit_id=_id(), kind="authentication", action="E", outcome="minor-failure", outcome_description=reason,
        event_time=utcnow(), participants=[AuditParticipant(user_id=user or "-", requestor=True, host=host,
                                                            role="source")],
        detail={"protocol": protocol})


def query(requestor: AuditParticipant, our_ae: str, sop_class_uid: str, query_text: str, transfer_syntax: str,
          status: int, comment: str = "", tenant: str = "") -> AuditRecord:
    """A C-FIND or a QIDO-RS search (PS3.15 Query); the query as sent, the final status as the outcome."""
    return AuditRecord(
        audit_id=_id(), kind="query", action="E", outcome="success" if status in (SUCCESS, 0xFE00) else "minor-failure",
        outcome_description="" if status == SUCCESS else f"0x{status:04X} {comment}".strip(), event_time=utcnow(),
        participants=[requestor, dicom_peer(our_ae, "", False, "destination")],
        query=AuditQuery(sop_class_uid=sop_class_uid, query=query_text, transfer_syntax_uid=transfer_syntax),
        tenant=tenant)


def _transfer_participants(requestor: AuditParticipant, destination: AuditParticipant | None,
                           our_ae: str) -> list[AuditParticipant]:
    """Who takes part in a transfer from our AE: the requestor receives the instances itself (C-GET, WADO), or
    names who does (C-MOVE: ``destination``)."""
    participants = [dicom_peer(our_ae, "", False, "source"),
                    requestor.model_copy(update={"role": "destination" if destination is None else "other"})]
    if destination is not None:
        participants.append(destination)
    return participants


def retrieval(requestor: AuditParticipant, destination: AuditParticipant | None, our_ae: str, rows: Iterable[dict],
              via: str, status: int | None = None, comment: str = "", tenant: str = "") -> AuditRecord:
    """A C-GET, C-MOVE or WADO answer that starts sending ``rows`` (or refused with ``status``): PS3.15 Begin
    Transferring DICOM Instances, action E.

    ``destination``: where the instances go when it is not the requestor (a C-MOVE's destination AE).
    """
    refused = status is not None and status != SUCCESS
    participants = _transfer_participants(requestor, destination, our_ae)
    rows = list(rows)
    return AuditRecord(
        audit_id=_id(), kind="retrieve", action="E", outcome="minor-failure" if refused else "success",
        outcome_description=f"0x{status:04X} {comment}".strip() if refused else "", event_time=utcnow(),
        participants=participants, studies=studies_of(rows), detail={"via": via, "instances": str(len(rows))},
        tenant=tenant)


def retrieved(requestor: AuditParticipant, destination: AuditParticipant | None, our_ae: str, rows: Iterable[dict],
              failed_uids: Iterable[str], via: str, status: int, tenant: str = "") -> AuditRecord:
    """The end of a C-GET or C-MOVE that began with :func:`retrieval`: PS3.15 DICOM Instances Transferred, action
    R, with the studies of the instances the sub-operations delivered; those that failed counted in the outcome."""
    failed = set(failed_uids)
    rows = list(rows)
    sent = [r for r in rows if r.get("sop_uid") not in failed]
    participants = _transfer_participants(requestor, destination, our_ae)
    return AuditRecord(
        audit_id=_id(), kind="retrieved", action="R", outcome=_outcome(len(sent), len(rows) - len(sent)),
        outcome_description="" if status == SUCCESS else f"0x{status:04X}: {len(rows) - len(sent)} of {len(rows)} "
                                                         "not delivered",
        event_time=utcnow(), participants=participants, studies=studies_of(sent),
        detail={"via": via, "instances": str(len(rows)), "delivered": str(len(sent))}, tenant=tenant)


def commitment(requestor: AuditParticipant, our_ae: str, transaction_uid: str, committed: Iterable[dict],
               failed: int, status: int | None = None, comment: str = "", tenant: str = "",
               delivery: str = "none") -> AuditRecord:
    """A storage commitment request (PS3.4 Annex J) and its answer: the instances the archive took responsibility
    for (``committed``: their catalogue rows, by study) and how many it did not, or its refusal (``status``, with
    ``comment``). ``delivery``: how the N-EVENT-REPORT went (same, new, undelivered; none for a refused request).
    PS3.15 has no event of its own for it: DICOM Instances Accessed (read), typed as a storage commitment."""
    committed = list(committed)
    refused = status is not None and status != SUCCESS
    return AuditRecord(
        audit_id=_id(), kind="commitment", action="R",
        outcome="serious-failure" if refused and not committed else _outcome(len(committed), failed + refused),
        outcome_description=(f"0x{status:04X} {comment}".strip() if refused else comment), event_time=utcnow(),
        participants=[requestor, dicom_peer(our_ae, "", False, "destination")], studies=studies_of(committed),
        detail={"transaction_uid": transaction_uid, "committed": str(len(committed)), "failed": str(failed),
                "delivery": delivery}, tenant=tenant)


def export(user: str, host: str, folder: str, rows: Iterable[dict], written: int, error: str = "") -> AuditRecord:
    """``dicomflow export``: a study's instances written as files to a folder (PS3.15 Data Export)."""
    rows = list(rows)
    return AuditRecord(
        audit_id=_id(), kind="export", action="R", outcome="serious-failure" if error and not written
        else _outcome(written, len(rows) - written), outcome_description=error, event_time=utcnow(),
        participants=[AuditParticipant(user_id=user or "-", requestor=True, host=host, role="source"),
                      AuditParticipant(user_id=folder, requestor=False, role="destination-media")],
        studies=studies_of(rows), detail={"instances": str(len(rows)), "written": str(written)})


def deletion(user: str, host: str, rows: Iterable[dict], deleted: int, error: str = "") -> AuditRecord:
    """Studies deleted (PS3.15 DICOM Study Deleted): a DICOMweb DELETE, `dicomflow delete`, a rejection note, retention."""
    rows = list(rows)
    return AuditRecord(
        audit_id=_id(), kind="deletion", action="D", outcome=_outcome(deleted, len(rows) - deleted),
        outcome_description=error, event_time=utcnow(),
        participants=[AuditParticipant(user_id=user or "-", requestor=True, host=host, role="source")],
        studies=studies_of(rows), detail={"instances": str(len(rows)), "deleted": str(deleted)})


def dlq_replay(user: str, host: str, target: str, rows: Iterable[dict], replayed: int, skipped: int) -> AuditRecord:
    """``dicomflow dlq replay``: dead-lettered instances queued to a target again."""
    rows = list(rows)
    return AuditRecord(
        audit_id=_id(), kind="dlq-replay", action="E", outcome=_outcome(replayed, skipped),
        outcome_description=f"{skipped} entries had no target to replay to" if skipped else "", event_time=utcnow(),
        participants=[AuditParticipant(user_id=user or "-", requestor=True, host=host, role="source"),
                      AuditParticipant(user_id=target or "-", requestor=False, role="destination")],
        studies=studies_of(rows), detail={"target": target, "replayed": str(replayed), "skipped": str(skipped)})


def configuration_digest(effective: dict) -> str:
    """SHA-256 of the effective configuration (canonical JSON): two services with one digest run one configuration."""
    return hashlib.sha256(json.dumps(effective, sort_keys=True, separators=(",", ":"), default=str).encode()
                          ).hexdigest()


def application_start(service: str, process: str, host: str, digest: str, version: str) -> AuditRecord:
    """A service started with this effective configuration (PS3.15 Application Activity, Application Start).

    A changed configuration shows as a different digest at the next start of a service.
    """
    return AuditRecord(
        audit_id=_id(), kind="application-start", action="E", outcome="success", event_time=utcnow(),
        participants=[AuditParticipant(user_id=service, alternative_user_id=process, requestor=False, host=host,
                                       role="application")],
        detail={"configuration_sha256": digest, "service": service, "version": version})


def configuration_changed(service: str, effective_before: dict, effective_after: dict | None, error: str = ""
                          ) -> AuditRecord:
    """A running service read a changed configuration: applied (``effective_after``), or refused with ``error``."""
    before = configuration_digest(effective_before)
    after = configuration_digest(effective_after) if effective_after is not None else ""
    return AuditRecord(
        audit_id=_id(), kind="configuration-change", action="E",
        outcome="minor-failure" if error else "success", outcome_description=error, event_time=utcnow(),
        participants=[AuditParticipant(user_id=service, alternative_user_id=str(os.getpid()), requestor=False,
                                       host=socket.gethostname(), role="application")],
        detail={"configuration_sha256": after or before, "previous_sha256": before, "service": service,
                "applied": "false" if error else "true"})
