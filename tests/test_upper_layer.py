"""The upper layer's decisions for hostile or broken peers, as pure functions (no sockets): which PDU may come
when and how long (PS3.8 9.3.1, D.1), which A-ASSOCIATE-RJ for which request (Table 9-21), which A-ABORT
reason for which PDV order (Table 9-26), the user identity answer (PS3.7 D.3.3.7). The same cases over a
real TCP connection to a real receiver are in test_ingest_adversarial.py.
"""

from __future__ import annotations

import struct

import pytest
from pynetdicom import build_context, pdu_primitives
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.sop_class import CTImageStorage, Verification

from services.ingest import pdu
from services.ingest.scp import SUPPORTED
from tests import adversarial as a

NO_LIMIT = 0


@pytest.mark.parametrize("kind,length,associated,max_pdu,reason", [
    (1, 200, False, 16384, None),
    (7, 4, False, 16384, None),  # an A-ABORT may come before the association (AA-2)
    (4, 100, False, 16384, pdu.ABORT_UNEXPECTED_PDU),
    (2, 100, False, 16384, pdu.ABORT_UNEXPECTED_PDU),
    (5, 4, False, 16384, pdu.ABORT_UNEXPECTED_PDU),
    (0, 4, False, 16384, pdu.ABORT_UNRECOGNIZED_PDU),
    (8, 4, True, 16384, pdu.ABORT_UNRECOGNIZED_PDU),
    (0xFF, 4, True, 16384, pdu.ABORT_UNRECOGNIZED_PDU),
    (1, pdu.MAX_ASSOCIATE_RQ + 1, False, 16384, pdu.ABORT_INVALID_PARAMETER),
    (1, 0xFFFFFFFF, False, 16384, pdu.ABORT_INVALID_PARAMETER),
    (4, 16384, True, 16384, None),
    (4, 16385, True, 16384, pdu.ABORT_INVALID_PARAMETER),  # over the maximum we announced
    (4, 0xFFFFFFFF, True, 16384, pdu.ABORT_INVALID_PARAMETER),
    (4, pdu.MAX_PDU_UNLIMITED, True, NO_LIMIT, None),
    (4, pdu.MAX_PDU_UNLIMITED + 1, True, NO_LIMIT, pdu.ABORT_INVALID_PARAMETER),
    (4, 5, True, 16384, pdu.ABORT_INVALID_PARAMETER),  # no room for one PDV item
    (5, 4, True, 16384, None),
    (5, 5, True, 16384, pdu.ABORT_INVALID_PARAMETER),
    (7, 100, True, 16384, pdu.ABORT_INVALID_PARAMETER),
    (1, 200, True, 16384, pdu.ABORT_UNEXPECTED_PDU),
    (3, 4, True, 16384, pdu.ABORT_UNEXPECTED_PDU),
    (6, 4, True, 16384, pdu.ABORT_UNEXPECTED_PDU),
])
def test_pdu_headers_by_state(kind, length, associated, max_pdu, reason):
    if reason is None:
        pdu.check_pdu_header(kind, length, associated, max_pdu)
    else:
        with pytest.raises(pdu.ProtocolError) as err:
            pdu.check_pdu_header(kind, length, associated, max_pdu)
        assert err.value.reason == reason


def _rq(**kw) -> pdu.AssociateRequest:
    return pdu.parse_associate_rq(a.associate_rq(**kw)[6:])


@pytest.mark.parametrize("kw,reject", [
    ({}, None),
    ({"version": 3}, None),  # a version-1 receiver tests only bit 0 (PS3.8 9.3.2)
    ({"version": 0}, (1, 2, 2)),
    ({"version": 2}, (1, 2, 2)),
    ({"app_context": b"1.2.3"}, (1, 1, 2)),
    ({"app_context": b""}, (1, 1, 2)),
    ({"calling": b"MOD\nX"}, (1, 1, 3)),
    ({"calling": b"MOD\\X"}, (1, 1, 3)),
    ({"calling": b"\xc3\xa9"}, (1, 1, 3)),
    ({"calling": b""}, (1, 1, 3)),
    ({"calling": b"ST ORE-SCU_1"}, None),  # spaces inside and punctuation are AE characters
])
def test_associate_request_screened_with_table_9_21_reasons(kw, reject):
    assert pdu.screen_associate_rq(_rq(**kw)) == reject


def test_requests_encoded_by_pynetdicom_pass_the_screen():
    prim = pdu_primitives.A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = "MODALITY", "DICOMFLOW"
    cx = build_context(CTImageStorage)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = pdu_primitives.MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    req = pdu.parse_associate_rq(rq.encode()[6:])
    assert pdu.screen_associate_rq(req) is None
    assert (req.protocol_version, req.application_context, req.max_pdu) == (1, pdu.APPLICATION_CONTEXT, 16384)


