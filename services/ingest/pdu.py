"""The DICOM upper layer (PS3.8) and DIMSE command sets (PS3.7) that dicomflow's AE needs, as pure functions.

Bytes in, plain values out (and back): no sockets, no threads. The SCP shell reads whole PDUs and
calls these; the association decision (:func:`negotiate`) is plain data too. Only what the AE
does is implemented: A-ASSOCIATE-RQ/AC/RJ (with SCP/SCU role selection, which C-GET needs),
P-DATA-TF, A-RELEASE, A-ABORT, C-STORE, C-ECHO, C-FIND, C-GET and C-MOVE as an SCP, and the C-STORE
requestor side of C-GET and C-MOVE sub-operations (an outbound association for C-MOVE).

What a hostile or broken peer gets is decided here too, as plain functions the shell obeys:
:func:`check_pdu_header` (which PDU may come in which state, and how long it may be: the negotiated
maximum for a P-DATA-TF, PS3.8 9.3.1 and D.1), :func:`parse_associate_rq` (context IDs, item
lengths), :func:`screen_associate_rq` (protocol version, application context name, AE title
characters: the A-ASSOCIATE-RJ reasons of PS3.8 9.3.4 / Table 9-21) and :class:`DimseAssembler`
(which PDV may follow which, PS3.8 9.3.5 and Annex E). Each :class:`ProtocolError` carries the
A-ABORT reason of PS3.8 9.3.8 / Table 9-26 it ends in.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

from shared.dicom.statuses import fit_comment

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "https://dicomflow.invalid/implementation").int)
IMPLEMENTATION_VERSION = "DICOMFLOW_1"

# A-ASSOCIATE-RJ: result, source, reason (PS3.8 9.3.4, Table 9-21)
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_ACSE, RJ_SOURCE_PRESENTATION = 1, 2, 3
RJ_NO_REASON, RJ_APPLICATION_CONTEXT, RJ_CALLING_AE, RJ_CALLED_AE = 1, 2, 3, 7  # with RJ_SOURCE_USER
RJ_PROTOCOL_VERSION = 2  # with RJ_SOURCE_ACSE
RJ_LOCAL_LIMIT = 2  # with RJ_SOURCE_PRESENTATION

# A-ABORT: source and reason/diagnostic (PS3.8 9.3.8, Table 9-26); the reason is significant only when the
# source is the service provider, and is sent as 0 otherwise
ABORT_SOURCE_USER, ABORT_SOURCE_PROVIDER = 0, 2
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_UNRECOGNIZED_PARAMETER, ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 4, 5, 6

# The largest A-ASSOCIATE-RQ read: 128 presentation contexts (odd IDs 1-255) with a dozen transfer syntaxes
# each come to about 120 KiB; PS3.8 bounds it only by its items' 2-byte lengths (some 8 MiB)
MAX_ASSOCIATE_RQ = 1024 * 1024
# The largest P-DATA-TF read when our own maximum is 0 ("unlimited", PS3.8 D.1): a PDU is held whole
MAX_PDU_UNLIMITED = 16 * 1024 * 1024

# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPT, PC_ABSTRACT_NOT_SUPPORTED, PC_TS_NOT_SUPPORTED = 0, 3, 4

# DIMSE command fields and elements (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
C_FIND_RQ, C_FIND_RSP, C_CANCEL_RQ = 0x0020, 0x8020, 0x0FFF
C_GET_RQ, C_GET_RSP, C_MOVE_RQ, C_MOVE_RSP = 0x0010, 0x8010, 0x0021, 0x8021
DATA_SET_PRESENT = 0x0001  # CommandDataSetType: anything but 0x0101
NO_DATA_SET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211


class ProtocolError(Exception):
    """The peer sent something that is not valid upper-layer protocol; the association is aborted.

    ``reason``: the A-ABORT reason/diagnostic (PS3.8 Table 9-26) sent with the service-provider source.
    """

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


@dataclass
class AssociateRequest:
    """What an A-ASSOCIATE-RQ proposes."""

    called_ae: str
    calling_ae: str
    contexts: list[tuple[int, str, list[str]]]  # (id, abstract syntax, transfer syntaxes)
    max_pdu: int = 0  # the largest P-DATA-TF the requestor accepts; 0: unlimited
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)  # abstract syntax -> proposed (SCU, SCP) role
    protocol_version: int = 1  # a bit per version; bit 0: version 1 (PS3.8 9.3.2)
    application_context: str = APPLICATION_CONTEXT
    calling_ae_raw: bytes = b""  # the calling AE title field as sent (screened for control characters)
    user_identity: tuple[int, bool] | None = None  # (identity type, positive response requested), PS3.7 D.3.3.7


@dataclass
class Negotiated:
    """The acceptor's answer: either a rejection (result, source, reason) or the accepted contexts."""

    reject: tuple[int, int, int] | None = None
    results: list[tuple[int, int, str, str]] = field(default_factory=list)  # (id, result, transfer syntax, abstract)

    def accepted(self) -> dict[int, tuple[str, str]]:
        """Context id -> (abstract syntax, transfer syntax) of the accepted contexts."""
        return {cid: (ab, ts) for cid, res, ts, ab in self.results if res == PC_ACCEPT}


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \0")


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\0 ")


