"""The pynetdicom engine of the SCP (``ingest.engine: pynetdicom``) around :class:`~services.ingest.intake.Intake`.

pynetdicom owns the whole protocol (every negotiation item, TLS-ready sockets); we bind plain
handlers to its events and return a status. It costs 3-4 ms of Python per instance in its polling
threads, which is why the default engine is the lean one in :mod:`.scp`; this one is kept for peers
that need what the lean engine does not negotiate, and is tested on the same end-to-end paths.
Three measured defences live here (see the notes on peers): TCP_NODELAY and TCP_QUICKACK on every
association socket, because a stock storescu with Nagle on otherwise stalls 40-90 ms per instance;
large reads instead of pynetdicom's 4 KiB loop; and a shorter DUL run-loop delay. SO_REUSEPORT lets
several receiver processes share the port.

A connection closed before its A-ASSOCIATE-RQ used to hold one of ``max_associations`` for pynetdicom's
whole ACSE timeout (its acceptor thread waits for the request that will never come, after the DUL has
already seen the close: 70 connections opened and closed left real senders refused "local limit
exceeded" for 25 s). The close now wakes that thread at once, and the wait is bounded by the ARTIM time.
"""

from __future__ import annotations

import copy
import io
import logging
import socket
import ssl
import threading
from collections.abc import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, build_context, evt, transport
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification

from services.ingest import metrics
from services.ingest.commitment import Committer
from services.ingest.find import FIND_TRANSFER_SYNTAXES, Finder
from services.ingest.intake import Intake, Received
from services.ingest.retrieve import Retriever
from services.ingest.scp import refuse_connection
from services.ingest.sop_classes import BEYOND_PYNETDICOM, STANDARD_STORAGE, private_classes
from shared.audit import trail as audit
from shared.audit.records import AssociationTally, association_rejected
from shared.catalogue.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from shared.catalogue.find import CANCEL, FIND_SOP_CLASSES, PENDING, SUCCESS
from shared.catalogue.retrieve import RETRIEVE_SOP_CLASSES, UNKNOWN_DESTINATION
from shared.dicom.part10 import part10
from shared.dicom.statuses import CANNOT_UNDERSTAND, fit_comment
from shared.storage.objectstore import Backends, CorruptObject
from shared.storage.reading import Unavailable, locate
from shared.tls import common_name

log = logging.getLogger("dicomflow.ingest.scp")

_RECV_CHUNK = 256 * 1024
_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")


def _fast_recv(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """pynetdicom's recv with large reads and an immediate ACK after each (no delayed-ACK stall)."""
    sock = self.socket
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], min(nr_bytes - got, _RECV_CHUNK))
        if _HAS_QUICKACK:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        if not n:
            del view
            return buf[:got]
        got += n
    return buf


transport.AssociationSocket.recv = _fast_recv  # type: ignore[method-assign]


def _copy_contexts(contexts):
    """The acceptor's copy of the supported presentation contexts, made for every connection before a byte of
    it is read: each context copied with its own list of transfer syntaxes (the UIDs are immutable strings).
    pynetdicom's deepcopy of 171 contexts took 134 ms of CPU per connection (measured), so 70 connections
    that never associate held the port's accepting for 6 s, and every association paid it."""
    def one(cx: PresentationContext) -> PresentationContext:
        new = copy.copy(cx)
        new._transfer_syntax = list(cx._transfer_syntax)
        return new
    if isinstance(contexts, dict):
        return {key: one(cx) for key, cx in contexts.items()}
    return [one(cx) for cx in contexts]


transport.deepcopy = _copy_contexts  # transport's only deepcopy is of AssociationServer.contexts (pynetdicom 3.0)


class ReusePortServer(transport.ThreadedAssociationServer):
    """An association server whose port several processes can share."""

    request_queue_size = 128  # socketserver's 5 dropped the SYNs of a burst of connections (1 s retries)
    max_connections: int | None = None  # set by start_scp; None: unbounded

    def verify_request(self, request: socket.socket, client_address) -> bool:
        """Over ``max_connections`` (each connection holds pynetdicom threads, associated or not): refused from
        this accepting thread before anything is read, as the lean engine does - A-ASSOCIATE-RJ (transient, local
        limit exceeded, PS3.8 Table 9-21) in the clear; over TLS, whose handshake must not run here, closed."""
        if self.max_connections is None or len(self.active_associations) < self.max_connections:
            return True
        refuse_connection(request, client_address, self.max_connections, answer=not self.ssl_context)
        return False

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; with TLS, wrap without the handshake, which the association's own thread then does on its
        first read. pynetdicom handshakes here, in the one accepting thread: a peer that connected and never
        sent its hello held up every other connection (measured: every TLS association stalled)."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def stop(self, timeout: float) -> None:
        """Stop accepting; open associations finish the C-STORE in hand (same shape as the lean engine)."""
        self.shutdown()
        self.server_close()


