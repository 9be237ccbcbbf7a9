"""The socket shell of the C-STORE SCP: one blocking thread per association, whole PDUs, no polling.

pynetdicom's acceptor costs 3-4 ms of Python per instance (two polling threads with sleeps, a state
machine, DIMSE message objects, a Dataset per response), which capped a receiver below Orthanc. A
storage SCP needs a small part of the protocol, so it is implemented directly (:mod:`.pdu`): read a
PDU, act, answer. Measured defences kept from the notes on peers: TCP_NODELAY on every association
and TCP_QUICKACK after each read, because a stock storescu with Nagle on otherwise stalls 40-90 ms
per instance. Several receiver processes share the port (the only way a Python receiver scales
past one core): one listening socket made by the supervisor and inherited by every receiver, where
a receiver with associations open waits a little before accepting, so idle receivers take new
associations first (SO_REUSEPORT's hashing put all four of a benchmark's associations on one of two
receivers, measured). A receiver started alone binds its own socket, with SO_REUSEPORT. A data set
larger than ``ingest.stream_above_bytes`` goes to the staging backend fragment by fragment as it
arrives (:class:`~services.ingest.intake.Incoming`), not assembled in memory. With a :class:`~services.ingest.find.Finder` the same AE
answers C-FIND (Patient and Study Root) from the catalogue, and a C-CANCEL between its pending responses;
with a :class:`~services.ingest.commitment.Committer`, storage commitment: the N-ACTION is answered at once
and its N-EVENT-REPORT sent later by a thread of its own, on this association while it is open (every
message this association's thread sends is whole under one lock, so a report never lands between a command
and its data set; the modality's N-EVENT-REPORT-RSP is read by the association's thread and handed over),
else on a new association.

Hostile and broken peers (PS3.8; the decisions are pure functions of :mod:`.pdu`, this shell obeys them):

* at most ``max_connections`` TCP connections per receiver, associated or not, each one thread: one more is
  answered A-ASSOCIATE-RJ (transient, local limit exceeded) from the accepting thread and closed, before
  any of its bytes is read, so a flood of idle connections costs no threads;
* the ARTIM timer (PS3.8 9.1.5): the whole A-ASSOCIATE-RQ must arrive within ``artim_timeout`` of the
  connection (a deadline, not an idle timeout: a peer trickling a byte at a time is cut off, AA-2); after
  an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT the receiver closes its side, and waits for the peer's
  close for at most as long, discarding what arrives (Sta13), so the answer is not lost to a reset;
* every PDU header is checked before its body is read (:func:`.pdu.check_pdu_header`): a P-DATA-TF longer
  than the maximum we announced, an unknown or misplaced PDU type, an A-ASSOCIATE-RQ over 1 MiB end in an
  A-ABORT without the body being held; so a receiver holds at most ``max_pdu`` per association;
* an invalid A-ASSOCIATE-RQ (items past their parent, even or repeated context IDs) is answered with the
  A-ABORT of AA-1 (service-user source, PS3.8 Table 9-10); a well-formed one with a protocol version, an
  application context or a calling AE title we do not take gets the A-ASSOCIATE-RJ of Table 9-21;
* during the association an invalid PDU or PDV order (:class:`.pdu.DimseAssembler`: a data fragment on
  another context than its command, a new command while a data set is pending) ends in the A-ABORT of
  AA-8: service-provider source, with the reason of Table 9-26;
* a user identity negotiation (PS3.7 D.3.3.7) that asks for a positive response gets one.

Not implemented (a peer proposing them gets the association without them, as PS3.7 D.3.3 allows):
asynchronous operations window (one operation at a time, PS3.7 D.3.3.3), SOP class extended and common
extended negotiation (D.3.3.5, D.3.3.6), verification of the user identity (taken as asserted: the AE
title is the credential), C-STORE as an SCU outside C-GET/C-MOVE sub-operations, N-services other than
the N-ACTION and N-EVENT-REPORT of storage commitment.
"""

from __future__ import annotations

import functools
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable

from pynetdicom.sop_class import Verification

from services.ingest import metrics, pdu
from services.ingest.commitment import Committer
from services.ingest.find import FIND_TRANSFER_SYNTAXES, Finder, encode
from services.ingest.intake import Admission, Incoming, Intake, Received
from services.ingest.retrieve import Retriever
from services.ingest.sop_classes import ALL_TS, StorageContexts, storage_contexts
from services.ingest.suboperations import Channel, Closed, Counts, Outbound, send_instances
from shared.audit import trail as audit
from shared.audit.records import AssociationTally, association_rejected
from shared.catalogue.commitment import RESOURCE_LIMITATION, STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from shared.catalogue.find import CANCEL, FIND_SOP_CLASSES, PENDING, UNABLE_TO_PROCESS
from shared.catalogue.retrieve import (
    GET_SOP_CLASSES,
    RETRIEVE_SOP_CLASSES,
    UNABLE_TO_PERFORM,
    failed_list,
    final_status,
)
from shared.dicom.statuses import CANNOT_UNDERSTAND
from shared.storage.objectstore import Backends, CorruptObject, ObjectWriter
from shared.tls import common_name