def _items(body: bytes | memoryview, pos: int, end: int):
    """(type, value) of the variable items in ``body[pos:end]`` (1-byte type, 1 reserved, 2-byte length)."""
    while pos < end:
        if end - pos < 4:
            raise ProtocolError("truncated item header")
        kind, _, length = struct.unpack_from(">BBH", body, pos)
        if pos + 4 + length > end:
            raise ProtocolError(f"item 0x{kind:02X} claims {length} bytes past the PDU")
        yield kind, bytes(body[pos + 4: pos + 4 + length])
        pos += 4 + length


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """The A-ASSOCIATE-RQ PDU's body (after the 6-byte PDU header).

    Raises :class:`ProtocolError` (invalid PDU parameter value, PS3.8 Table 9-26) for what makes it an
    invalid PDU (Evt19 of PS3.8 9.2): an item running past its parent, a presentation context ID that
    is even, 0 or repeated (PS3.8 9.3.2.2: odd integers 1-255, unique), so more than 128 contexts too.
    Item types it does not know are skipped (PS3.8 9.3.1: reserved and unknown items are ignored).
    """
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    req = AssociateRequest(called_ae=_ae(body[4:20]), calling_ae=_ae(body[20:36]), contexts=[],
                           protocol_version=version, application_context="", calling_ae_raw=bytes(body[20:36]))
    seen: set[int] = set()
    for kind, value in _items(body, 68, len(body)):
        if kind == 0x10:
            req.application_context = _uid(value)
        elif kind == 0x20:
            if len(value) < 4:
                raise ProtocolError("truncated presentation context item")
            cid = value[0]
            if cid % 2 == 0 or cid in seen:
                raise ProtocolError(f"presentation context ID {cid} is {'repeated' if cid in seen else 'even'}")
            seen.add(cid)
            abstract, syntaxes = "", []
            for sub, sval in _items(value, 4, len(value)):
                if sub == 0x30:
                    abstract = _uid(sval)
                elif sub == 0x40:
                    syntaxes.append(_uid(sval))
            req.contexts.append((cid, abstract, syntaxes))
        elif kind == 0x50:
            for sub, sval in _items(value, 0, len(value)):
                if sub == 0x51 and len(sval) == 4:
                    (req.max_pdu,) = struct.unpack(">I", sval)
                elif sub == 0x54 and len(sval) >= 4:  # SCP/SCU role selection (PS3.7 D.3.3.4)
                    (n,) = struct.unpack_from(">H", sval)
                    if len(sval) >= 2 + n + 2:
                        req.roles[_uid(sval[2:2 + n])] = (sval[2 + n], sval[3 + n])
                elif sub == 0x58:  # user identity negotiation (PS3.7 D.3.3.7.1)
                    req.user_identity = _user_identity(sval)
    return req


def _user_identity(value: bytes) -> tuple[int, bool]:
    """(identity type, positive response requested) of a user identity sub-item, its fields checked to fit."""
    if len(value) < 4:
        raise ProtocolError("truncated user identity sub-item")
    (primary,) = struct.unpack_from(">H", value, 2)
    if 4 + primary + 2 > len(value):
        raise ProtocolError("user identity primary field runs past its sub-item")
    (secondary,) = struct.unpack_from(">H", value, 4 + primary)
    if 4 + primary + 2 + secondary > len(value):
        raise ProtocolError("user identity secondary field runs past its sub-item")
    return value[0], value[1] == 1