def _status(status: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = fit_comment(comment)
    return ds


def _instance_datasets(rows: list[dict], backends: Backends):
    """(row, Dataset) of each row's instance, read whole and verified (pynetdicom's C-GET and C-MOVE handlers
    take Datasets, so this engine holds one instance at a time in memory; the lean one streams); None for one
    that cannot be read (logged)."""
    for row in rows:
        try:
            store, _ = locate(backends, row["digest"], row["placements"])
            data = store.get(row["digest"])
        except (Unavailable, CorruptObject, OSError) as exc:
            if isinstance(exc, CorruptObject):
                metrics.corrupt_objects.inc()
            log.error("sub-operation %s not sent: %s", row["sop_uid"], exc)
            yield row, None
            continue
        metrics.retrieved_bytes.inc(len(data))
        yield row, dcmread(io.BytesIO(part10(data, row["sop_class_uid"], row["sop_uid"], row["transfer_syntax_uid"])))


def _retrieve_handler(retriever: Retriever, backends: Backends, move: bool):
    def on_retrieve(event: evt.Event):
        req = event.request
        identifier = req.Identifier.getvalue() if req.Identifier is not None else b""
        destination = str(req.MoveDestination or "").strip() if move else None
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        plan = retriever.plan(identifier, str(event.context.transfer_syntax), str(req.AffectedSOPClassUID or ""),
                              calling_ae, destination)
        if move:
            if plan.status == UNKNOWN_DESTINATION:
                yield None, None  # pynetdicom answers 0xA801
                return
            dest = plan.destination
            contexts = [build_context(c, t) for c, t in dict.fromkeys(
                (r["sop_class_uid"], r["transfer_syntax_uid"]) for r in plan.rows)][:128]
            options = {"contexts": contexts}
            if plan.tls is not None:
                options["tls_args"] = (plan.tls, dest.host)
            yield (dest.host, dest.port, options) if dest else (None, None)
        if plan.status is not None:
            yield 1
            yield _status(plan.status, plan.comment), None
            return
        yield len(plan.rows)
        # pynetdicom keeps each sub-operation's status to itself: the audit's end record counts as not delivered
        # what could not be read or was cancelled, and as delivered what was handed to pynetdicom to send
        undelivered = []
        try:
            for handed, (row, ds) in enumerate(_instance_datasets(plan.rows, backends)):
                if event.is_cancelled:
                    undelivered += [r["sop_uid"] for r in plan.rows[handed:]]
                    yield CANCEL, None
                    return
                if ds is None:
                    undelivered.append(row["sop_uid"])
                else:
                    yield PENDING, ds
        finally:
            retriever.finished(plan, calling_ae, destination, undelivered,
                               CANCEL if event.is_cancelled else SUCCESS if not undelivered else 0xB000)
    return on_retrieve


def _commitment_handler(committer: Committer):
    """The N-ACTION of storage commitment: the status at once; the report from a thread of its own, sent on this
    association while it is established (pynetdicom pauses the association's reactor while it sends and reads
    the answer), else on a new association."""
    def on_n_action(event: evt.Event):
        req, assoc = event.request, event.assoc
        info = req.ActionInformation.getvalue() if req.ActionInformation is not None else None
        calling = str(assoc.requestor.ae_title).strip()
        accepted = committer.accept(info or None, str(event.context.transfer_syntax),
                                    str(req.RequestedSOPClassUID or ""), str(req.RequestedSOPInstanceUID or ""),
                                    int(req.ActionTypeID) if req.ActionTypeID is not None else -1, calling)
        if accepted.request is not None:
            def same(event_type: int, information: dict) -> bool:
                if not assoc.is_established or assoc.acse.is_release_requested():
                    return False
                status, _ = assoc.send_n_event_report(Dataset.from_json(information), event_type,
                                                      STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
                if "Status" in status and status.Status != 0:
                    log.warning("N-EVENT-REPORT answered 0x%04X by %s", status.Status, calling)
                return "Status" in status  # empty: no answer (timed out, aborted)
            committer.follow_up(accepted.request, calling, same)
        return _status(accepted.status, accepted.comment), None
    return on_n_action


def _release_unassociated_slot(event: evt.Event) -> None:
    """A connection closed before its A-ASSOCIATE-RQ (PS3.8 AA-5, Sta2): wake the acceptor thread waiting for
    the request, so its association slot is free now rather than after the ACSE timeout."""
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None and not assoc.is_established:
        assoc.dul.to_user_queue.put(None)  # its receive_pdu returns None: "timed out", the thread ends


def _ae_rejection(assoc) -> str | None:
    """Why pynetdicom rejected an association for its AE titles (its own checks, acse.py), or None."""
    rq = assoc.requestor.primitive
    allowed = [a.strip() for a in assoc.ae.require_calling_aet]
    if allowed and str(rq.calling_ae_title).strip() not in allowed:
        return "calling AE title not recognised"
    if str(rq.called_ae_title).strip() != str(assoc.acceptor.ae_title).strip():
        return "called AE title not recognised"
    return None


def make_handlers(intake: Intake, finder: Finder | None = None, retriever: Retriever | None = None,
                  backends: Backends | None = None, artim_timeout: float = 10.0,
                  may_act_as: Callable[[str, str], bool] | None = None, committer: Committer | None = None) -> list:
    """The pynetdicom event handlers of the SCP (``may_act_as``: the client certificate's binding to AE titles;
    ``committer``: storage commitment)."""

    def on_find(event: evt.Event):
        identifier = event.request.Identifier.getvalue() if event.request.Identifier is not None else b""
        for status, model, comment in finder.results(
                identifier, str(event.context.transfer_syntax), str(event.request.AffectedSOPClassUID or ""),
                str(event.assoc.requestor.ae_title).strip()):
            if status == PENDING:
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                yield status, Dataset.from_json(model)
            elif status != SUCCESS:
                yield _status(status, comment), None

    def on_store(event: evt.Event) -> Dataset:
        req = event.request
        try:
            data = event.encoded_dataset(include_meta=False)
        except Exception as exc:
            return _status(CANNOT_UNDERSTAND, f"no data set: {exc}")
        admitted = intake.admit(Received(
            data=data, transfer_syntax=str(event.context.transfer_syntax),
            sop_class_uid=str(req.AffectedSOPClassUID or ""), sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
            calling_ae=str(event.assoc.requestor.ae_title).strip(), called_ae=str(event.assoc.acceptor.ae_title).strip()))
        tally = getattr(event.assoc, "audit_tally", None)
        if tally is not None:  # auditing never fails a store
            tally.add(admitted.status, admitted.study_uid, str(req.AffectedSOPClassUID or ""), admitted.comment)
        return _status(admitted.status, admitted.comment)

    def on_conn_open(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        event.assoc.dul.artim_timer.timeout = artim_timeout  # pynetdicom's is a fixed 30 s

    def on_accepted(event: evt.Event) -> None:
        # pynetdicom polls with 1 ms sleeps; 0.1 ms measured nearly 2x the rate of small instances. Only once
        # associated: 70 idle connections polling at 0.1 ms held a real sender's association 6 s (2 cores).
        event.assoc.dul._run_loop_delay = 0.0001
        metrics.associations.inc()
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if may_act_as is not None and isinstance(sock, ssl.SSLSocket):
            peer, calling = common_name(sock.getpeercert()), str(event.assoc.requestor.ae_title).strip()
            if peer is not None and not may_act_as(peer, calling):
                # pynetdicom decides acceptance before any handler can refuse: the association ends at once
                log.warning("client certificate %r may not act as calling AE %s: aborting", peer, calling)
                metrics.rejected_associations.labels(reason="calling AE title not recognised").inc()
                event.assoc.abort()
        event.assoc.audit_tally = AssociationTally(str(event.assoc.requestor.ae_title),
                                                   str(event.assoc.acceptor.ae_title), event.assoc.requestor.address)

    def on_released(event: evt.Event) -> None:
        metrics.associations.dec()
        tally = vars(event.assoc).pop("audit_tally", None)  # once, should both release and abort be reported
        audit.emit(tally.record() if tally is not None else None)

    def on_rejected(event: evt.Event) -> None:
        metrics.rejected_associations.labels(reason="rejected").inc()
        log.warning("association from %s rejected", event.assoc.requestor.ae_title)
        reason = _ae_rejection(event.assoc)
        if reason:
            rq = event.assoc.requestor.primitive
            audit.emit(association_rejected(str(rq.calling_ae_title), str(rq.called_ae_title),
                                            event.assoc.requestor.address, reason))

    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_conn_open), (evt.EVT_ACCEPTED, on_accepted),
                (evt.EVT_RELEASED, on_released), (evt.EVT_ABORTED, on_released), (evt.EVT_REJECTED, on_rejected),
                (evt.EVT_CONN_CLOSE, _release_unassociated_slot)]
    if finder is not None:
        handlers.append((evt.EVT_C_FIND, on_find))
    if retriever is not None:
        handlers += [(evt.EVT_C_GET, _retrieve_handler(retriever, backends, move=False)),
                     (evt.EVT_C_MOVE, _retrieve_handler(retriever, backends, move=True))]
    if committer is not None:
        handlers.append((evt.EVT_N_ACTION, _commitment_handler(committer)))
    return handlers


def _take_as_storage(uids: frozenset[str]) -> None:
    """Make pynetdicom hand a C-STORE of these SOP classes to its storage service: it dispatches by its own
    list, which lacks the retired and private classes (any other class gets no answer but an error)."""
    for uid in sorted(uids - frozenset(_STORAGE_CLASSES.values())):
        _STORAGE_CLASSES[f"dicomflow_{uid}"] = uid


def make_ae(ae_title: str, max_pdu: int, max_associations: int, network_timeout: float,
            allowed_calling_aes: list[str], find: bool = False, retrieve: bool = False,
            private_sop_classes: list[str] | tuple[str, ...] | str = (), artim_timeout: float = 10.0,
            commitment: bool = False) -> AE:
    """An AE accepting every standard storage SOP class (retired ones included) and the listed private
    ones in every transfer syntax pynetdicom knows, plus Verification (and, with ``find``, Patient and Study
    Root C-FIND; with ``retrieve``, C-GET and C-MOVE, and the storage SCP role a C-GET's requestor proposes;
    with ``commitment``, the Storage Commitment Push Model).
    ``private_sop_classes`` ``any``: pynetdicom's unrestricted storage service, process-wide (a receiver
    process serves one AE), the same rule as the lean engine's (:mod:`.sop_classes`)."""
    listed, accept_any = private_classes(private_sop_classes)
    _take_as_storage(BEYOND_PYNETDICOM | listed)
    _config.UNRESTRICTED_STORAGE_SERVICE = accept_any
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = max_associations
    ae.network_timeout = network_timeout
    ae.acse_timeout = artim_timeout  # an acceptor thread waits this long for the A-ASSOCIATE-RQ (ARTIM)
    ae.require_called_aet = True
    if allowed_calling_aes:
        ae.require_calling_aet = list(allowed_calling_aes)
    ae.add_supported_context(Verification)
    for uid in sorted(STANDARD_STORAGE | listed):
        if retrieve:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        else:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    if find:
        for sop_class in FIND_SOP_CLASSES:
            ae.add_supported_context(sop_class, sorted(FIND_TRANSFER_SYNTAXES))
    if retrieve:
        for sop_class in RETRIEVE_SOP_CLASSES:
            ae.add_supported_context(sop_class, sorted(FIND_TRANSFER_SYNTAXES))
    if commitment:
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, sorted(FIND_TRANSFER_SYNTAXES))
    return ae