log = logging.getLogger("dicomflow.ingest.scp")

_RECV_BUFFER = 256 * 1024
_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")
_HEADER = struct.Struct(">BxI")

# Every standard storage SOP class (retired ones included) and Verification, in every transfer syntax.
SUPPORTED: StorageContexts = storage_contexts([], {str(Verification): ALL_TS})

_REJECT_REASONS = {
    (pdu.RJ_SOURCE_USER, pdu.RJ_CALLED_AE): "called AE title not recognised",
    (pdu.RJ_SOURCE_USER, pdu.RJ_CALLING_AE): "calling AE title not recognised",
    (pdu.RJ_SOURCE_USER, pdu.RJ_APPLICATION_CONTEXT): "application context name not supported",
    (pdu.RJ_SOURCE_ACSE, pdu.RJ_PROTOCOL_VERSION): "protocol version not supported",
    (pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_LOCAL_LIMIT): "too many associations",
    (pdu.RJ_SOURCE_USER, pdu.RJ_NO_REASON): "no presentation context accepted"}
_ABORT_REASONS = {pdu.ABORT_NOT_SPECIFIED: "not specified", pdu.ABORT_UNRECOGNIZED_PDU: "unrecognised PDU",
                  pdu.ABORT_UNEXPECTED_PDU: "unexpected PDU", pdu.ABORT_UNEXPECTED_PARAMETER: "unexpected PDU parameter",
                  pdu.ABORT_INVALID_PARAMETER: "invalid PDU parameter value"}
_TOO_MANY_CONNECTIONS = pdu.associate_rj(pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_LOCAL_LIMIT)


def refuse_connection(request: socket.socket, client_address, open_now: int, answer: bool = True) -> None:
    """A connection over ``ingest.max_connections``, refused from the accepting thread before anything of it is
    read: counted, logged, and (``answer``) told A-ASSOCIATE-RJ transient, local limit exceeded (PS3.8 Table
    9-21). Both engines; the caller closes it."""
    metrics.rejected_associations.labels(reason="too many connections").inc()
    log.warning("connection from %s refused: %d connections open (ingest.max_connections)", client_address[0],
                open_now)
    if not answer:
        return
    try:
        request.setblocking(False)  # a fresh socket's send buffer takes 10 bytes; never wait for a peer here
        request.send(_TOO_MANY_CONNECTIONS)
        while request.recv(65536):  # what already came: closing on unread bytes resets, losing the RJ
            pass
    except OSError:
        pass


