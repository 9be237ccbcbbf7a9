"""Raw upper-layer bytes for hostile-peer tests: PDUs built by hand (not by the receiver's own encoder), so
malformed lengths, items and orders can be written, and a reader of what the receiver answers."""

from __future__ import annotations

import socket
import struct
import time

from pynetdicom.sop_class import CTImageStorage, Verification

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def item(kind: int, value: bytes, length: int | None = None) -> bytes:
    """A variable item (type, reserved, 2-byte length); ``length`` overrides the true length."""
    return struct.pack(">BBH", kind, 0, len(value) if length is None else length) + value


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU (type, reserved, 4-byte length); ``length`` overrides the true length."""
    return struct.pack(">BBI", kind, 0, len(body) if length is None else length) + body


def context(cid: int, abstract: str, syntaxes=(EXPLICIT_LE,)) -> bytes:
    return item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, abstract.encode())
                + b"".join(item(0x40, ts.encode()) for ts in syntaxes))


def user_info(max_pdu: int = 16384, extra: bytes = b"") -> bytes:
    return item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4") + extra)


STANDARD_CONTEXTS = context(1, CTImageStorage) + context(3, Verification, (IMPLICIT_LE,))


def associate_rq(called: bytes = b"DICOMFLOW", calling: bytes = b"MODALITY", contexts: bytes = STANDARD_CONTEXTS,
                 version: int = 1, app_context: bytes = APP_CONTEXT, user: bytes | None = None,
                 extra: bytes = b"") -> bytes:
    """An A-ASSOCIATE-RQ, every field writable."""
    head = struct.pack(">HH", version, 0) + called.ljust(16, b" ")[:16] + calling.ljust(16, b" ")[:16] + bytes(32)
    return pdu(1, head + item(0x10, app_context) + contexts + (user_info() if user is None else user) + extra)


def pdv(cid: int, control: int, data: bytes, length: int | None = None) -> bytes:
    return struct.pack(">IBB", len(data) + 2 if length is None else length, cid, control) + data


def p_data(*pdvs: bytes) -> bytes:
    return pdu(4, b"".join(pdvs))


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def command(field: int, sop_class: str = CTImageStorage, sop_instance: str = "1.2.3.4", data_set: bool = True,
            message_id: int = 1) -> bytes:
    """A DIMSE request command set (Implicit VR LE, with its group length)."""
    us = struct.Struct("<H").pack

    def even(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    body = (_element(0x0002, even(sop_class)) + _element(0x0100, us(field)) + _element(0x0110, us(message_id))
            + _element(0x0700, us(0)) + _element(0x0800, us(1 if data_set else 0x0101)))
    if sop_instance:
        body += _element(0x1000, even(sop_instance))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def store_rq(sop_instance: str = "1.2.3.4") -> bytes:
    """A C-STORE-RQ command as one last command fragment on context 1."""
    return p_data(pdv(1, 0x03, command(0x0001, sop_instance=sop_instance)))


def echo_rq(message_id: int = 7) -> bytes:
    return p_data(pdv(3, 0x03, command(0x0030, Verification, "", data_set=False, message_id=message_id)))


def release_rq() -> bytes:
    return pdu(5, bytes(4))


def exchange(port: int, payload: bytes, shut: bool = True, timeout: float = 20.0) -> tuple[list[tuple[int, bytes]], bool]:
    """Send ``payload`` on a fresh connection (then close our writing side, ``shut``), read until the receiver
    closes; returns (its PDUs as (type, body), whether it closed within ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the receiver may abort and close before it has read everything
        data, closed = b"", False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset: what arrived before it is all there is
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    return parse_pdus(data), closed


def parse_pdus(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 6 <= len(data):
        kind, length = struct.unpack_from(">BxI", data, pos)
        out.append((kind, data[pos + 6: pos + 6 + length]))
        pos += 6 + length
    return out


def dimse_statuses(pdus: list[tuple[int, bytes]]) -> list[int]:
    """The Status (0000,0900) of each command set the receiver sent (one PDV per command: its responses)."""
    statuses = []
    for kind, body in pdus:
        if kind != 4:
            continue
        pos = 0
        while pos + 6 <= len(body):
            (length,) = struct.unpack_from(">I", body, pos)
            control, value = body[pos + 5], body[pos + 6: pos + 4 + length]
            pos += 4 + length
            if not control & 1:
                continue
            at = 0
            while at + 8 <= len(value):
                group, elem, n = struct.unpack_from("<HHI", value, at)
                if (group, elem) == (0, 0x0900):
                    statuses.append(struct.unpack_from("<H", value, at + 8)[0])
                at += 8 + n
    return statuses