@pytest.mark.parametrize("ids", [(2,), (0,), (1, 1), (1, 3, 5, 3), tuple((2 * i + 1) % 256 for i in range(129))])
def test_context_ids_must_be_odd_and_unique(ids):
    contexts = b"".join(a.context(cid, CTImageStorage) for cid in ids)
    with pytest.raises(pdu.ProtocolError) as err:
        pdu.parse_associate_rq(a.associate_rq(contexts=contexts)[6:])
    assert err.value.reason == pdu.ABORT_INVALID_PARAMETER


def test_128_contexts_parse_and_none_accepted_is_a_rejection():
    req = pdu.parse_associate_rq(a.associate_rq(contexts=b"".join(a.context(c, "1.2.3.999")
                                                                 for c in range(1, 256, 2)))[6:])
    assert len(req.contexts) == 128
    assert pdu.negotiate(req, "DICOMFLOW", [], SUPPORTED).reject == (1, 1, 1)
    assert pdu.negotiate(_rq(contexts=b""), "DICOMFLOW", [], SUPPORTED).reject == (1, 1, 1)


@pytest.mark.parametrize("raw", [
    b"\x01\x01\x40\x00user",            # primary field past the sub-item
    b"\x02\x01\x00\x04user\x10\x00pw",  # secondary field past the sub-item
    b"\x01\x01\x00",                    # shorter than its fixed fields
])
def test_user_identity_fields_must_fit(raw):
    with pytest.raises(pdu.ProtocolError):
        _rq(user=a.user_info(extra=a.item(0x58, raw)))


@pytest.mark.parametrize("positive", [True, False])
def test_user_identity_positive_response_when_asked(positive):
    """pynetdicom's decoder reads our A-ASSOCIATE-AC: a user identity response item only when one was asked."""
    ident = bytes([2, 1 if positive else 0]) + struct.pack(">H", 4) + b"jane" + struct.pack(">H", 6) + b"secret"
    req = _rq(user=a.user_info(extra=a.item(0x58, ident)))
    assert req.user_identity == (2, positive)
    neg = pdu.negotiate(req, "DICOMFLOW", [], SUPPORTED)
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu.associate_ac(req, neg, 16384))
    items = [type(i).__name__ for i in ac.user_information.user_data]
    assert ("UserIdentitySubItemAC" in items) is positive
    if positive:
        sub = next(i for i in ac.user_information.user_data if type(i).__name__ == "UserIdentitySubItemAC")
        assert sub.server_response_length == 0


def _cmd(field: int, data_set: bool, cid: int = 1):
    return cid, True, True, a.command(field, data_set=data_set)


def _run(*pdvs) -> list:
    messages = pdu.DimseAssembler({1: (CTImageStorage, ""), 3: (Verification, "")})
    return [messages.pdv(*p) for p in pdvs]


def test_a_message_is_its_command_then_its_data_set_on_one_context():
    events = _run((1, True, False, a.command(1)[:10]), (1, True, True, a.command(1)[10:]),
                  (1, False, False, b"ab"), (1, False, True, b"cd"), _cmd(0x0030, False, 3))
    assert events[0] is None
    assert events[1][:2] == ("dataset", 1) and pdu.command_us(events[1][2], 0x0100) == 1
    assert events[2:4] == [("data", 1, False), ("data", 1, True)]
    assert events[4][:2] == ("command", 3)


@pytest.mark.parametrize("pdvs,reason", [
    ([(5, True, True, b"")], pdu.ABORT_INVALID_PARAMETER),                        # context not accepted
    ([(1, False, True, b"ab")], pdu.ABORT_UNEXPECTED_PARAMETER),                  # data without a command
    ([_cmd(1, True), (3, False, True, b"ab")], pdu.ABORT_UNEXPECTED_PARAMETER),   # data on another context
    ([_cmd(1, True), _cmd(0x0030, False, 3)], pdu.ABORT_UNEXPECTED_PARAMETER),    # command while data awaited
    ([_cmd(1, True), (1, False, False, b"ab"), _cmd(1, True)], pdu.ABORT_UNEXPECTED_PARAMETER),
    ([(3, True, False, b"\0" * 8), (1, True, True, b"")], pdu.ABORT_UNEXPECTED_PARAMETER),  # fragments on two
    ([(3, True, True, b"\0\0\0")], pdu.ABORT_INVALID_PARAMETER),                  # command set truncated
])
def test_pdv_order_violations_and_their_abort_reasons(pdvs, reason):
    with pytest.raises(pdu.ProtocolError) as err:
        _run(*pdvs)
    assert err.value.reason == reason