def _is_ae_text(raw: bytes) -> bool:
    """An AE title field in the default repertoire (PS3.5 6.2, VR AE): printable ASCII but backslash."""
    return all(0x20 <= b < 0x7F and b != 0x5C for b in raw.rstrip(b"\0"))


def screen_associate_rq(req: AssociateRequest) -> tuple[int, int, int] | None:
    """The A-ASSOCIATE-RJ (result, source, reason) for a well-formed request the upper layer does not take,
    or None; checked before :func:`negotiate`.

    * protocol version without bit 0 (version 1): permanent, service-provider (ACSE), protocol version not
      supported (PS3.8 9.3.2: a version-1 receiver tests only that bit; Table 9-21);
    * an application context name other than the DICOM one (PS3.7 A.2.1): permanent, service-user,
      application context name not supported;
    * a calling AE title with control characters, a backslash or non-ASCII bytes (VR AE, PS3.5 6.2): it
      names no AE we could know and would be written to logs and events: calling AE title not recognised.
    """
    if not req.protocol_version & 1:
        return RJ_PERMANENT, RJ_SOURCE_ACSE, RJ_PROTOCOL_VERSION
    if req.application_context != APPLICATION_CONTEXT:
        return RJ_PERMANENT, RJ_SOURCE_USER, RJ_APPLICATION_CONTEXT
    if not _is_ae_text(req.calling_ae_raw) or not req.calling_ae:
        return RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLING_AE
    return None


_FIXED_LENGTH = {ASSOCIATE_RJ: 4, RELEASE_RQ: 4, RELEASE_RP: 4, ABORT: 4}


def check_pdu_header(kind: int, length: int, associated: bool, max_pdu: int) -> None:
    """Whether a PDU of type ``kind`` and ``length`` (its header's length field) may be read now; raises
    :class:`ProtocolError` with the A-ABORT reason before a byte of its body is read or held.

    ``associated``: the association is established (PS3.8 state Sta6), else an A-ASSOCIATE-RQ is awaited
    (Sta2); ``max_pdu``: the maximum length we announced in our A-ASSOCIATE-AC (0: unlimited).

    * a type PS3.8 9.3.1 does not define: unrecognised PDU (Evt19);
    * a defined type out of place (a P-DATA-TF before the association, an A-ASSOCIATE-RQ/AC/RJ or
      A-RELEASE-RP during it, Evt3/4/6/13 of Table 9-10): unexpected PDU;
    * a P-DATA-TF longer than our maximum (PS3.8 D.1: the requestor "shall not" exceed it) or too short
      for one PDV item (9.3.5), an
      A-ASSOCIATE-RQ over :data:`MAX_ASSOCIATE_RQ`, or an A-RELEASE/A-ABORT whose length is not the fixed
      4 of PS3.8 9.3.6-9.3.8: invalid PDU parameter value.
    """
    if not ASSOCIATE_RQ <= kind <= ABORT:
        raise ProtocolError(f"unrecognised PDU type 0x{kind:02X}", ABORT_UNRECOGNIZED_PDU)
    expected = (P_DATA_TF, RELEASE_RQ, ABORT) if associated else (ASSOCIATE_RQ, ABORT)
    if kind not in expected:
        state = "during the association" if associated else "before an A-ASSOCIATE-RQ"
        raise ProtocolError(f"PDU type {kind} {state}", ABORT_UNEXPECTED_PDU)
    if kind in _FIXED_LENGTH and length != _FIXED_LENGTH[kind]:
        raise ProtocolError(f"PDU type {kind} of length {length}, not {_FIXED_LENGTH[kind]}")
    if kind == ASSOCIATE_RQ and length > MAX_ASSOCIATE_RQ:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes, over {MAX_ASSOCIATE_RQ}")
    limit = max_pdu or MAX_PDU_UNLIMITED
    if kind == P_DATA_TF and length > limit:
        raise ProtocolError(f"P-DATA-TF of {length} bytes, over the negotiated maximum of {limit}")
    if kind == P_DATA_TF and length < 6:  # one PDV item at least (PS3.8 9.3.5): 4-byte length, ID, header
        raise ProtocolError(f"P-DATA-TF of {length} bytes holds no PDV item")


