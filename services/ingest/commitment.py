"""Storage commitment (PS3.4 Annex J, Push Model) on the one DICOM AE, for both SCP engines.

An N-ACTION is checked and answered at once (:meth:`Committer.accept`); then, on a thread of its own, the
catalogue of the caller's tenant is asked every :data:`POLL_S` until every referenced instance is committed
or ``ingest.commitment_wait_s`` has passed (:meth:`Committer.settle`; the verdict is
:func:`shared.catalogue.commitment.judge`'s), and the N-EVENT-REPORT goes out (:meth:`Committer.report`):
on the N-ACTION's own association while it is open (the engine's ``same`` callable sends it there), else
on a new association to the modality, found by its AE title in ``ingest.move_destinations`` (the C-MOVE
destinations: the same table of who listens where), proposing the SCP role of the SOP class as PS3.4
J.3.3.1.3 expects of an SCP that is the association requestor. The catalogue is read through the
:class:`~services.ingest.find.Finder`'s threads, as C-FIND and C-GET read it; nothing of the store is
imported. Every commitment is audited and counted.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.audit import records as audit_records
from shared.audit import trail as audit
from shared.backoff import backoff_delay
from shared.catalogue.commitment import (
    MISSING_ATTRIBUTE,
    PROCESSING_FAILURE,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    SUCCESS,
    CommitmentError,
    CommitmentRequest,
    Verdict,
    check_action,
    event_information,
    judge,
    parse_request,
    why_failed,
)
from shared.config import AccessConfig, MoveDestinationConfig
from shared.dicom.json_model import JsonModelError, json_model
from shared.dicom.statuses import failure_cause
from shared.tenancy import tenant_of_ae

from . import metrics, pdu
from .find import Finder, encode
from .suboperations import Closed, Outbound

log = logging.getLogger("dicomflow.ingest.commitment")

# How often the catalogue is asked while instances are still on their way: a modality waits seconds for
# the report anyway, and each question is one indexed look-up per 500 instances.
POLL_S = 0.5
# A new association to the modality is tried this often (1 s, then 2 s between tries) before the report is
# given up (logged, audited, counted): a modality that is down asks again with a new N-ACTION.
REPORT_ATTEMPTS = 3
_LOOKUP_BATCH = 500  # SOP Instance UIDs per catalogue query (IN lists stay well below any database's limit)

# Sends the Event Information (a DICOM JSON model) with its Event Type ID on the N-ACTION's association;
# False when that association is gone (or ended before the modality answered).
SameAssociation = Callable[[int, dict], bool]


@dataclass
class Accepted:
    """The N-ACTION-RSP status (and Error Comment) to answer; with ``request`` when the report is to follow."""

    status: int
    comment: str = ""
    request: CommitmentRequest | None = None


class Committer:
    """Storage commitment requests of calling AEs, each confined to its tenant.

    ``policies``: placement policy name -> its placements (``storage.policies``); ``destinations``: AE title ->
    where it listens (``ingest.move_destinations``), for reports on a new association; ``tls``: AE title -> the
    TLS client context of a destination that takes DICOM over TLS (the C-MOVE :class:`~.retrieve.Retriever`'s).
    """

    def __init__(self, finder: Finder, access: AccessConfig, policies: dict[str, list[str]],
                 destinations: dict[str, MoveDestinationConfig], ae_title: str, max_pdu: int,
                 network_timeout: float, wait_s: float, tls: dict[str, ssl.SSLContext] | None = None):
        self.finder = finder
        self.access = access
        self.policies = policies
        self.destinations = destinations
        self.tls = tls or {}
        self.ae_title = ae_title
        self.max_pdu = max_pdu
        self.network_timeout = network_timeout
        self.wait_s = wait_s
        self._following: set[threading.Thread] = set()  # reports still to be settled and sent
        self._lock = threading.Lock()

    def accept(self, action_information: bytes | None, transfer_syntax: str, requested_sop_class: str,
               requested_sop_instance: str, action_type_id: int, calling_ae: str) -> Accepted:
        """Check an N-ACTION (command fields and Action Information); the status to answer it with."""
        try:
            check_action(requested_sop_class, requested_sop_instance, action_type_id)
            if action_information is None:
                raise CommitmentError(MISSING_ATTRIBUTE, "N-ACTION without Action Information")
            try:
                model = json_model(action_information, transfer_syntax)
            except JsonModelError as exc:
                raise CommitmentError(PROCESSING_FAILURE, f"Action Information cannot be read: {exc}") from exc
            request = parse_request(model)
        except CommitmentError as exc:
            return self.refuse(exc.status, exc.comment, calling_ae)
        log.info("storage commitment %s from %s: %d instances", request.transaction_uid, calling_ae,
                 len(request.references))
        return Accepted(SUCCESS, request=request)

    def refuse(self, status: int, comment: str, calling_ae: str) -> Accepted:
        """An N-ACTION that will not be processed: logged, audited, counted; no report follows."""
        metrics.commitments.labels(result=f"refused 0x{status:04X}", delivery="none").inc()
        log.warning("storage commitment from %s refused 0x%04X: %s", calling_ae, status, comment)
        audit.emit(audit_records.commitment(audit_records.dicom_peer(calling_ae, "", True, "source"), self.ae_title,
                                            "", (), 0, status, comment, tenant_of_ae(self.access, calling_ae) or ""))
        return Accepted(status, comment)

    def settle(self, request: CommitmentRequest, calling_ae: str) -> tuple[Verdict, dict[str, dict]]:
        """Ask the catalogue until every instance is committed or the wait is over (blocking): the final verdict,
        with the catalogue rows it was given (SOP Instance UID -> row)."""
        tenant = tenant_of_ae(self.access, calling_ae)
        deadline = time.monotonic() + self.wait_s
        while True:
            expired = time.monotonic() >= deadline
            rows: dict[str, dict] | None
            try:
                rows = {} if tenant is None else self._rows(tenant, [r.sop_instance_uid for r in request.references])
            except Exception as exc:  # noqa: BLE001 - a catalogue that is down is asked again until the deadline
                log.warning("storage commitment %s: the catalogue look-up failed: %s", request.transaction_uid,
                            failure_cause(exc))
                rows = None
            verdict = judge(request, rows, self.policies, expired)
            if verdict.final:
                return verdict, rows or {}
            time.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))

    def _rows(self, tenant: str, sop_uids: list[str]) -> dict[str, dict]:
        unique = list(dict.fromkeys(sop_uids))

        def look_up(catalogue) -> dict[str, dict]:
            found: dict[str, dict] = {}
            for start in range(0, len(unique), _LOOKUP_BATCH):
                for row in catalogue.retrievable(tenant, sop_uids=tuple(unique[start:start + _LOOKUP_BATCH])):
                    found[row["sop_uid"]] = row
            return found
        return self.finder.lookup(look_up)

    def report(self, request: CommitmentRequest, verdict: Verdict, rows: dict[str, dict], calling_ae: str,
               same: SameAssociation | None) -> str:
        """Send the N-EVENT-REPORT: on the N-ACTION's association if ``same`` can, else on a new one to the
        modality. Returns how it went: ``same``, ``new`` or ``undelivered``; audited (``rows``: the catalogue rows
        of the instances, for the studies committed) and counted either way."""
        information = event_information(request.transaction_uid, verdict, self.ae_title)
        delivery, error = "undelivered", ""
        try:
            if same is not None and same(verdict.event_type, information):
                delivery = "same"
        except Exception as exc:  # noqa: BLE001 - the association broke while sending: try a new one
            log.warning("storage commitment %s: report on the same association failed: %s",
                        request.transaction_uid, exc)
        if delivery != "same":
            error = self._report_on_new_association(calling_ae, verdict.event_type, information)
            delivery = "new" if not error else "undelivered"
        result = "success" if not verdict.failed else "failures"
        metrics.commitments.labels(result=result, delivery=delivery).inc()
        metrics.commitment_instances.labels(result="committed").inc(len(verdict.committed))
        for _, reason, _ in verdict.failed:
            metrics.commitment_instances.labels(result=f"0x{reason:04X}").inc()
        (log.info if not error else log.error)(
            "storage commitment %s from %s: %d committed, %d failed%s; report %s%s", request.transaction_uid,
            calling_ae, len(verdict.committed), len(verdict.failed),
            f" ({why_failed(verdict)})" if verdict.failed else "", delivery, f": {error}" if error else "")
        comment = "; ".join(part for part in (why_failed(verdict), error and f"report not delivered: {error}") if part)
        audit.emit(audit_records.commitment(
            audit_records.dicom_peer(calling_ae, "", True, "source"), self.ae_title, request.transaction_uid,
            [rows[ref.sop_instance_uid] for ref in verdict.committed], len(verdict.failed),
            None if not error else PROCESSING_FAILURE,
            comment, tenant_of_ae(self.access, calling_ae) or "", delivery))
        return delivery

    def _report_on_new_association(self, calling_ae: str, event_type: int, information: dict) -> str:
        """The report on an association we open to ``calling_ae``; "" once it answered, else why not."""
        dest = self.destinations.get(calling_ae.strip())
        tenant = tenant_of_ae(self.access, calling_ae)
        if dest is None:
            return f"{calling_ae} is not in ingest.move_destinations (where it listens is unknown)"
        if dest.tenants and tenant not in dest.tenants:
            return f"{calling_ae} in ingest.move_destinations is not one of tenant {tenant!r}'s"
        error = ""
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            try:
                status = send_report(dest.host, dest.port, self.ae_title, calling_ae, event_type, information,
                                     self.max_pdu, self.network_timeout, self.tls.get(calling_ae.strip()))
                if status == SUCCESS:
                    return ""
                error = f"{calling_ae} answered the N-EVENT-REPORT with 0x{status:04X}"
            except (OSError, Closed, pdu.ProtocolError) as exc:
                error = f"{calling_ae} at {dest.host}:{dest.port}: {exc}"
            log.warning("storage commitment report to %s, try %d of %d: %s", calling_ae, attempt, REPORT_ATTEMPTS,
                        error)
            if attempt < REPORT_ATTEMPTS:
                time.sleep(backoff_delay(attempt, 1.0, 4.0))
        return error

    def follow_up(self, request: CommitmentRequest, calling_ae: str, same: SameAssociation | None) -> threading.Thread:
        """Settle and report on a thread of its own (the association goes on meanwhile); returns the thread."""
        def run() -> None:
            started = time.monotonic()
            try:
                verdict, rows = self.settle(request, calling_ae)
                self.report(request, verdict, rows, calling_ae, same)
            except Exception:  # noqa: BLE001 - a thread's failure is logged, never lost silently
                log.exception("storage commitment %s from %s failed", request.transaction_uid, calling_ae)
            finally:
                metrics.commitment_seconds.observe(time.monotonic() - started)
                with self._lock:
                    self._following.discard(threading.current_thread())
        thread = threading.Thread(target=run, name=f"commitment-{request.transaction_uid[-12:]}", daemon=True)
        with self._lock:
            self._following.add(thread)
        thread.start()
        return thread

    def finish(self, timeout: float) -> int:
        """Wait up to ``timeout`` for the reports still being settled or sent, so a receiver that stops (a rolling
        update's SIGTERM) sends them instead of dropping them with its threads; each ends within
        ``commitment_wait_s`` of its N-ACTION plus the sending. Returns how many were still pending (logged)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._following)
        if pending:
            log.info("stopping: waiting for %d storage commitment reports", len(pending))
        for thread in pending:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(t.is_alive() for t in pending)
        if left:
            log.error("stopping: %d storage commitment reports not sent within %.0f s", left, timeout)
        return left


def send_report(host: str, port: int, our_ae: str, modality_ae: str, event_type: int, information: dict,
                max_pdu: int, timeout: float, tls: ssl.SSLContext | None = None) -> int:
    """One N-EVENT-REPORT on a new association to the modality (over TLS with ``tls``), which we request proposing
    the SCP role of the Storage Commitment Push Model (PS3.4 J.3.3.1.3: the modality accepts an association on
    which we are the SCP); returns the status of its N-EVENT-REPORT-RSP. Raises OSError (ssl.SSLError for a
    refused certificate), :class:`Closed` or ProtocolError."""
    channel = Outbound.open(host, port, our_ae, modality_ae, [(STORAGE_COMMITMENT_PUSH, ts) for ts in _SYNTAXES],
                            max_pdu, timeout, tls, roles={STORAGE_COMMITMENT_PUSH: (0, 1)})
    try:
        accepted = [(ts, cid) for (abstract, ts), cid in channel.contexts.items() if abstract == STORAGE_COMMITMENT_PUSH]
        if not accepted:
            raise Closed(f"{modality_ae} accepted no Storage Commitment Push Model context")
        ts, cid = accepted[0]
        channel.send(b"".join(pdu.p_data(cid, pdu.event_report_rq(1, STORAGE_COMMITMENT_PUSH,
                                                                   STORAGE_COMMITMENT_INSTANCE, event_type),
                                         channel.max_pdu)))
        channel.send(b"".join(pdu.p_data(cid, encode(information, ts), channel.max_pdu, is_command=False)))
        status = read_event_report_rsp(channel.read_pdu, 1)
    except BaseException:
        channel.abort()
        raise
    channel.release()
    return status


# Explicit VR Little Endian first, then the default (every AE takes Implicit VR Little Endian, PS3.5 10.1)
_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def read_event_report_rsp(read_pdu: Callable[[], tuple[int, memoryview]], message_id: int) -> int:
    """Read PDUs until the N-EVENT-REPORT-RSP to ``message_id``; its status (PS3.7 10.1.1.1.4). A command may come
    in fragments over several PDUs; an Event Reply data set after it is read past."""
    command: list[bytes] = []
    while True:
        kind, body = read_pdu()
        if kind in (pdu.RELEASE_RQ, pdu.ABORT):
            raise Closed("the modality ended the association before answering the N-EVENT-REPORT")
        if kind != pdu.P_DATA_TF:
            raise pdu.ProtocolError(f"PDU type {kind} while awaiting the N-EVENT-REPORT-RSP")
        for _, is_command, last, fragment in pdu.pdvs(body):
            if not is_command:
                continue
            command.append(bytes(fragment))
            if not last:
                continue
            cmd, command = pdu.parse_command(b"".join(command)), []
            if (pdu.command_us(cmd, 0x0100) == pdu.N_EVENT_REPORT_RSP
                    and pdu.command_us(cmd, 0x0120) == message_id):
                return pdu.command_us(cmd, 0x0900)
