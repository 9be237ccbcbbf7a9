"""The ingest's own DICOM upper layer: the pure codec against pynetdicom's encoder, and the SCP against real peers.

pynetdicom (as SCU) and dcmtk's echoscu are independent implementations of the protocol, so a
round trip through them checks our PDUs and command sets on the wire, not only against themselves.
"""

from __future__ import annotations

import os
import subprocess
import threading

import pytest
from pydicom import dcmread
from pynetdicom import AE, build_context, pdu_primitives
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from services.ingest import pdu
from services.ingest.intake import Intake
from services.ingest.loopthread import LoopThread
from services.ingest.scp import SUPPORTED, start_scp
from shared.bus.connection import connect, ensure_streams
from shared.bus.publish_blocking import LoopPublisher
from shared.config import load_config
from shared.storage.objectstore import Backends


def _rq_bytes(called: str, calling: str, contexts, max_pdu: int = 16384) -> bytes:
    prim = pdu_primitives.A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = calling, called
    prim.presentation_context_definition_list = contexts
    ml = pdu_primitives.MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = pdu_primitives.ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.3.4"
    prim.user_information = [ml, ic]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    return rq.encode()


def _contexts():
    cts = [build_context(CTImageStorage, ["1.2.840.10008.1.2.4.999", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
           build_context("1.2.3.4.5.6", ["1.2.840.10008.1.2"]), build_context(Verification)]
    for i, cx in enumerate(cts):
        cx.context_id = 2 * i + 1
    return cts


def test_associate_rq_parsed_and_contexts_negotiated():
    raw = _rq_bytes("DICOMFLOW", "MODALITY", _contexts(), max_pdu=32768)
    req = pdu.parse_associate_rq(raw[6:])
    assert (req.called_ae, req.calling_ae, req.max_pdu) == ("DICOMFLOW", "MODALITY", 32768)
    assert [c[0] for c in req.contexts] == [1, 3, 5]
    neg = pdu.negotiate(req, "DICOMFLOW", [], SUPPORTED)
    assert neg.reject is None
    # The requestor's order decides among the transfer syntaxes we know; unknown abstract syntax refused.
    assert neg.accepted() == {1: (CTImageStorage, "1.2.840.10008.1.2.1"), 5: (Verification, "1.2.840.10008.1.2")}
    assert [r[1] for r in neg.results] == [pdu.PC_ACCEPT, pdu.PC_ABSTRACT_NOT_SUPPORTED, pdu.PC_ACCEPT]
    ac = pdu.associate_ac(req, neg, 131072)
    assert ac[0] == pdu.ASSOCIATE_AC and int.from_bytes(ac[2:6], "big") == len(ac) - 6


@pytest.mark.parametrize("called,calling,allowed,busy,reject", [
    ("OTHER", "MODALITY", [], False, (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_CALLED_AE)),
    ("DICOMFLOW", "STRANGER", ["MODALITY"], False, (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_CALLING_AE)),
    ("DICOMFLOW", "MODALITY", ["MODALITY"], True, (pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_LOCAL_LIMIT)),
    ("DICOMFLOW", "MODALITY", ["MODALITY"], False, None),
])
def test_association_rejections(called, calling, allowed, busy, reject):
    req = pdu.parse_associate_rq(_rq_bytes(called, calling, _contexts())[6:])
    assert pdu.negotiate(req, "DICOMFLOW", allowed, SUPPORTED, busy=busy).reject == reject


def test_pdvs_and_command_round_trip():
    rsp = pdu.response(pdu.C_STORE_RSP, 7, 0xC001, CTImageStorage, "1.2.3.45", "bad UID")
    frames = pdu.p_data(3, rsp, max_pdu=40)  # forces several fragments
    assert len(frames) > 1
    joined = b""
    for i, frame in enumerate(frames):
        (cid, is_command, last, frag), = list(pdu.pdvs(memoryview(frame[6:])))
        assert (cid, is_command, last) == (3, True, i == len(frames) - 1)
        joined += bytes(frag)
    assert joined == rsp
    cmd = pdu.parse_command(joined)
    assert pdu.command_us(cmd, 0x0120) == 7 and pdu.command_uid(cmd, 0x1000) == "1.2.3.45"
    # pynetdicom decodes our response as a C-STORE-RSP with the same fields.
    p_data = pdu_primitives.P_DATA()
    p_data.presentation_data_value_list = [[3, b"\x03" + joined]]
    msg = C_STORE_RSP()
    assert msg.decode_msg(p_data)
    prim = msg.message_to_primitive()
    assert (prim.MessageIDBeingRespondedTo, prim.Status, prim.AffectedSOPInstanceUID) == (7, 0xC001, "1.2.3.45")
    assert prim.ErrorComment == "bad UID"


def test_malformed_pdus_are_protocol_errors():
    with pytest.raises(pdu.ProtocolError):
        list(pdu.pdvs(memoryview(b"\x00\x00\x00\x50\x01\x03abc")))
    with pytest.raises(pdu.ProtocolError):
        pdu.parse_command(b"\x08\x00\x18\x00\x02\x00\x00\x00ab")
    with pytest.raises(pdu.ProtocolError):
        pdu.parse_associate_rq(b"\x00\x01" + bytes(20))


@pytest.fixture
def scp(tmp_path, nats_server):
    """The real SCP on a free port, publishing to a real JetStream (one process: no `dicomflow run`)."""
    cfg = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "nats": {"url": nats_server.url}, "stream": {"partitions": 4},
        "ingest": {"allowed_calling_aes": ["MODALITY"]}})
    loop = LoopThread("test-nats")
    nc = loop.call(connect(cfg, "test-ingest"), timeout=10)
    loop.call(ensure_streams(nc, cfg), timeout=30)
    backends = Backends(cfg)
    publisher = LoopPublisher(nc, loop.loop, 5)
    loop.call(publisher.start(), timeout=10)
    intake = Intake(backends.get("local"), publisher, cfg.ingest.max_instance_bytes)
    port = free_port()
    server = start_scp(intake, "127.0.0.1", port, "DICOMFLOW", 4096, 2, 30, ["MODALITY"])
    yield port, tmp_path / "data" / "objects"
    server.stop(5)
    loop.call(nc.close(), timeout=5)
    loop.stop()