class StorageServer(socketserver.ThreadingTCPServer):
    """Accepts associations, one daemon thread each; several processes may share the port."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128  # as the supervisor's socket: socketserver's 5 dropped a burst's SYNs (1 s retries)

    def __init__(self, address: tuple[str, int], intake: Intake, ae_title: str, max_pdu: int, max_associations: int,
                 network_timeout: float, allowed_calling_aes: list[str], listen_socket: socket.socket | None = None,
                 finder: Finder | None = None, retriever: Retriever | None = None, backends: Backends | None = None,
                 private_sop_classes: list[str] | str = (), artim_timeout: float = 10.0,
                 max_connections: int | None = None, tls: ssl.SSLContext | None = None,
                 may_act_as: Callable[[str, str], bool] | None = None, committer: Committer | None = None):
        self.intake = intake
        self.committer = committer
        # DICOM over TLS: each accepted connection's handshake runs in its own association thread (never in
        # the accepting one, where a slow peer would hold up every other); may_act_as(certificate name,
        # calling AE) binds a verified client certificate to the AE titles it may use.
        self.tls = tls
        self.may_act_as = may_act_as
        self.finder = finder
        self.retriever = retriever
        self.backends = backends
        extra = {str(Verification): ALL_TS}
        if finder is not None:
            extra.update({c: FIND_TRANSFER_SYNTAXES for c in FIND_SOP_CLASSES})
        if retriever is not None:
            extra.update({c: FIND_TRANSFER_SYNTAXES for c in RETRIEVE_SOP_CLASSES})
        if committer is not None:
            extra[STORAGE_COMMITMENT_PUSH] = FIND_TRANSFER_SYNTAXES
        self.supported = storage_contexts(private_sop_classes, extra)
        self.ae_title = ae_title.strip()
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        self.artim_timeout = artim_timeout
        self.max_connections = max_connections if max_connections is not None else 2 * max_associations
        self.allowed_calling = [a.strip() for a in allowed_calling_aes]
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._open = 0
        self._inflight = 0
        self._connections = 0  # accepted and not yet closed (counted from accept, before the handler runs)
        self.shared = listen_socket is not None
        if listen_socket is None:
            super().__init__(address, _AssociationHandler)
        else:
            super().__init__(address, _AssociationHandler, bind_and_activate=False)
            self.socket.close()
            self.socket = listen_socket  # non-blocking: a receiver that loses the race gets EAGAIN

    def get_request(self) -> tuple[socket.socket, tuple]:
        busy = self._connections
        if self.shared and busy:
            # Idle receivers of the shared socket accept first; a busy one takes the association only
            # if nobody else did meanwhile (2 ms per open association, at most 16 ms).
            time.sleep(min(busy, 8) * 0.002)
        conn, addr = self.socket.accept()
        self._count("_connections", 1)
        return conn, addr

    def verify_request(self, request: socket.socket, client_address) -> bool:
        """Over ``max_connections``: A-ASSOCIATE-RJ (transient, local limit exceeded, PS3.8 Table 9-21) from this
        accepting thread and close, no handler thread, nothing of the peer's read."""
        if self._connections <= self.max_connections:
            return True
        refuse_connection(request, client_address, self._connections - 1)
        return False

    def shutdown_request(self, request: socket.socket) -> None:
        self._count("_connections", -1)
        super().shutdown_request(request)

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def _count(self, attr: str, delta: int) -> int:
        with self._lock:
            value = getattr(self, attr) + delta
            setattr(self, attr, value)
            return value

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, then wait (up to ``timeout``) for C-STOREs being handled to be answered."""
        self.stopping.set()
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.02)


# The contexts whose data sets are requests (identifiers, Action Information): held in memory, never staged.
_QUERY_RETRIEVE = frozenset(FIND_SOP_CLASSES) | frozenset(RETRIEVE_SOP_CLASSES) | {STORAGE_COMMITMENT_PUSH}

# No C-FIND identifier comes near this: a larger one is not held (and never staged, as a C-STORE's would be).
MAX_IDENTIFIER_BYTES = 1024 * 1024
# A storage commitment's Action Information names up to MAX_REFERENCES instances, some 130 bytes each (two UIDs in
# an item); beyond this it is not held, and the N-ACTION is refused (resource limitation).
MAX_ACTION_INFORMATION_BYTES = 4 * 1024 * 1024


class _Identifier:
    """A data set on a query/retrieve or storage commitment context (a C-FIND's identifier, an N-ACTION's Action
    Information) as its fragments arrive: held in memory, never staged (it is not an instance); one over ``limit``
    bytes is not kept at all."""

    __slots__ = ("parts", "held", "limit")

    def __init__(self, limit: int = MAX_IDENTIFIER_BYTES):
        self.parts: list[memoryview] = []
        self.held = 0
        self.limit = limit

    def add(self, fragment: memoryview) -> None:
        self.held += len(fragment)
        if self.held <= self.limit:
            self.parts.append(fragment)
        else:
            self.parts = []

    def take(self) -> bytes | None:
        return b"".join(self.parts) if self.held <= self.limit else None

    def discard(self) -> None:
        self.parts = []


class _AssociationHandler(socketserver.BaseRequestHandler):
    server: StorageServer
    _contexts: dict[int, tuple[str, str]] = {}
    _cancels: set[int]

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.server.artim_timeout)  # the handshake is part of the ARTIM time
        self.peer_name: str | None = None  # the verified client certificate's common name
        if self.server.tls is not None:
            try:
                sock = self.server.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:  # no or an untrusted client certificate, not TLS at all, gone
                metrics.rejected_associations.labels(reason="TLS handshake failed").inc()
                log.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
                return
            self.peer_name = common_name(sock.getpeercert())
        self.sock = sock
        self.associated = False
        self.reader = None
        # Storage commitment reports sent on this association by their own threads (see the module docstring)
        self._send_lock = threading.Lock()
        self._reports_open = False  # True while the association is open to N-EVENT-REPORTs
        self._report_ids = 0
        self._report_waiters: dict[int, list] = {}  # message ID -> [answered Event, status or None]
        try:
            self._associate()
        except pdu.ProtocolError as exc:
            metrics.aborts.labels(reason=_ABORT_REASONS.get(exc.reason, "not specified")).inc()
            if self.associated:  # AA-8 (PS3.8 Table 9-10, Sta6): service-provider source, with the reason
                log.warning("aborting association from %s: %s", self.client_address[0], exc)
                self._end(pdu.abort(pdu.ABORT_SOURCE_PROVIDER, exc.reason))
            else:  # AA-1 (Sta2: an invalid or unexpected PDU instead of an A-ASSOCIATE-RQ): service-user source
                log.warning("aborting connection from %s before association: %s", self.client_address[0], exc)
                self._end(pdu.abort(pdu.ABORT_SOURCE_USER, pdu.ABORT_NOT_SPECIFIED))
        except TimeoutError:
            if not self.associated:
                metrics.aborts.labels(reason="ARTIM expired").inc()
                log.warning("connection from %s closed: no A-ASSOCIATE-RQ within %.0f s (ARTIM)",
                            self.client_address[0], self.server.artim_timeout)
        except (Closed, OSError):
            pass  # peer gone or network timeout: nothing to answer to
        finally:
            if self.reader is not None:
                self.reader.close()
            if sock is not self.request:  # the TLS socket took over the connection: closing it ends it
                sock.close()

    def _end(self, last_pdu: bytes | None = None) -> None:
        """Send ``last_pdu`` (an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT), close our side and wait, at most the
        ARTIM time, for the peer to close (PS3.8 Sta13), discarding what it still sends: a socket closed
        with unread bytes resets the connection, and the peer may never read the answer."""
        sock = self.sock
        try:
            if last_pdu is not None:
                sock.sendall(last_pdu)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.server.artim_timeout
            sink = bytearray(_RECV_BUFFER)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv_into(sink):
                    return
        except OSError:
            pass  # reset, gone or ARTIM expired: the socket is closed either way

    def _read_associate_rq(self) -> memoryview:
        """The A-ASSOCIATE-RQ, all of it within the ARTIM time of the connection (PS3.8 9.1.5, AE-5/AE-6);
        read exactly, so nothing that follows it is taken from the socket here."""
        deadline = time.monotonic() + self.server.artim_timeout
        head = self._recv_exactly(6, deadline)
        kind, length = _HEADER.unpack(head)
        pdu.check_pdu_header(kind, length, False, self.server.max_pdu)
        if kind == pdu.ABORT:
            raise Closed("aborted before the association")  # AA-2: close, nothing to answer
        return memoryview(self._recv_exactly(length, deadline))

    def _recv_exactly(self, n: int, deadline: float) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("ARTIM expired")
            self.sock.settimeout(left)
            got_now = self.sock.recv_into(view[got:])
            if not got_now:
                raise Closed("the peer closed the connection")
            got += got_now
        return buf

    def _read_pdu(self) -> tuple[int, memoryview]:
        head = self.reader.read(6)
        if len(head) < 6:
            raise Closed("the peer closed the connection")
        kind, length = _HEADER.unpack(head)
        pdu.check_pdu_header(kind, length, True, self.server.max_pdu)
        body = self.reader.read(length) if length else b""
        if _HAS_QUICKACK:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        if len(body) < length:
            raise Closed("the peer closed the connection")
        return kind, memoryview(body)

    def _associate(self) -> None:
        srv = self.server
        req = pdu.parse_associate_rq(bytes(self._read_associate_rq()))
        self.sock.settimeout(srv.network_timeout)
        self.reader = self.sock.makefile("rb", buffering=_RECV_BUFFER)
        opened = srv._count("_open", 1)
        try:
            neg = None
            reject = pdu.screen_associate_rq(req)
            if reject is None:
                neg = pdu.negotiate(req, srv.ae_title, srv.allowed_calling, srv.supported,
                                    busy=opened > srv.max_associations or srv.stopping.is_set())
                reject = neg.reject
            if (not reject and self.peer_name is not None and srv.may_act_as is not None
                    and not srv.may_act_as(self.peer_name, req.calling_ae)):
                log.warning("client certificate %r of %s may not act as calling AE %s", self.peer_name,
                            self.client_address[0], req.calling_ae)
                reject = (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_CALLING_AE)
            if reject:
                reason = _REJECT_REASONS.get(reject[1:], "rejected")
                metrics.rejected_associations.labels(reason=reason).inc()
                log.warning("association from %s (calling %r, called %r) rejected: %s", self.client_address[0],
                            req.calling_ae, req.called_ae, reason)
                if reject[2] in (pdu.RJ_CALLED_AE, pdu.RJ_CALLING_AE):
                    audit.emit(association_rejected(req.calling_ae, req.called_ae, self.client_address[0], reason))
                self._end(pdu.associate_rj(*reject))
                return
            self.sock.sendall(pdu.associate_ac(req, neg, srv.max_pdu))
            self.associated = True
            metrics.associations.inc()
            self.tally = AssociationTally(req.calling_ae, req.called_ae, self.client_address[0])
            try:
                if self._data_phase(req, neg.accepted()):
                    self._end(pdu.release_rp())
            finally:
                metrics.associations.dec()
                audit.emit(self.tally.record())  # one record per association: what it stored, of which studies
        finally:
            srv._count("_open", -1)

    def _data_phase(self, req: pdu.AssociateRequest, contexts: dict[int, tuple[str, str]]) -> bool:
        """Serve DIMSE messages until the peer releases (True: answer with A-RELEASE-RP) or aborts (False)."""
        self._contexts, self._cancels = contexts, set()
        self._reports_open = True
        messages = pdu.DimseAssembler(contexts)
        data: Incoming | _Identifier | None = None  # the data set of the pending command, as it arrives
        # How each context collects a data set, chosen once per association (nothing more per C-STORE):
        # a storage context's may be staged as it arrives, a FIND context's is held in memory.
        intake = self.server.intake
        collector = {cid: functools.partial(_Identifier, MAX_ACTION_INFORMATION_BYTES)
                     if abstract == STORAGE_COMMITMENT_PUSH
                     else _Identifier if abstract in _QUERY_RETRIEVE else functools.partial(Incoming, intake)
                     for cid, (abstract, _) in contexts.items()}
        pending: dict[int, bytes] = {}  # the command that awaits its data set
        try:
            while True:
                kind, body = self._read_pdu()  # a PDU type out of place was refused there
                if kind == pdu.RELEASE_RQ:
                    return True
                if kind == pdu.ABORT:
                    return False
                for cid, is_command, last, fragment in pdu.pdvs(body):
                    event = messages.pdv(cid, is_command, last, fragment)
                    if event is None:
                        continue
                    what, cid, value = event
                    if what == "command":
                        self._dispatch(req, cid, contexts[cid], value, None)
                    elif what == "dataset":
                        pending, data = value, collector[cid]()
                    else:
                        data.add(fragment)
                        if value:  # its last fragment
                            dataset, data = data.take(), None
                            self._dispatch(req, cid, contexts[cid], pending, dataset)
        finally:
            if data is not None:  # the association ended inside a data set: nothing of it is kept
                data.discard()
            self._close_to_reports()

    def _close_to_reports(self) -> None:
        """No report goes out on this association from now on (before its A-RELEASE-RP or close); a report
        waiting for its N-EVENT-REPORT-RSP goes on a new association instead."""
        with self._send_lock:
            self._reports_open = False
            for waiter in self._report_waiters.values():
                waiter[0].set()
            self._report_waiters.clear()

    def _report_here(self, cid: int, transfer_syntax: str, max_pdu: int) -> Callable[[int, dict], bool]:
        """How a storage commitment report goes on this association: the N-EVENT-REPORT-RQ and its Event
        Information sent whole, then the modality's answer awaited (read by the association's thread); False
        when the association is closed or ends before the answer."""
        def send(event_type: int, information: dict) -> bool:
            with self._send_lock:
                if not self._reports_open:
                    return False
                self._report_ids += 1
                message_id = self._report_ids
                waiter = self._report_waiters[message_id] = [threading.Event(), None]
                self.sock.sendall(b"".join(
                    pdu.p_data(cid, pdu.event_report_rq(message_id, STORAGE_COMMITMENT_PUSH,
                                                        STORAGE_COMMITMENT_INSTANCE, event_type), max_pdu)
                    + pdu.p_data(cid, encode(information, transfer_syntax), max_pdu, is_command=False)))
            waiter[0].wait(self.server.network_timeout)
            if waiter[1] is not None and waiter[1] != 0:
                log.warning("N-EVENT-REPORT answered 0x%04X by the modality", waiter[1])
            return waiter[1] is not None
        return send

    def _dispatch(self, req: pdu.AssociateRequest, cid: int, context: tuple[str, str], cmd: dict[int, bytes],
                  dataset: bytes | ObjectWriter | None) -> None:
        try:
            with self._send_lock:  # a message answered whole: no report of another thread between its PDUs
                self._answer(req, cid, context, cmd, dataset)
        finally:
            if dataset is not None and not isinstance(dataset, bytes):
                dataset.close()  # the intake has committed or discarded it; this covers every other path

    def _answer(self, req: pdu.AssociateRequest, cid: int, context: tuple[str, str], cmd: dict[int, bytes],
                dataset: bytes | ObjectWriter | None) -> None:
        field = pdu.command_us(cmd, 0x0100)
        message_id = pdu.command_us(cmd, 0x0110)
        sop_class = pdu.command_uid(cmd, 0x0002)
        if field == pdu.C_STORE_RQ:
            sop_instance = pdu.command_uid(cmd, 0x1000)
            srv = self.server
            srv._count("_inflight", 1)
            try:
                if dataset is None:
                    admitted = Admission(CANNOT_UNDERSTAND, "C-STORE without a data set")
                else:
                    admitted = srv.intake.admit(Received(
                        data=dataset, transfer_syntax=context[1], sop_class_uid=sop_class,
                        sop_instance_uid=sop_instance, calling_ae=req.calling_ae, called_ae=req.called_ae))
                status, comment = admitted.status, admitted.comment
                self.tally.add(status, admitted.study_uid, sop_class, comment)
                reply = pdu.response(pdu.C_STORE_RSP, message_id, status, sop_class, sop_instance, comment)
                self._send_command(cid, reply, req.max_pdu)
            finally:
                srv._count("_inflight", -1)
        elif field == pdu.C_FIND_RQ and self.server.finder is not None and context[0] in FIND_SOP_CLASSES:
            self._find(req, cid, context, message_id, sop_class, dataset)
        elif (field in (pdu.C_GET_RQ, pdu.C_MOVE_RQ) and self.server.retriever is not None
              and context[0] in RETRIEVE_SOP_CLASSES):
            self._retrieve(req, cid, context, cmd, message_id, sop_class, dataset)
        elif field == pdu.N_ACTION_RQ and self.server.committer is not None and context[0] == STORAGE_COMMITMENT_PUSH:
            self._commit(req, cid, context, cmd, message_id, dataset)
        elif field == pdu.N_EVENT_REPORT_RSP:
            waiter = self._report_waiters.pop(pdu.command_us(cmd, 0x0120), None)
            if waiter is not None:  # a report's answer: its thread is waiting for it
                waiter[1] = pdu.command_us(cmd, 0x0900)
                waiter[0].set()
        elif field == pdu.C_CANCEL_RQ:
            pass  # a cancel after the last response of its C-FIND: nothing left to cancel, nothing to answer
        elif field == pdu.C_ECHO_RQ:
            self._send_command(cid, pdu.response(pdu.C_ECHO_RSP, message_id, 0, sop_class or str(Verification)),
                               req.max_pdu)
        else:
            log.warning("unsupported DIMSE command 0x%04X from %s", field, req.calling_ae)
            self._send_command(cid, pdu.response(field | 0x8000, message_id, pdu.UNRECOGNIZED_OPERATION, sop_class),
                               req.max_pdu)

    def _commit(self, req: pdu.AssociateRequest, cid: int, context: tuple[str, str], cmd: dict[int, bytes],
                message_id: int, dataset: bytes | ObjectWriter | None) -> None:
        """A storage commitment N-ACTION (PS3.7 10.1.4): answered at once; on success its report follows from a
        thread of its own, here while this association is open."""
        if dataset is not None and not isinstance(dataset, bytes):
            dataset.close()
            dataset = None
        committer = self.server.committer
        requested_class, requested_instance = pdu.command_uid(cmd, 0x0003), pdu.command_uid(cmd, 0x1001)
        if dataset is None and pdu.command_us(cmd, 0x0800, pdu.NO_DATA_SET) != pdu.NO_DATA_SET:  # sent, not held
            accepted = committer.refuse(RESOURCE_LIMITATION, f"Action Information over {MAX_ACTION_INFORMATION_BYTES}"
                                                             f" bytes", req.calling_ae)
        else:
            accepted = committer.accept(dataset, context[1], requested_class, requested_instance,
                                        pdu.command_us(cmd, 0x1008, -1), req.calling_ae)
        # Action Type ID "may be included in the success response" (PS3.7 10.1.4.1.5): there is no Action Reply
        self._send_command(cid, pdu.response(pdu.N_ACTION_RSP, message_id, accepted.status, requested_class,
                                             requested_instance, comment=accepted.comment,
                                             type_id=(0x1008, 1) if accepted.request is not None else None),
                           req.max_pdu)
        if accepted.request is not None:
            committer.follow_up(accepted.request, req.calling_ae, self._report_here(cid, context[1], req.max_pdu))

    def _find(self, req: pdu.AssociateRequest, cid: int, context: tuple[str, str], message_id: int,
              sop_class: str, dataset: bytes | ObjectWriter | None) -> None:
        """Answer a C-FIND: a pending response per match, then the final status (0xFE00 once the SCU cancels)."""
        if not isinstance(dataset, bytes):
            if dataset is not None:
                dataset.close()
            self._send_command(cid, pdu.response(pdu.C_FIND_RSP, message_id, UNABLE_TO_PROCESS, sop_class,
                                                 comment=f"identifier missing or over {MAX_IDENTIFIER_BYTES} bytes"),
                               req.max_pdu)
            return
        for status, identifier, comment in self.server.finder.responses(dataset, context[1], sop_class,
                                                                        req.calling_ae):
            if status == PENDING and self._cancelled(message_id):
                self._send_command(cid, pdu.response(pdu.C_FIND_RSP, message_id, CANCEL, sop_class), req.max_pdu)
                return
            self._send_command(cid, pdu.response(pdu.C_FIND_RSP, message_id, status, sop_class, comment=comment,
                                                 data_set=identifier is not None), req.max_pdu)
            if identifier is not None:
                self.sock.sendall(b"".join(pdu.p_data(cid, identifier, req.max_pdu, is_command=False)))

    def _retrieve(self, req: pdu.AssociateRequest, cid: int, context: tuple[str, str], cmd: dict[int, bytes],
                  message_id: int, sop_class: str, dataset: bytes | ObjectWriter | None) -> None:
        """Answer a C-GET (sub-operations on this association) or a C-MOVE (on one opened to the destination):
        a pending response after each sub-operation, then the final status with the counts."""
        is_get = context[0] in GET_SOP_CLASSES
        kind, rsp_field = ("C-GET", pdu.C_GET_RSP) if is_get else ("C-MOVE", pdu.C_MOVE_RSP)

        def answer(status: int, counts: Counts | None = None, comment: str = "", final: bool = True) -> None:
            identifier = None
            if final and counts is not None and counts.failed_uids and status != CANCEL:
                identifier = encode(failed_list(counts.failed_uids), context[1])
            self._send_command(cid, pdu.response(rsp_field, message_id, status, sop_class, comment=comment,
                                                 data_set=identifier is not None,
                                                 counts=None if counts is None
                                                 else counts.as_tuple(final and status != CANCEL)),
                               req.max_pdu)
            if identifier is not None:
                self.sock.sendall(b"".join(pdu.p_data(cid, identifier, req.max_pdu, is_command=False)))
            if final:
                metrics.retrieves.labels(kind=kind, status=f"0x{status:04X}").inc()

        if not isinstance(dataset, bytes):
            if dataset is not None:
                dataset.close()
            answer(UNABLE_TO_PROCESS, comment=f"identifier missing or over {MAX_IDENTIFIER_BYTES} bytes")
            return
        destination_ae = None if is_get else pdu.command_uid(cmd, 0x0600)
        plan = self.server.retriever.plan(dataset, context[1], sop_class, req.calling_ae, destination_ae)
        if plan.status is not None:
            answer(plan.status, comment=plan.comment)
            return
        counts = Counts(total=len(plan.rows))
        if not plan.rows:
            answer(final_status(0, 0, 0, 0), counts)
            return
        if is_get:
            channel: Channel = _ThisAssociation(self, req, self._contexts)
        else:
            dest = plan.destination
            try:
                channel = Outbound.open(dest.host, dest.port, self.server.ae_title, destination_ae,
                                        [(r["sop_class_uid"], r["transfer_syntax_uid"]) for r in plan.rows],
                                        self.server.max_pdu, self.server.network_timeout, plan.tls)
            except (OSError, Closed, pdu.ProtocolError) as exc:
                log.warning("C-MOVE from %s: destination %s (%s:%d) unreachable: %s", req.calling_ae, destination_ae,
                            dest.host, dest.port, exc)
                counts = Counts.all_failed(plan.rows)
                answer(UNABLE_TO_PERFORM, counts, comment=f"destination {destination_ae} unreachable")
                return
        self._cancels.discard(message_id)
        cancelled = False

        def is_cancelled() -> bool:
            nonlocal cancelled
            cancelled = cancelled or message_id in self._cancels or self._cancelled(message_id)
            return cancelled

        def progress(so_far: Counts) -> None:
            if so_far.remaining:
                answer(PENDING, so_far, final=False)

        def finished(status: int, failed_uids: list[str]) -> None:
            self.server.retriever.finished(plan, req.calling_ae, destination_ae, failed_uids, status)

        try:
            counts = send_instances(plan.rows, channel, self.server.backends, is_cancelled, progress,
                                    None if is_get else (req.calling_ae, message_id))
        except CorruptObject as exc:
            log.error("%s from %s aborted: %s", kind, req.calling_ae, exc)
            finished(UNABLE_TO_PERFORM, [r["sop_uid"] for r in plan.rows])  # what arrived is unknown: all count
            if is_get:
                raise pdu.ProtocolError(f"stored object corrupt: {exc}") from exc  # aborts this association
            channel.abort()
            counts = Counts.all_failed(plan.rows)
            answer(UNABLE_TO_PERFORM, counts, comment="a stored object is corrupt")
            return
        except Closed as exc:
            finished(UNABLE_TO_PERFORM, [r["sop_uid"] for r in plan.rows])
            if is_get:
                raise
            log.warning("C-MOVE from %s: destination %s ended the association: %s", req.calling_ae, destination_ae, exc)
            counts = Counts.all_failed(plan.rows)
            answer(UNABLE_TO_PERFORM, counts, comment=f"destination {destination_ae} ended the association")
            return
        if not is_get:
            channel.release()
        status = final_status(counts.total, counts.completed, counts.failed, counts.warning,
                              cancelled and counts.remaining > 0)
        log.info("%s from %s: %d completed, %d failed, %d warning%s", kind, req.calling_ae, counts.completed,
                 counts.failed, counts.warning, " (cancelled)" if status == CANCEL else "")
        done = {r["sop_uid"] for r in plan.rows[:counts.completed + counts.failed + counts.warning]}
        finished(status, counts.failed_uids + [r["sop_uid"] for r in plan.rows if r["sop_uid"] not in done])
        answer(status, counts)

    def _cancelled(self, message_id: int) -> bool:
        """Whether the SCU has sent a C-CANCEL-RQ for ``message_id`` (looked for without waiting)."""
        # peek, not select: the PDU may already sit in the reader's buffer (read with the request's last PDU),
        # where select on the socket would not see it and the cancel would only be read after the last response
        self.sock.setblocking(False)
        try:
            waiting = self.reader.peek(1)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            waiting = b""
        finally:
            self.sock.settimeout(self.server.network_timeout)
        if not waiting:
            return False
        kind, body = self._read_pdu()
        if kind != pdu.P_DATA_TF:
            raise pdu.ProtocolError(f"PDU type {kind} while answering a C-FIND")
        for _, is_command, _, fragment in pdu.pdvs(body):
            if is_command:
                cmd = pdu.parse_command(bytes(fragment))
                if pdu.command_us(cmd, 0x0100) == pdu.C_CANCEL_RQ and pdu.command_us(cmd, 0x0120) == message_id:
                    return True
        raise pdu.ProtocolError("a message other than C-CANCEL while answering a C-FIND")

    def _send_command(self, cid: int, command: bytes, max_pdu: int) -> None:
        self.sock.sendall(b"".join(pdu.p_data(cid, command, max_pdu)))


class _ThisAssociation(Channel):
    """A C-GET's own association as the channel of its sub-operations: the storage contexts for which the
    SCU proposed the SCP role (role selection), the C-STOREs going out as the SCP association's PDUs."""

    def __init__(self, handler: _AssociationHandler, req: pdu.AssociateRequest, contexts: dict[int, tuple[str, str]]):
        self.handler = handler
        self.max_pdu = req.max_pdu
        self.contexts = {(abstract, ts): cid for cid, (abstract, ts) in contexts.items()
                         if req.roles.get(abstract, (0, 0))[1] == 1}

    def context_for(self, sop_class: str, transfer_syntax: str) -> int | None:
        return self.contexts.get((sop_class, transfer_syntax))

    def send(self, data: bytes) -> None:
        self.handler.sock.sendall(data)

    def read_pdu(self) -> tuple[int, memoryview]:
        return self.handler._read_pdu()

    def on_cancel(self, message_id: int) -> None:
        self.handler._cancels.add(message_id)


