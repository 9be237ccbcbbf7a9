"""What a hostile or broken peer sends, over a real TCP connection to a real receiver process (the lean engine,
``dicomflow ingest --single`` against a real nats-server): each case gets an A-ASSOCIATE-RJ, an A-ABORT with
the PS3.8 source and reason, or a DICOM failure status, never a crash; a normal association opened before the
corpus goes on working through it, dcmtk's echoscu and storescu work after it, and the receiver's peak memory
stays bounded (VmHWM from /proc). The pure decisions behind each answer are tested in test_upper_layer.py.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomflow.natsserver import wait_port
from dicomflow.synthetic import write_study
from tests import adversarial as a
from tests.helpers import REPO, make_config, proc_status, start_nats, wait_for

MAX_PDU = 16384
ARTIM_S = 2.0
MAX_CONNECTIONS = 24

ABORT_USER = ("abort", 0, 0)  # AA-1, before the association (PS3.8 Table 9-10, Sta2)


def _abort(reason: int) -> tuple:  # AA-8, during the association: service-provider source
    return ("abort", 2, reason)


UNRECOGNIZED_PDU, UNEXPECTED_PDU, UNEXPECTED_PARAMETER, INVALID_PARAMETER = 1, 2, 5, 6
REJECT_NO_CONTEXT = ("reject", 1, 1, 1)
REJECT_APP_CONTEXT = ("reject", 1, 1, 2)
REJECT_CALLING = ("reject", 1, 1, 3)
REJECT_CALLED = ("reject", 1, 1, 7)
REJECT_VERSION = ("reject", 1, 2, 2)
CLOSED = ("closed",)  # the peer closed its side mid-PDU: nothing to answer, the receiver closes too
ACCEPTED = ("accepted",)
FAILED = ("failed",)  # associated, every DIMSE response a failure status, released


def _explicit(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + b"\0\0" + struct.pack("<I", n) + value
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", n) + value


def _ui(text: str) -> bytes:
    raw = text.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def _head(sop: str = "1.2.3.4") -> bytes:
    return _explicit(0x00080016, b"UI", _ui(CTImageStorage)) + _explicit(0x00080018, b"UI", _ui(sop))


def _ds(middle: bytes = b"", sop: str = "1.2.3.4") -> bytes:
    """A data set whose only defect is ``middle`` (elements between (0008,0018) and (0020,000D))."""
    return _head(sop) + middle + _explicit(0x0020000D, b"UI", _ui("1.2.3.1")) + _explicit(0x0020000E, b"UI",
                                                                                          _ui("1.2.3.2"))


def _nested(depth: int) -> bytes:
    """Sequences of undefined length, one item each, ``depth`` deep."""
    seq_start = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end, seq_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0), struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (seq_start + item_start) * depth + (item_end + seq_end) * depth


def _data_pdus(raw: bytes, cid: int = 1) -> bytes:
    """A data set as P-DATA-TF PDUs within our maximum, the last fragment marked."""
    room = MAX_PDU - 6
    out = []
    for start in range(0, max(len(raw), 1), room):
        last = start + room >= len(raw)
        out.append(a.p_data(a.pdv(cid, 0x02 if last else 0x00, raw[start:start + room])))
    return b"".join(out)


def _store(raw: bytes, sop: str = "1.2.3.4") -> bytes:
    return a.store_rq(sop) + _data_pdus(raw)


RQ = a.associate_rq()


def _during(*attack: bytes) -> bytes:
    return RQ + b"".join(attack) + a.release_rq()


def _contexts(ids) -> bytes:
    return b"".join(a.context(cid, CTImageStorage) for cid in ids)


CASES: dict[str, tuple[bytes, tuple]] = {}

# --- before the association (Sta2): anything but an A-ASSOCIATE-RQ -------------------------------------
for kind, name in ((2, "A-ASSOCIATE-AC"), (3, "A-ASSOCIATE-RJ"), (4, "P-DATA-TF"), (5, "A-RELEASE-RQ"),
                   (6, "A-RELEASE-RP")):
    CASES[f"first PDU {name}"] = (a.pdu(kind, bytes(4)), ABORT_USER)
for kind in (0, 8, 0x10, 0x80, 0xFF):
    CASES[f"first PDU unknown type 0x{kind:02X}"] = (a.pdu(kind, bytes(4)), ABORT_USER)
CASES["first PDU an A-ABORT"] = (a.pdu(7, bytes(4)), CLOSED)
for length in (0xFFFFFFFF, 0x80000000, 2 * 1024 * 1024):
    CASES[f"A-ASSOCIATE-RQ claiming {length} bytes"] = (a.pdu(1, bytes(68), length), ABORT_USER)
for cut in (1, 3, 5, 6, 10, 40, 73, len(RQ) - 1):
    CASES[f"A-ASSOCIATE-RQ truncated to {cut} bytes"] = (RQ[:cut], CLOSED)
for size in (0, 10, 67):
    CASES[f"A-ASSOCIATE-RQ body of {size} bytes"] = (a.pdu(1, bytes(size)), ABORT_USER)

# items running past their parent
CASES["A-ASSOCIATE-RQ cut inside its application context item"] = (RQ[:78], CLOSED)
_head_rq = struct.pack(">HH", 1, 0) + b"DICOMFLOW".ljust(16) + b"MODALITY".ljust(16) + bytes(32)
CASES["item claiming 65535 bytes past the PDU"] = (a.pdu(1, _head_rq + a.item(0x10, a.APP_CONTEXT, 0xFFFF)),
                                                   ABORT_USER)
CASES["presentation context item past the PDU"] = (
    a.pdu(1, _head_rq + a.item(0x10, a.APP_CONTEXT) + a.item(0x20, bytes([1, 0, 0, 0]), 400)), ABORT_USER)
CASES["abstract syntax sub-item past its context"] = (
    a.associate_rq(contexts=a.item(0x20, bytes([1, 0, 0, 0]) + a.item(0x30, b"1.2.840", 200))), ABORT_USER)
CASES["presentation context item of 2 bytes"] = (a.associate_rq(contexts=a.item(0x20, b"\x01\x00")), ABORT_USER)
CASES["user information sub-item past its item"] = (
    a.associate_rq(user=a.item(0x50, a.item(0x51, struct.pack(">I", 16384), 0x4000))), ABORT_USER)
CASES["item header cut short at the PDU's end"] = (a.associate_rq(extra=b"\x50\x00"), ABORT_USER)

# presentation context IDs (PS3.8 9.3.2.2: odd, 1-255, unique)
CASES["0 presentation contexts"] = (a.associate_rq(contexts=b""), REJECT_NO_CONTEXT)
CASES["257 presentation contexts"] = (a.associate_rq(contexts=_contexts([(2 * i + 1) % 256 for i in range(257)])),
                                      ABORT_USER)
CASES["129 presentation contexts"] = (a.associate_rq(contexts=_contexts([(2 * i + 1) % 256 for i in range(129)])),
                                      ABORT_USER)
CASES["128 presentation contexts"] = (a.associate_rq(contexts=_contexts(range(1, 256, 2))), ACCEPTED)
CASES["128 contexts of an unknown SOP class"] = (
    a.associate_rq(contexts=b"".join(a.context(c, "1.2.3.999") for c in range(1, 256, 2))), REJECT_NO_CONTEXT)
for ids in ((2,), (0,), (254,), (1, 3, 1), (5, 5), (1, 4)):
    CASES[f"context IDs {ids}"] = (a.associate_rq(contexts=_contexts(ids)), ABORT_USER)
CASES["context without transfer syntax"] = (a.associate_rq(contexts=a.context(1, CTImageStorage, ())),
                                            REJECT_NO_CONTEXT)
CASES["context with 200 transfer syntaxes"] = (
    a.associate_rq(contexts=a.context(1, CTImageStorage, [f"1.2.3.{i}" for i in range(200)] + [a.EXPLICIT_LE])),
    ACCEPTED)

# protocol version, application context (PS3.8 Table 9-21)
for version in (0, 2, 0x8000):
    CASES[f"protocol version 0x{version:04X}"] = (a.associate_rq(version=version), REJECT_VERSION)
CASES["protocol version 0x0003"] = (a.associate_rq(version=3), ACCEPTED)
for app in (b"1.2.3", b"", b"9" * 64, b"1.2.840.10008.3.1.1.1.1"):
    CASES[f"application context {app[:12]!r}"] = (a.associate_rq(app_context=app), REJECT_APP_CONTEXT)
CASES["no application context item"] = (a.pdu(1, _head_rq + a.STANDARD_CONTEXTS + a.user_info()),
                                        REJECT_APP_CONTEXT)

# AE titles: control characters, backslash, non-ASCII, empty
for calling in (b"MOD\x01", b"MOD\nFORGED LOG", b"\x1b[31mRED", b"MOD\\X", b"\xc3\xa9CHO", b"MOD\x7f", b"",
                b"\0" * 16):
    CASES[f"calling AE {calling!r}"] = (a.associate_rq(calling=calling), REJECT_CALLING)
for called in (b"DICOMFLOW\n", b"DICOM\x00FLOW", b"\xffDICOMFLOW", b"", b"dicomflow"):
    CASES[f"called AE {called!r}"] = (a.associate_rq(called=called), REJECT_CALLED)

# user information
_uid_item = a.item(0x52, b"1." + b"2" * 60000)
CASES["implementation class UID of 60000 bytes"] = (a.associate_rq(user=a.user_info(extra=_uid_item)), ACCEPTED)
CASES["user information item of 65535 bytes"] = (
    a.associate_rq(user=a.item(0x50, a.item(0x51, struct.pack(">I", 0)) + a.item(0x99, bytes(65535 - 12)))),
    ACCEPTED)
CASES["maximum length sub-item of 8 bytes"] = (a.associate_rq(user=a.item(0x50, a.item(0x51, bytes(8)))), ACCEPTED)
CASES["no user information item"] = (a.pdu(1, _head_rq + a.item(0x10, a.APP_CONTEXT) + a.STANDARD_CONTEXTS),
                                     ACCEPTED)
CASES["user identity primary field past its sub-item"] = (
    a.associate_rq(user=a.user_info(extra=a.item(0x58, b"\x01\x01\x40\x00user"))), ABORT_USER)
CASES["user identity secondary field past its sub-item"] = (
    a.associate_rq(user=a.user_info(extra=a.item(0x58, b"\x02\x01\x00\x04user\x10\x00pw"))), ABORT_USER)
CASES["user identity of 3 bytes"] = (a.associate_rq(user=a.user_info(extra=a.item(0x58, b"\x01\x01\x00"))),
                                     ABORT_USER)
CASES["unknown item types"] = (a.associate_rq(extra=a.item(0x99, b"x" * 100) + a.item(0x00, b"")), ACCEPTED)

# --- during the association (Sta6): misplaced or malformed PDUs end in AA-8 ------------------------------
for kind, name in ((1, "A-ASSOCIATE-RQ"), (2, "A-ASSOCIATE-AC"), (3, "A-ASSOCIATE-RJ"), (6, "A-RELEASE-RP")):
    CASES[f"{name} during the association"] = (_during(a.pdu(kind, bytes(4))), _abort(UNEXPECTED_PDU))
CASES["second A-ASSOCIATE-RQ"] = (_during(RQ), _abort(UNEXPECTED_PDU))
for kind in (0, 8, 0x44, 0xFF):
    CASES[f"unknown PDU type 0x{kind:02X} during the association"] = (_during(a.pdu(kind, bytes(4))),
                                                                     _abort(UNRECOGNIZED_PDU))
for length in (MAX_PDU + 1, 1024 * 1024, 64 * 1024 * 1024, 0xFFFFFFFF):
    CASES[f"P-DATA-TF claiming {length} bytes"] = (_during(a.pdu(4, bytes(16), length)), _abort(INVALID_PARAMETER))
CASES["P-DATA-TF of 0 bytes"] = (_during(a.pdu(4, b"")), _abort(INVALID_PARAMETER))
CASES["P-DATA-TF of 5 bytes"] = (_during(a.pdu(4, bytes(5))), _abort(INVALID_PARAMETER))
CASES["A-RELEASE-RQ of 5 bytes"] = (RQ + a.pdu(5, bytes(5)), _abort(INVALID_PARAMETER))
CASES["A-ABORT of 100 bytes"] = (RQ + a.pdu(7, bytes(100)), _abort(INVALID_PARAMETER))
for length, name in ((0, "0"), (1, "1"), (40, "past the PDU"), (0xFFFFFFFF, "4 GiB")):
    CASES[f"PDV length {name}"] = (_during(a.p_data(a.pdv(1, 0x03, bytes(8), length))), _abort(INVALID_PARAMETER))
CASES["PDV header cut by the PDU"] = (
    _during(a.pdu(4, a.pdv(3, 0x03, a.command(0x0030, Verification, "", data_set=False)) + b"\0\0\0")),
    _abort(INVALID_PARAMETER))
CASES["second PDV past the PDU"] = (
    _during(a.pdu(4, a.pdv(3, 0x03, a.command(0x0030, Verification, "", data_set=False)) + a.pdv(3, 3, b"", 99))),
    _abort(INVALID_PARAMETER))
for cid in (5, 2, 0, 255):
    CASES[f"PDV on context {cid}, not accepted"] = (_during(a.p_data(a.pdv(cid, 0x03, a.command(0x0030)))),
                                                   _abort(INVALID_PARAMETER))
CASES["data fragment without a command"] = (_during(a.p_data(a.pdv(1, 0x02, b"abcd"))), _abort(UNEXPECTED_PARAMETER))
CASES["data fragment on another context than its command"] = (
    _during(a.store_rq(), a.p_data(a.pdv(3, 0x02, _head()))), _abort(UNEXPECTED_PARAMETER))
CASES["data on the command's context, then on another"] = (
    _during(a.store_rq(), a.p_data(a.pdv(1, 0x00, _head()[:10]), a.pdv(3, 0x02, _head()[10:]))),
    _abort(UNEXPECTED_PARAMETER))
CASES["new command while a data set is awaited"] = (_during(a.store_rq(), a.echo_rq()), _abort(UNEXPECTED_PARAMETER))
CASES["new command while a data set arrives"] = (
    _during(a.store_rq(), a.p_data(a.pdv(1, 0x00, _head())), a.store_rq("1.2.3.5")), _abort(UNEXPECTED_PARAMETER))
_cmd = a.command(0x0030, Verification, "", data_set=False)
CASES["command fragments on two contexts"] = (
    _during(a.p_data(a.pdv(3, 0x01, _cmd[:20]), a.pdv(1, 0x03, _cmd[20:]))), _abort(UNEXPECTED_PARAMETER))
CASES["command set truncated"] = (_during(a.p_data(a.pdv(3, 0x03, _cmd[:-3]))), _abort(INVALID_PARAMETER))
CASES["command element of another group"] = (_during(a.p_data(a.pdv(3, 0x03, b"\x08\x00\x18\x00\x02\x00\x00\x00ab"))),
                                             _abort(INVALID_PARAMETER))
CASES["command element claiming 4 GiB"] = (_during(a.p_data(a.pdv(3, 0x03, b"\x00\x00\x00\x09\xff\xff\xff\xffab"))),
                                           _abort(INVALID_PARAMETER))
CASES["command set of garbage"] = (_during(a.p_data(a.pdv(3, 0x03, bytes(range(7))))),
                                   _abort(INVALID_PARAMETER))

# --- DIMSE messages that parse: a failure status each, the association goes on -------------------------
CASES["unknown DIMSE command"] = (_during(a.p_data(a.pdv(3, 0x03, a.command(0x0ABC, Verification, "",
                                                                                      data_set=False)))), FAILED)
CASES["C-STORE without a data set"] = (_during(a.p_data(a.pdv(1, 0x03, a.command(0x0001, data_set=False)))), FAILED)
CASES["C-FIND on a storage context"] = (_during(a.p_data(a.pdv(1, 0x03, a.command(0x0020, data_set=False)))), FAILED)
CASES["a well-formed data set (the control)"] = (_during(_store(_ds())), ("statuses", "success"))
CASES["data set element claiming 4 GiB"] = (_during(_store(_ds(_explicit(0x00100010, b"OB", b"ab", 0xFFFFFFF0)))),
                                            FAILED)
CASES["data set element past its end"] = (_during(_store(_ds(_explicit(0x00100020, b"LO", b"ab", 200)))), FAILED)
CASES["data set of sequences nested 1,000 deep"] = (_during(_store(_ds(_nested(1000)))), FAILED)
CASES["data set of sequences nested 20,000 deep"] = (_during(_store(_ds(_nested(20000)))), FAILED)
CASES["data set with an invalid VR"] = (_during(_store(_ds(b"\x10\x00\x10\x00\x01\x02\x02\x00ab"))), FAILED)
CASES["data set cut inside a header"] = (_during(_store(_head() + b"\x10\x00\x10")), FAILED)
CASES["data set empty"] = (_during(a.store_rq(), a.p_data(a.pdv(1, 0x02, b""))), FAILED)
CASES["data set of random bytes"] = (_during(_store(bytes((i * 7919) % 251 for i in range(4000)))), FAILED)
CASES["data set without a study UID"] = (_during(_store(_explicit(0x00100010, b"PN", b"DOE^JOHN"))), FAILED)
CASES["data set of another SOP instance"] = (_during(_store(_ds(sop="1.2.3.9"), sop="1.2.3.4")), FAILED)
CASES["data set with a sequence never closed"] = (_during(_store(_ds(_nested(3)[:-16]))), FAILED)
CASES["data set with an item of 4 GiB"] = (
    _during(_store(_ds(struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
                       + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFF0)))), FAILED)
CASES["two C-STOREs of garbage, then an echo"] = (
    _during(_store(b"\xff" * 100), _store(b"\x00" * 64), a.echo_rq()), ("statuses", "failed, failed, success"))


def _start_receiver(tmp: Path, nats_url: str, **ingest) -> tuple[subprocess.Popen, int, Path]:
    tree = make_config(tmp, nats_url, ingest={"workers": 1, "max_pdu": MAX_PDU, "artim_timeout_s": ARTIM_S,
                                              "max_connections": MAX_CONNECTIONS, "max_associations": 8,
                                              "network_timeout_s": 600, **ingest})
    config = tmp / "dicomflow.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    log = tmp / "ingest.log"
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(config), "ingest", "--single"],
                            cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    port = tree["ingest"]["port"]
    wait_port("127.0.0.1", port, 60)
    return proc, port, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """One lean receiver process for the corpus, and a normal pynetdicom association held open through it."""
    tmp = tmp_path_factory.mktemp("adversarial")
    nats = start_nats(tmp)
    proc, port, log = _start_receiver(tmp, nats.url)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = 60
    ae.network_timeout = 600  # held idle through the corpus
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW", max_pdu=MAX_PDU)
    assert assoc.is_established
    peak_before = proc_status(proc.pid, "VmHWM")
    yield {"proc": proc, "port": port, "log": log, "assoc": assoc, "peak_before": peak_before, "tmp": tmp}
    if assoc.is_established:
        assoc.release()
    _stop(proc)
    nats.kill()


def _check(expected: tuple, pdus: list[tuple[int, bytes]], closed: bool) -> None:
    kinds = [k for k, _ in pdus]
    assert closed, f"the receiver did not close the connection; it sent {kinds}"
    what = expected[0]
    if what == "abort":
        assert kinds and kinds[-1] == 7, f"expected an A-ABORT, got PDU types {kinds}"
        body = pdus[-1][1]
        assert (body[2], body[3]) == expected[1:], f"A-ABORT source {body[2]} reason {body[3]}, expected {expected[1:]}"
        assert 3 not in kinds
    elif what == "reject":
        assert kinds == [3], f"expected an A-ASSOCIATE-RJ, got {kinds}"
        assert tuple(pdus[0][1][1:4]) == expected[1:], f"A-ASSOCIATE-RJ {tuple(pdus[0][1][1:4])}, expected {expected[1:]}"
    elif what == "closed":
        assert 2 not in kinds and 4 not in kinds, kinds
    elif what == "accepted":
        assert kinds == [2, 6], f"expected A-ASSOCIATE-AC then A-RELEASE-RP, got {kinds}"
    else:
        assert kinds[0] == 2 and kinds[-1] == 6, f"expected an association released, got {kinds}"
        statuses = a.dimse_statuses(pdus)
        assert statuses, "no DIMSE response"
        failures = [s for s in statuses if s not in (0x0000, 0x0001) and s >> 12 != 0xB]
        if what == "failed":
            assert failures == statuses, [hex(s) for s in statuses]
        else:
            assert [("success" if s == 0 else "failed") for s in statuses] == expected[1].split(", ")


def test_the_corpus_has_over_100_cases():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_bytes_get_a_rejection_an_abort_or_a_failure_status(receiver, name):
    payload, expected = CASES[name]
    if expected == ACCEPTED:
        payload += a.release_rq()
    pdus, closed = a.exchange(receiver["port"], payload, timeout=15)
    _check(expected, pdus, closed)
    assert receiver["proc"].poll() is None, "the receiver died"


def test_user_identity_asking_for_a_positive_response_gets_one(receiver):
    ident = b"\x01\x01" + struct.pack(">H", 4) + b"jane" + struct.pack(">H", 0)
    pdus, _ = a.exchange(receiver["port"], a.associate_rq(user=a.user_info(extra=a.item(0x58, ident)))
                         + a.release_rq())
    assert [k for k, _ in pdus] == [2, 6]
    assert b"\x59\x00\x00\x02\x00\x00" in pdus[0][1]  # user identity AC sub-item, empty server response
    # not asked for: none sent (PS3.7 D.3.3.7.2)
    pdus, _ = a.exchange(receiver["port"], a.associate_rq(user=a.user_info(extra=a.item(0x58, b"\x01\x00" + ident[2:])))
                         + a.release_rq())
    assert b"\x59\x00" not in pdus[0][1]


def test_an_association_opened_before_the_corpus_still_works_and_memory_stayed_bounded(receiver, tmp_path):
    """Runs after the corpus (file order): the association opened first answers, dcmtk works, peak memory."""
    assoc = receiver["assoc"]
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    _, files = write_study(tmp_path / "s", 2)
    assert [assoc.send_c_store(dcmread(f)).Status for f in files] == [0, 0]
    env = {**os.environ, "TCP_NODELAY": "1"}
    echo = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(receiver["port"])],
                          capture_output=True, text=True, timeout=60, env=env)
    assert echo.returncode == 0, echo.stderr
    _, more = write_study(tmp_path / "t", 3)
    store = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(receiver["port"]),
                            "+sd", str(tmp_path / "t")], capture_output=True, text=True, timeout=60, env=env)
    assert store.returncode == 0 and "Failed" not in store.stderr, store.stderr
    growth_kib = proc_status(receiver["proc"].pid, "VmHWM") - receiver["peak_before"]
    print(f"receiver peak RSS growth over the corpus: {growth_kib / 1024:.1f} MiB")
    # Reading a PDU whole as claimed (up to 64 MiB before) would show here; max_pdu is 16 KiB.
    assert growth_kib < 24 * 1024, growth_kib
    assert receiver["proc"].poll() is None


def test_artim_cuts_off_a_peer_trickling_its_associate_request(receiver):
    """Slow-loris: a byte every 0.3 s (each within any idle timeout) is cut off at the ARTIM deadline."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", receiver["port"]), timeout=10) as sock:
        closed_after = None
        for byte in RQ:
            try:
                sock.sendall(bytes([byte]))
                time.sleep(0.3)
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        closed_after = time.monotonic() - start
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
            except OSError:
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None and ARTIM_S - 0.5 < closed_after < ARTIM_S + 2, closed_after