class DimseAssembler:
    """Which PDV may follow which during the association (PS3.8 9.3.5, PS3.7 6.3.1 and Annex E), as state.

    A message is its command's fragments on one presentation context, then, if the command announces one,
    its data set's fragments on the same context. :meth:`pdv` returns what a PDV completes, or raises
    :class:`ProtocolError` (the A-ABORT the association ends in): a PDV on a context that was not accepted
    (invalid PDU parameter value), a data fragment with no command before it or on another context than
    its command, a command fragment on another context than the command it continues, a new command while
    a data set is awaited or arriving (unexpected PDU parameter).
    """

    __slots__ = ("accepted", "command", "command_cid", "pending")

    def __init__(self, accepted: set[int] | frozenset[int] | dict):
        self.accepted = accepted
        self.command: list[bytes | memoryview] = []  # fragments of a command still arriving
        self.command_cid: int | None = None
        self.pending: tuple[int, dict[int, bytes]] | None = None  # (context, command) awaiting its data set

    def pdv(self, cid: int, is_command: bool, last: bool, fragment: bytes | memoryview):
        """One PDV: ``("command", cid, cmd)`` for a command without a data set, ``("dataset", cid, cmd)`` for
        a command whose data set follows (its fragments then come as ``("data", cid, last)``), or None."""
        if cid not in self.accepted:
            raise ProtocolError(f"PDV on presentation context {cid}, which was not accepted")
        if is_command:
            if self.pending is not None:
                raise ProtocolError(f"a command on context {cid} while the data set of the command on context "
                                    f"{self.pending[0]} is awaited", ABORT_UNEXPECTED_PARAMETER)
            if self.command_cid is not None and cid != self.command_cid:
                raise ProtocolError(f"a command fragment on context {cid} continues one on {self.command_cid}",
                                    ABORT_UNEXPECTED_PARAMETER)
            self.command.append(fragment)
            self.command_cid = cid
            if not last:
                return None
            cmd = parse_command(b"".join(self.command))
            self.command, self.command_cid = [], None
            if command_us(cmd, 0x0800, NO_DATA_SET) == NO_DATA_SET:
                return "command", cid, cmd
            self.pending = (cid, cmd)
            return "dataset", cid, cmd
        if self.pending is None:
            raise ProtocolError("a data set fragment without a command", ABORT_UNEXPECTED_PARAMETER)
        if cid != self.pending[0]:
            raise ProtocolError(f"a data set fragment on context {cid}, its command's is {self.pending[0]}",
                                ABORT_UNEXPECTED_PARAMETER)
        if last:
            self.pending = None
        return "data", cid, last


def negotiate(req: AssociateRequest, ae_title: str, allowed_calling: list[str], supported: dict[str, frozenset[str]],
              busy: bool = False) -> Negotiated:
    """Accept or reject an association: AE titles first, then each context against ``supported``.

    ``supported``: abstract syntax -> the transfer syntaxes we take for it. The requestor's order of
    transfer syntaxes decides among those we support.
    """
    if req.called_ae != ae_title:
        return Negotiated(reject=(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLED_AE))
    if allowed_calling and req.calling_ae not in allowed_calling:
        return Negotiated(reject=(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLING_AE))
    if busy:
        return Negotiated(reject=(RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT))
    out = Negotiated()
    for cid, abstract, syntaxes in req.contexts:
        ours = supported.get(abstract)
        if ours is None:
            res, ts = PC_ABSTRACT_NOT_SUPPORTED, (syntaxes[0] if syntaxes else "")
        else:
            ts = next((t for t in syntaxes if t in ours), "")
            res = PC_ACCEPT if ts else PC_TS_NOT_SUPPORTED
            ts = ts or (syntaxes[0] if syntaxes else "")
        out.results.append((cid, res, ts, abstract))
    if not out.accepted():
        return Negotiated(reject=(RJ_PERMANENT, RJ_SOURCE_USER, RJ_NO_REASON))
    return out


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _ae_field(ae: str) -> bytes:
    return ae.encode("ascii", "replace")[:16].ljust(16, b" ")


