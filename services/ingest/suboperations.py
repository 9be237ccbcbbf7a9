"""The C-STORE sub-operations of a C-GET or C-MOVE, sent by the lean engine (:mod:`.scp`).

A :class:`Channel` is where the C-STOREs go: the C-GET's own association (its SCU took the storage
SCP role) or, for a C-MOVE, an association this AE opens to the destination (:class:`Outbound`).
Each instance goes as stored, in its own transfer syntax, from the first placement that holds it,
in chunks; its last fragment is sent only once the object matched its digest, and a mismatch
aborts the association that carried it (the receiver never stores wrong bytes as a whole instance).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.storage.objectstore import Backends, CorruptObject
from shared.storage.reading import Unavailable, open_verified

from . import metrics, pdu

log = logging.getLogger("dicomflow.ingest.retrieve")

_HEADER = struct.Struct(">BxI")
_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")
# warning statuses of a C-STORE-RSP (PS3.4 B.2.3): coercion, elements discarded, data set does not match SOP class
_STORE_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


class Closed(Exception):
    """The peer closed or aborted the association."""


class Channel:
    """An association the sub-operations' C-STOREs go over (the shell provides reading and writing)."""

    max_pdu: int

    def context_for(self, sop_class: str, transfer_syntax: str) -> int | None:
        """The accepted presentation context that can carry this instance as stored, if any."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Write PDUs."""
        raise NotImplementedError

    def read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU (type, body)."""
        raise NotImplementedError

    def on_cancel(self, message_id: int) -> None:
        """A C-CANCEL-RQ arrived for ``message_id`` while a C-STORE-RSP was awaited (on the C-GET's association)."""
        raise pdu.ProtocolError("C-CANCEL on an association that carries no retrieve")


@dataclass
class Counts:
    """Sub-operations so far, and the instances that failed."""

    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @classmethod
    def all_failed(cls, rows: list[dict]) -> Counts:
        """Every sub-operation of ``rows`` failed (the destination could not be reached, or was lost)."""
        return cls(total=len(rows), failed=len(rows), failed_uids=[r["sop_uid"] for r in rows])

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def as_tuple(self, final: bool = False) -> tuple[int | None, int, int, int]:
        """(remaining, completed, failed, warning) for a response (remaining left out of a final one)."""
        return (None if final else self.remaining), self.completed, self.failed, self.warning


def await_store_response(channel: Channel, message_id: int) -> int:
    """Read until the C-STORE-RSP to ``message_id`` arrives; its status."""
    command: list[memoryview] = []
    while True:
        kind, body = channel.read_pdu()
        if kind == pdu.ABORT:
            raise Closed("aborted by the peer")
        if kind == pdu.RELEASE_RQ:
            raise pdu.ProtocolError("A-RELEASE-RQ while a C-STORE-RSP was awaited")
        if kind != pdu.P_DATA_TF:
            raise pdu.ProtocolError(f"unexpected PDU type {kind} while a C-STORE-RSP was awaited")
        for _, is_command, last, fragment in pdu.pdvs(body):
            if not is_command:
                raise pdu.ProtocolError("a data set while a C-STORE-RSP was awaited")
            command.append(fragment)
            if not last:
                continue
            cmd, command = pdu.parse_command(b"".join(command)), []
            field_ = pdu.command_us(cmd, 0x0100)
            if field_ == pdu.C_STORE_RSP and pdu.command_us(cmd, 0x0120) == message_id:
                return pdu.command_us(cmd, 0x0900)
            if field_ == pdu.C_CANCEL_RQ:
                channel.on_cancel(pdu.command_us(cmd, 0x0120))
                continue
            raise pdu.ProtocolError(f"DIMSE command 0x{field_:04X} while a C-STORE-RSP was awaited")


def send_instances(rows: list[dict], channel: Channel, backends: Backends, cancelled: Callable[[], bool],
                   progress: Callable[[Counts], None], move_originator: tuple[str, int] | None = None) -> Counts:
    """Send each row's instance as a C-STORE over ``channel``; ``progress`` after each, stop once ``cancelled``.

    Raises :class:`CorruptObject` (after counting it) for an object that does not match its digest: its
    data set was sent without its last fragment, so the caller must abort ``channel``'s association.
    """
    counts = Counts(total=len(rows))
    message_id = 0
    for row in rows:
        if cancelled():
            break
        sop = row["sop_uid"]
        cid = channel.context_for(row["sop_class_uid"], row["transfer_syntax_uid"])
        outcome = "failed"
        if cid is None:
            log.warning("sub-operation %s: no accepted presentation context for %s in %s", sop, row["sop_class_uid"],
                        row["transfer_syntax_uid"])
        else:
            try:
                size, chunks = open_verified(backends, row["digest"], row["placements"])
            except Unavailable as exc:
                log.error("sub-operation %s: %s", sop, exc)
            else:
                message_id = message_id % 0xFFFF + 1
                originator_ae, originator_id = move_originator or ("", None)
                channel.send(b"".join(pdu.p_data(cid, pdu.store_rq(message_id, row["sop_class_uid"], sop,
                                                                   originator_ae, originator_id), channel.max_pdu)))
                try:
                    for chunk, last in chunks:
                        channel.send(b"".join(pdu.p_data(cid, chunk, channel.max_pdu, is_command=False, last=last)))
                except CorruptObject:
                    metrics.corrupt_objects.inc()
                    raise
                metrics.retrieved_bytes.inc(size)
                status = await_store_response(channel, message_id)
                if status == 0:
                    outcome = "completed"
                elif status in _STORE_WARNINGS:
                    outcome = "warning"
                else:
                    log.warning("sub-operation %s: the receiver answered 0x%04X", sop, status)
        metrics.suboperations.labels(outcome=outcome).inc()
        if outcome == "completed":
            counts.completed += 1
        elif outcome == "warning":
            counts.warning += 1
        else:
            counts.failed += 1
            counts.failed_uids.append(sop)
        progress(counts)
    return counts


class Outbound(Channel):
    """An association this AE opens to a C-MOVE destination, proposing each (SOP class, transfer syntax) needed."""

    def __init__(self, sock: socket.socket, max_pdu: int, contexts: dict[tuple[str, str], int]):
        self.sock = sock
        self.reader = sock.makefile("rb", buffering=256 * 1024)
        self.max_pdu = max_pdu
        self.contexts = contexts

    @classmethod
    def open(cls, host: str, port: int, calling_ae: str, called_ae: str, needed: list[tuple[str, str]],
             our_max_pdu: int, timeout: float, tls: ssl.SSLContext | None = None) -> Outbound:
        """Associate, over TLS when ``tls`` is given (raises OSError - ssl.SSLError for a refused certificate -,
        :class:`Closed` on a rejection, ProtocolError)."""
        wanted = list(dict.fromkeys(needed))[:128]  # context ids are odd numbers 1..255
        proposed = [(2 * i + 1, abstract, [ts]) for i, (abstract, ts) in enumerate(wanted)]
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            sock.sendall(pdu.associate_rq(calling_ae, called_ae, proposed, our_max_pdu))
            channel = cls(sock, 0, {})
            kind, body = channel.read_pdu()
            if kind == pdu.ASSOCIATE_RJ:
                raise Closed(f"{called_ae} at {host}:{port} rejected the association "
                             f"(result {body[1]}, source {body[2]}, reason {body[3]})")
            if kind != pdu.ASSOCIATE_AC:
                raise pdu.ProtocolError(f"expected A-ASSOCIATE-AC, got PDU type {kind}")
            max_pdu, results = pdu.parse_associate_ac(bytes(body))
        except BaseException:
            sock.close()
            raise
        channel.max_pdu = max_pdu
        channel.contexts = {(abstract, ts): cid for cid, abstract, (ts,) in proposed
                            if results.get(cid, (1, ""))[0] == pdu.PC_ACCEPT}
        return channel

    def context_for(self, sop_class: str, transfer_syntax: str) -> int | None:
        return self.contexts.get((sop_class, transfer_syntax))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _quickack(self) -> None:
        # ACK at once: a destination with Nagle on (a stock Orthanc 1.10 from Debian) holds back the rest of its
        # C-STORE-RSP until our ACK of its first segment, which Linux delays ~40 ms: 45 ms per instance moved
        # (measured). Set before each read too: set only after reads, it measured no better (our C-STORE-RQ sent in
        # between leaves the kernel's quick-ACK mode).
        if _HAS_QUICKACK:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    def read_pdu(self) -> tuple[int, memoryview]:
        self._quickack()
        head = self.reader.read(6)
        if len(head) < 6:
            raise Closed("connection closed")
        kind, length = _HEADER.unpack(head)
        if length > 64 * 1024 * 1024:
            raise pdu.ProtocolError(f"PDU of {length} bytes")
        self._quickack()
        body = self.reader.read(length) if length else b""
        if len(body) < length:
            raise Closed("connection closed")
        return kind, memoryview(body)

    def release(self) -> None:
        """A-RELEASE, waiting (up to the socket's timeout) for the answer, then close."""
        try:
            self.sock.sendall(pdu.release_rq())
            while self.read_pdu()[0] not in (pdu.RELEASE_RP, pdu.ABORT):
                pass
        except (OSError, Closed, pdu.ProtocolError):
            pass
        finally:
            self.close()

    def abort(self) -> None:
        """A-ABORT, then close."""
        try:
            self.sock.sendall(pdu.abort(0, 0))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