def test_a_flood_of_idle_connections_costs_no_threads_and_ends_with_artim(receiver):
    port, pid = receiver["port"], receiver["proc"].pid
    threads_before = proc_status(pid, "Threads")
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 16):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # the extra ones are answered A-ASSOCIATE-RJ transient / local limit exceeded (PS3.8 Table 9-21)
        time.sleep(0.5)
        refused = []
        for s in socks:
            s.setblocking(False)
            try:
                refused.append(s.recv(64))
            except BlockingIOError:
                pass
        assert sum(r == bytes([3, 0, 0, 0, 0, 4, 0, 2, 3, 2]) for r in refused) >= 16, refused
        threads = proc_status(pid, "Threads")
        assert threads - threads_before <= MAX_CONNECTIONS, (threads_before, threads)
        # ARTIM: every idle connection is closed in time, and a real association gets in
        wait_for(lambda: proc_status(pid, "Threads") <= threads_before, timeout=ARTIM_S + 5,
                 what="the idle connections' threads to end")
    finally:
        for s in socks:
            s.close()
    echo = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr


def _start_engine(engine: str, port: int, max_associations: int, max_connections: int | None = None):
    if engine == "lean":
        from services.ingest.scp import start_scp
    else:
        from services.ingest.scp_pynetdicom import start_scp
    return start_scp(None, "127.0.0.1", port, "DICOMFLOW", MAX_PDU, max_associations, 30, [], artim_timeout=ARTIM_S,
                     max_connections=max_connections)


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_connections_over_the_bound_are_refused_before_anything_is_read(engine):
    """ingest.max_connections on both engines: 12 idle connections against a bound of 8, the 4 extra are answered
    A-ASSOCIATE-RJ transient / local limit exceeded (PS3.8 Table 9-21) and closed; once they go, a sender gets in."""
    from dicomflow.natsserver import free_port

    port = free_port()
    server = _start_engine(engine, port, 8, max_connections=8)
    socks = []
    try:
        for _ in range(12):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            time.sleep(0.05)  # in order: the first 8 are held, the rest refused
        time.sleep(0.5)  # well within the ARTIM time (2 s) that ends the held ones
        answers = []
        for s in socks:
            s.setblocking(False)
            try:
                answers.append(s.recv(64))
            except BlockingIOError:
                answers.append(None)  # held, waiting for its A-ASSOCIATE-RQ
        assert answers[:8] == [None] * 8, answers
        assert answers[8:] == [bytes([3, 0, 0, 0, 0, 4, 0, 2, 3, 2])] * 4, answers
    finally:
        for s in socks:
            s.close()
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(port)],
                                        capture_output=True, timeout=60).returncode == 0, 20,
                 what="an association once the idle connections closed")
    finally:
        server.stop(5)


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_connections_closed_before_associating_free_their_slots_at_once(engine):
    """70 TCP connections opened and closed without an A-ASSOCIATE-RQ: a real sender right after gets in (the
    pynetdicom engine used to hold each slot for its 30 s ACSE timeout: "local limit exceeded" meanwhile)."""
    from dicomflow.natsserver import free_port

    port = free_port()
    server = _start_engine(engine, port, 32)
    try:
        for _ in range(70):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        start = time.monotonic()
        echo = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert time.monotonic() - start < ARTIM_S, "the association waited for slots"
    finally:
        server.stop(5)


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_an_idle_connection_is_closed_at_the_artim_time(engine):
    from dicomflow.natsserver import free_port

    port = free_port()
    server = _start_engine(engine, port, 4)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=ARTIM_S + 10) as sock:
            start = time.monotonic()
            try:
                data = sock.recv(64)
            except ConnectionResetError:
                data = b""
            elapsed = time.monotonic() - start
        assert data == b"" and ARTIM_S - 0.5 < elapsed < ARTIM_S + 3, (data, elapsed)
    finally:
        server.stop(5)