def test_scp_with_pynetdicom_fragmented_pdus_and_echo(scp, tmp_path):
    port, objects = scp
    _, files = write_study(tmp_path / "s", 3, rows=128, cols=128)  # 32 KiB each: many 4 KiB PDUs
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW", max_pdu=2048)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        statuses = [assoc.send_c_store(dcmread(f)).Status for f in files]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    assert len(list(objects.glob("??/*"))) == 3


def test_scp_rejects_unknown_calling_and_called_ae_titles(scp):
    """A-ASSOCIATE-RJ with the reason (PS3.8 9.3.4), seen by dcmtk.

    dcmtk rather than pynetdicom: pynetdicom's requestor reads an association as aborted, not
    rejected, when the A-ASSOCIATE-RJ and the close arrive before its ACSE thread wakes from the
    connect (a race of its threads, lost on a loaded machine against an acceptor this quick).
    """
    port, _ = scp
    for calling, called, reason in (("STRANGER", "DICOMFLOW", "Calling AE Title Not Recognized"),
                                    ("MODALITY", "SOMEONE", "Called AE Title Not Recognized")):
        res = subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                             capture_output=True, text=True, timeout=60)
        out = res.stdout + res.stderr
        assert res.returncode != 0
        assert "Association Rejected" in out, out
        assert reason.lower() in out.lower(), out


def test_scp_with_dcmtk_echoscu_and_parallel_storescu(scp, tmp_path):
    port, objects = scp
    env = {**os.environ, "TCP_NODELAY": "1"}
    echo = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert echo.returncode == 0, echo.stderr
    write_study(tmp_path / "a", 5)
    write_study(tmp_path / "b", 5)
    results = {}

    def send(name: str) -> None:
        results[name] = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(port),
                                        "+sd", str(tmp_path / name)], capture_output=True, text=True, timeout=120,
                                       env=env)

    threads = [threading.Thread(target=send, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 and "Store Failed" not in r.stderr for r in results.values()), results
    assert len(list(objects.glob("??/*"))) == 10