def start_scp(intake: Intake, host: str, port: int, ae_title: str, max_pdu: int, max_associations: int,
              network_timeout: float, allowed_calling_aes: list[str], finder: Finder | None = None,
              retriever: Retriever | None = None, backends: Backends | None = None,
              private_sop_classes: list[str] | tuple[str, ...] | str = (), artim_timeout: float = 10.0,
              tls: ssl.SSLContext | None = None,
              may_act_as: Callable[[str, str], bool] | None = None,
              max_connections: int | None = None,
              committer: Committer | None = None) -> ReusePortServer:
    """Bind and serve in background threads; returns the server (``.stop(timeout)`` stops it).

    ``tls``: DICOM over TLS (the handshake in each association's thread, not the accepting one);
    ``max_connections``: connections held at once, associated or not (None: unbounded)."""
    ae = make_ae(ae_title, max_pdu, max_associations, network_timeout, allowed_calling_aes, find=finder is not None,
                 retrieve=retriever is not None, private_sop_classes=private_sop_classes, artim_timeout=artim_timeout,
                 commitment=committer is not None)
    server = ae.make_server((host, port), ae_title, ae.supported_contexts, tls,
                            make_handlers(intake, finder, retriever, backends, artim_timeout, may_act_as, committer),
                            ReusePortServer)
    server.max_connections = max_connections
    threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True).start()
    ae._servers.append(server)
    log.info("DICOM SCP %s listening on %s:%d", ae_title, host, port)
    return server