def listening_socket(host: str, port: int) -> socket.socket:
    """The port's listening socket, made once by the supervisor and inherited by every receiver."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def start_scp(intake: Intake, host: str, port: int, ae_title: str, max_pdu: int, max_associations: int,
              network_timeout: float, allowed_calling_aes: list[str], listen_fd: int | None = None,
              finder: Finder | None = None, retriever: Retriever | None = None,
              backends: Backends | None = None, private_sop_classes: list[str] | str = (),
              artim_timeout: float = 10.0, max_connections: int | None = None,
              tls: ssl.SSLContext | None = None,
              may_act_as: Callable[[str, str], bool] | None = None,
              committer: Committer | None = None) -> StorageServer:
    """Bind (or adopt the inherited ``listen_fd``) and serve in background threads; returns the server.

    With a ``finder`` the AE also answers C-FIND (Patient and Study Root) from the catalogue; with a
    ``retriever`` (and the ``backends`` it reads from) C-GET and C-MOVE; with a ``committer``, storage
    commitment (Push Model). ``private_sop_classes``: the
    storage SOP classes taken beyond the standard ones, or ``any`` (:mod:`.sop_classes`). ``artim_timeout``:
    the ARTIM timer (PS3.8 9.1.5); ``max_connections``: TCP connections held at once (None: twice
    ``max_associations``).
    """
    listen = socket.socket(fileno=listen_fd) if listen_fd is not None else None
    server = StorageServer((host, port), intake, ae_title, max_pdu, max_associations, network_timeout,
                           allowed_calling_aes, listen, finder, retriever, backends, private_sop_classes,
                           artim_timeout, max_connections, tls, may_act_as, committer)
    threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True).start()
    log.info("DICOM SCP %s listening on %s:%d%s", ae_title, host, port, " (TLS)" if tls is not None else "")
    return server