def associate_ac(req: AssociateRequest, neg: Negotiated, max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC PDU for an accepted negotiation."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cid, res, ts, _ in neg.results:
        items.append(_item(0x21, bytes([cid, 0, res, 0]) + _item(0x40, ts.encode())))
    user = (_item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
            + _item(0x55, IMPLEMENTATION_VERSION.encode()))
    # Roles proposed for an accepted storage context are taken as proposed: a C-GET's SCU acts as the
    # storage SCP of its sub-operations, which this AE sends.
    accepted = {ab for _, res, _, ab in neg.results if res == PC_ACCEPT}
    user += _role_items({abstract: role for abstract, role in req.roles.items() if abstract in accepted})
    if req.user_identity is not None and req.user_identity[1]:
        # The AE authenticates by AE title and takes the identity as asserted; a requestor that asked for a
        # positive response gets one (PS3.7 D.3.3.7.2), with an empty server response (no Kerberos ticket,
        # SAML or JWT response to give; zero length is what types 1 and 2 require).
        user += _item(0x59, struct.pack(">H", 0))
    items.append(_item(0x50, user))
    head = struct.pack(">HH", 1, 0) + _ae_field(req.called_ae) + _ae_field(req.calling_ae) + bytes(32)
    return _pdu(ASSOCIATE_AC, head + b"".join(items))


def _role_items(roles: dict[str, tuple[int, int]]) -> bytes:
    return b"".join(_item(0x54, struct.pack(">H", len(uid := abstract.encode())) + uid + bytes([scu, scp]))
                    for abstract, (scu, scp) in roles.items())


def associate_rq(calling_ae: str, called_ae: str, contexts: list[tuple[int, str, list[str]]], max_pdu: int,
                 roles: dict[str, tuple[int, int]] | None = None) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` (id, abstract syntax, transfer syntaxes) and ``roles``
    (abstract syntax -> (SCU role, SCP role))."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items.append(_item(0x20, bytes([cid, 0, 0, 0]) + sub))
    user = (_item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
            + _item(0x55, IMPLEMENTATION_VERSION.encode()) + _role_items(roles or {}))
    items.append(_item(0x50, user))
    head = struct.pack(">HH", 1, 0) + _ae_field(called_ae) + _ae_field(calling_ae) + bytes(32)
    return _pdu(ASSOCIATE_RQ, head + b"".join(items))


def parse_associate_ac(body: bytes) -> tuple[int, dict[int, tuple[int, str]]]:
    """(the acceptor's maximum PDU size, context id -> (result, transfer syntax)) of an A-ASSOCIATE-AC body."""
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-AC shorter than its fixed fields")
    max_pdu, results = 0, {}
    for kind, value in _items(body, 68, len(body)):
        if kind == 0x21 and len(value) >= 4:
            ts = next((_uid(v) for sub, v in _items(value, 4, len(value)) if sub == 0x40), "")
            results[value[0]] = (value[2], ts)
        elif kind == 0x50:
            for sub, sval in _items(value, 0, len(value)):
                if sub == 0x51 and len(sval) == 4:
                    (max_pdu,) = struct.unpack(">I", sval)
    return max_pdu, results


def release_rq() -> bytes:
    """The A-RELEASE-RQ PDU."""
    return _pdu(RELEASE_RQ, bytes(4))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """The A-ASSOCIATE-RJ PDU."""
    return _pdu(ASSOCIATE_RJ, bytes([0, result, source, reason]))


def release_rp() -> bytes:
    """The A-RELEASE-RP PDU."""
    return _pdu(RELEASE_RP, bytes(4))


def abort(source: int = 2, reason: int = 0) -> bytes:
    """An A-ABORT PDU (source 2: service provider; reason 0: not specified, 1: unrecognised PDU, 2: unexpected)."""
    return _pdu(ABORT, bytes([0, 0, source, reason]))


def pdvs(body: bytes | memoryview):
    """(context id, is command, is last fragment, fragment) of each PDV item in a P-DATA-TF body."""
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            raise ProtocolError("truncated PDV item")
        (length,) = struct.unpack_from(">I", body, pos)
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError(f"PDV item of length {length} does not fit the PDU")
        cid, mch = body[pos + 4], body[pos + 5]
        yield cid, bool(mch & 1), bool(mch & 2), body[pos + 6: pos + 4 + length]
        pos += 4 + length


def parse_command(raw: bytes) -> dict[int, bytes]:
    """The elements of a DIMSE command set (Implicit VR Little Endian): element number -> value bytes."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            raise ProtocolError("truncated command element")
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        if group != 0 or pos + 8 + length > end:
            raise ProtocolError(f"bad command element ({group:04X},{elem:04X})")
        out[elem] = raw[pos + 8: pos + 8 + length]
        pos += 8 + length
    return out


def command_us(cmd: dict[int, bytes], elem: int, default: int = 0) -> int:
    """An unsigned short of a command set."""
    value = cmd.get(elem)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else default


def command_uid(cmd: dict[int, bytes], elem: int) -> str:
    """A UID (or other text) of a command set."""
    value = cmd.get(elem)
    return _uid(value).strip() if value else ""


def _elem(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _even(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def response(field_: int, message_id: int, status: int, sop_class: str, sop_instance: str = "",
             comment: str = "", data_set: bool = False,
             counts: tuple[int | None, int, int, int] | None = None) -> bytes:
    """A DIMSE response command set (C-STORE-RSP, C-ECHO-RSP, C-FIND-RSP ...) with its group length;
    ``data_set``: a data set follows it (a pending C-FIND-RSP's identifier); ``counts``: a C-GET/C-MOVE
    response's (remaining, completed, failed, warning) sub-operations (remaining None: left out)."""
    us = struct.Struct("<H").pack
    body = [_elem(0x0002, _even(sop_class, b"\0")) if sop_class else b"",
            _elem(0x0100, us(field_)), _elem(0x0120, us(message_id)),
            _elem(0x0800, us(DATA_SET_PRESENT if data_set else NO_DATA_SET)),
            _elem(0x0900, us(status))]
    if comment:
        # LO: 64 characters, no backslash (the value delimiter) and no control characters.
        text = fit_comment(comment)
        body.append(_elem(0x0902, _even(text, b" ")))
    if sop_instance:
        body.append(_elem(0x1000, _even(sop_instance, b"\0")))
    if counts is not None:
        for elem, n in zip((0x1020, 0x1021, 0x1022, 0x1023), counts, strict=True):
            if n is not None:
                body.append(_elem(elem, us(min(n, 0xFFFF))))
    rest = b"".join(body)
    return _elem(0x0000, struct.pack("<I", len(rest))) + rest


def store_rq(message_id: int, sop_class: str, sop_instance: str, move_originator_ae: str = "",
             move_originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set (priority medium); a C-MOVE's sub-operation names its originator."""
    us = struct.Struct("<H").pack
    body = [_elem(0x0002, _even(sop_class, b"\0")), _elem(0x0100, us(C_STORE_RQ)), _elem(0x0110, us(message_id)),
            _elem(0x0700, us(0)), _elem(0x0800, us(DATA_SET_PRESENT)), _elem(0x1000, _even(sop_instance, b"\0"))]
    if move_originator_ae:
        body.append(_elem(0x1030, _even(move_originator_ae, b" ")))
    if move_originator_id is not None:
        body.append(_elem(0x1031, us(move_originator_id)))
    rest = b"".join(body)
    return _elem(0x0000, struct.pack("<I", len(rest))) + rest


def p_data(cid: int, command: bytes, max_pdu: int, is_command: bool = True, last: bool = True) -> list[bytes]:
    """P-DATA-TF PDUs carrying one command set (or, ``is_command`` False, one data set), fragmented to the
    peer's maximum PDU size; ``last`` False: a piece of a data set that goes on (no fragment marked last)."""
    room = (max_pdu - 6) if max_pdu else len(command) or 1  # PDV header: 4-byte length, id, control
    room = max(room, 1)
    out = []
    for start in range(0, max(len(command), 1), room):
        frag = command[start: start + room]
        final = last and start + room >= len(command)
        control = (0x01 if is_command else 0x00) | (0x02 if final else 0x00)
        pdv = struct.pack(">IBB", len(frag) + 2, cid, control) + frag
        out.append(_pdu(P_DATA_TF, pdv))
    return out
