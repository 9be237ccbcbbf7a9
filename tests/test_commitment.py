"""Storage commitment (Push Model, PS3.4 Annex J): the decision without I/O, the command sets of the lean engine,
and a pynetdicom modality against `dicomflow run` on both engines, with the report on the same association and
on a new one, failures (not stored, another tenant's, a wait that expires, a placement the policy gained), a
policy of two placements."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomflow.natsserver import free_port
from dicomflow.synthetic import new_uid, write_study
from services.ingest import pdu
from services.ingest.commitment import read_event_report_rsp
from services.ingest.suboperations import Closed
from shared.audit.message import audit_message
from shared.audit.records import commitment as commitment_record
from shared.audit.records import dicom_peer
from shared.catalogue.commitment import (
    CLASS_INSTANCE_CONFLICT,
    EVENT_FAILURES,
    EVENT_SUCCESS,
    FAILED_SOP_SEQUENCE,
    INVALID_ARGUMENT_VALUE,
    INVALID_OBJECT_INSTANCE,
    MAX_REFERENCES,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_OBJECT_INSTANCE,
    NO_SUCH_SOP_CLASS,
    PROCESSING_FAILURE,
    REFERENCED_SOP_SEQUENCE,
    RESOURCE_LIMITATION,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentError,
    CommitmentRequest,
    Reference,
    check_action,
    event_information,
    judge,
    parse_request,
)
from shared.dicom.json_model import json_model
from tests.chaos_core import RECEIVER, STORE
from tests.chaos_harness import stack_processes
from tests.helpers import Stack, encode, make_config, scu_send, wait_for
from tests.tls_certs import CA

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def action_information(transaction: str | None, refs: list[tuple[str, str]] | None) -> dict:
    model: dict = {}
    if transaction is not None:
        model["00081195"] = {"vr": "UI", "Value": [transaction]}
    if refs is not None:
        model["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [c]}, "00081155": {"vr": "UI", "Value": [i]}} for c, i in refs]}
    return model


# --- the decision, pure ------------------------------------------------------------------------------------------

def test_request_is_read_with_the_status_of_what_is_wrong():
    req = parse_request(action_information("1.2.3", [(CT, "1.9.1"), (MR, "1.9.2")]))
    assert req == CommitmentRequest("1.2.3", (Reference(CT, "1.9.1"), Reference(MR, "1.9.2")))
    for model, status, why in [
        (action_information(None, [(CT, "1.9")]), MISSING_ATTRIBUTE, "Transaction UID"),
        (action_information("1.2", None), MISSING_ATTRIBUTE, "Referenced SOP Sequence"),
        (action_information("1.2", []), MISSING_ATTRIBUTE_VALUE, "no item"),
        ({**action_information("1.2", [(CT, "1.9")]), "00081195": {"vr": "UI"}}, MISSING_ATTRIBUTE_VALUE, "empty"),
        (action_information("1.2", [(CT, "1.9/../x")]), INVALID_ARGUMENT_VALUE, "no UID may hold"),
        (action_information("1.2", [(CT, "1.9")] * (MAX_REFERENCES + 1)), RESOURCE_LIMITATION, "over"),
    ]:
        with pytest.raises(CommitmentError, match=why) as err:
            parse_request(model)
        assert err.value.status == status
    item = action_information("1.2", [(CT, "1.9")])
    del item["00081199"]["Value"][0]["00081150"]
    with pytest.raises(CommitmentError, match="Referenced SOP Class UID") as err:
        parse_request(item)
    assert err.value.status == MISSING_ATTRIBUTE


def test_action_must_be_storage_commitment_on_its_well_known_instance():
    check_action(STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, 1)
    for args, status in [((CT, STORAGE_COMMITMENT_INSTANCE, 1), NO_SUCH_SOP_CLASS),
                         ((STORAGE_COMMITMENT_PUSH, "1.2.3", 1), INVALID_OBJECT_INSTANCE),
                         ((STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, 2), NO_SUCH_ACTION)]:
        with pytest.raises(CommitmentError) as err:
            check_action(*args)
        assert err.value.status == status


def test_committed_only_in_every_placement_of_the_policy():
    policies = {"two": ["local", "ceph"], "one": ["local"]}
    req = CommitmentRequest("1.2", tuple(Reference(CT, f"1.9.{i}") for i in range(6)))
    rows = {"1.9.0": {"sop_class_uid": CT, "policy": "two", "placements": ["local", "ceph"]},
            "1.9.1": {"sop_class_uid": CT, "policy": "one", "placements": ["local"]},
            "1.9.2": {"sop_class_uid": MR, "policy": "one", "placements": ["local"]},
            "1.9.3": {"sop_class_uid": CT, "policy": "two", "placements": ["local"]},  # the policy gained ceph since
            "1.9.4": {"sop_class_uid": CT, "policy": "gone", "placements": ["local"]}}
    verdict = judge(req, rows, policies, expired=False)
    assert [r.sop_instance_uid for r in verdict.committed] == ["1.9.0", "1.9.1"]
    assert [(r.sop_instance_uid, reason) for r, reason, _ in verdict.failed] == [
        ("1.9.2", CLASS_INSTANCE_CONFLICT), ("1.9.3", PROCESSING_FAILURE), ("1.9.4", PROCESSING_FAILURE),
        ("1.9.5", NO_SUCH_OBJECT_INSTANCE)]
    assert "not yet in placement ceph" in verdict.failed[1][2]
    assert not verdict.final and verdict.event_type == EVENT_FAILURES  # failures wait for the deadline
    assert judge(req, rows, policies, expired=True).final
    everything = {uid: {"sop_class_uid": CT, "policy": "one", "placements": ["local"]}
                  for uid in (f"1.9.{i}" for i in range(6))}
    done = judge(req, everything, policies, expired=False)
    assert done.final and done.event_type == EVENT_SUCCESS and not done.failed  # final at once: all committed
    down = judge(req, None, policies, expired=True)  # the catalogue could not be asked
    assert {reason for _, reason, _ in down.failed} == {PROCESSING_FAILURE} and not down.committed


def test_event_information_names_every_referenced_instance_once():
    req = CommitmentRequest("1.2", (Reference(CT, "1.9.1"), Reference(CT, "1.9.2")))
    ok = judge(req, {u: {"sop_class_uid": CT, "policy": "p", "placements": ["a"]} for u in ("1.9.1", "1.9.2")},
               {"p": ["a"]}, expired=False)
    model = event_information("1.2", ok, "DICOMFLOW")
    assert FAILED_SOP_SEQUENCE not in model and model["00081195"]["Value"] == ["1.2"]
    assert [i["00081155"]["Value"][0] for i in model[REFERENCED_SOP_SEQUENCE]["Value"]] == ["1.9.1", "1.9.2"]
    assert model[REFERENCED_SOP_SEQUENCE]["Value"][0]["00080054"]["Value"] == ["DICOMFLOW"]
    partly = judge(req, {"1.9.1": {"sop_class_uid": CT, "policy": "p", "placements": ["a"]}}, {"p": ["a"]}, True)
    model = event_information("1.2", partly, "DICOMFLOW")
    failed = model[FAILED_SOP_SEQUENCE]["Value"]
    assert [(i["00081155"]["Value"][0], i["00081197"]["Value"][0]) for i in failed] == [("1.9.2", 0x0112)]
    ds = Dataset.from_json(model)  # what goes on the wire is a valid data set
    assert ds.FailedSOPSequence[0].FailureReason == 0x0112 and ds.TransactionUID == "1.2"


def test_action_information_in_either_little_endian_syntax_is_read():
    ds = Dataset.from_json(action_information("1.2.3", [(CT, "1.9.1"), (MR, "1.9.2")]))
    for implicit, syntax in ((True, ImplicitVRLittleEndian), (False, ExplicitVRLittleEndian)):
        req = parse_request(json_model(encode(ds, implicit=implicit), syntax))
        assert req.transaction_uid == "1.2.3" and [r.sop_instance_uid for r in req.references] == ["1.9.1", "1.9.2"]


def test_command_sets_follow_ps3_7():
    rq = pdu.parse_command(pdu.event_report_rq(3, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, 2)[12:])
    assert pdu.command_us(rq, 0x0100) == 0x0100 and pdu.command_us(rq, 0x0110) == 3
    assert pdu.command_uid(rq, 0x0002) == STORAGE_COMMITMENT_PUSH
    assert pdu.command_uid(rq, 0x1000) == STORAGE_COMMITMENT_INSTANCE and pdu.command_us(rq, 0x1002) == 2
    assert pdu.command_us(rq, 0x0800) != pdu.NO_DATA_SET  # the Event Information follows
    raw = pdu.event_report_rq(3, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, 2)
    assert int.from_bytes(raw[8:12], "little") == len(raw) - 12  # the group length
    rsp = pdu.parse_command(pdu.response(pdu.N_ACTION_RSP, 5, 0, STORAGE_COMMITMENT_PUSH,
                                         STORAGE_COMMITMENT_INSTANCE)[12:])
    assert pdu.command_us(rsp, 0x0100) == 0x8130 and pdu.command_us(rsp, 0x0120) == 5
    assert pdu.command_us(rsp, 0x0800) == pdu.NO_DATA_SET and pdu.command_uid(rsp, 0x1000) == STORAGE_COMMITMENT_INSTANCE
    ok = pdu.parse_command(pdu.response(pdu.N_ACTION_RSP, 5, 0, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE,
                                        type_id=(0x1008, 1))[12:])
    assert pdu.command_us(ok, 0x1008) == 1 and list(ok) == sorted(ok)  # elements in ascending order (PS3.5 7.1)


def test_event_report_answer_is_read_from_fragments():
    rsp = pdu.response(pdu.N_EVENT_REPORT_RSP, 1, 0x0110, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE,
                       type_id=(0x1002, 2))
    pdus = [*pdu.p_data(1, pdu.response(pdu.C_ECHO_RSP, 9, 0, ""), 0),  # something else first
            *pdu.p_data(1, rsp, 40)]  # the answer in fragments of 34 bytes, one PDU each
    assert len(pdus) > 3
    queue = [(pdu.P_DATA_TF, memoryview(p[6:])) for p in pdus]
    assert read_event_report_rsp(lambda: queue.pop(0), 1) == 0x0110
    with pytest.raises(Closed):
        read_event_report_rsp(lambda: (pdu.ABORT, memoryview(bytes(4))), 1)


def test_audit_record_of_a_commitment_renders():
    rows = [{"study_uid": "1.2.3", "sop_class_uid": CT}, {"study_uid": "1.2.3", "sop_class_uid": CT}]
    record = commitment_record(dicom_peer("CT_A", "", True, "source"), "DICOMFLOW", "1.5", rows, 1, delivery="new")
    assert record.kind == "commitment" and record.outcome == "minor-failure"
    assert record.detail == {"transaction_uid": "1.5", "committed": "2", "failed": "1", "delivery": "new"}
    xml = audit_message(record, "ingest@host").decode()
    assert "110103" in xml and "STORAGE-COMMITMENT" in xml and "1.2.3" in xml
    refused = commitment_record(dicom_peer("CT_A", "", True, "source"), "DICOMFLOW", "", [], 0, 0x0120, "no UID")
    assert refused.outcome == "serious-failure" and refused.outcome_description == "0x0120 no UID"


# --- a pynetdicom modality against `dicomflow run` ---------------------------------------------------------------

class Modality:
    """A storage commitment SCU (pynetdicom) that receives its reports on its own association and, listening on
    ``port``, on associations the archive opens to it (accepting the SCP role the archive proposes)."""

    def __init__(self, ae_title: str, port: int, tls: ssl.SSLContext | None = None):
        self.ae_title, self.port = ae_title, port
        self.reports: list[tuple[str, int, Dataset]] = []  # (how it came: same or new, event type, information)
        self.arrived = threading.Condition()
        self.comment = ""  # the Error Comment of the last N-ACTION-RSP
        self.listener = AE(ae_title=ae_title)
        self.listener.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.server = self.listener.start_server(("127.0.0.1", port), block=False, ssl_context=tls,
                                                 evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._handler("new"))])

    def _handler(self, how: str):
        def on_report(event: evt.Event) -> tuple[int, None]:
            with self.arrived:
                self.reports.append((how, int(event.event_type), event.event_information))
                self.arrived.notify_all()
            return 0x0000, None  # success, no Event Reply
        return on_report

    def request(self, archive_port: int, transaction: str, refs: list[tuple[str, str]], keep_open_s: float = 0.0,
                called: str = "DICOMFLOW", action_type: int = 1) -> int:
        """Send one N-ACTION; keep the association open up to ``keep_open_s`` for the report; the N-ACTION status."""
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", archive_port, ae_title=called,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._handler("same"))])
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_action(Dataset.from_json(action_information(transaction, refs)), action_type,
                                            StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
            self.comment = str(status.get("ErrorComment", ""))
            if keep_open_s:
                self.wait(transaction, keep_open_s)
        finally:
            assoc.release()
        return int(status.Status)

    def wait(self, transaction: str, timeout: float) -> tuple[str, int, Dataset] | None:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = next((r for r in self.reports if r[2].TransactionUID == transaction), None)
                if found is not None or time.monotonic() >= deadline:
                    return found
                self.arrived.wait(deadline - time.monotonic())

    def close(self) -> None:
        self.server.shutdown()


def committed_and_failed(info: Dataset) -> tuple[list[str], list[tuple[str, int]]]:
    ok = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
    failed = [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in info.get("FailedSOPSequence", [])]
    return ok, failed


def commitment_tree(tmp: Path, engine: str, modality_port: int, placements: list[str], metrics_port: int = 0) -> dict:
    backends = {name: {"kind": "fs", "path": f"objects-{name}"} for name in ("local", "second", "third")}
    return make_config(
        tmp, ingest={"engine": engine, "commitment_wait_s": 10,
                     "move_destinations": {"CT_A": {"host": "127.0.0.1", "port": modality_port}}},
        access={"default_tenant": None, "tenants": {"a": {"aes": ["CT_A"]}, "b": {"aes": ["CT_B"]}}},
        storage={"staging": "local", "backends": backends, "policies": {"two": {"placements": placements}},
                 "default_policy": "two"},
        telemetry={"metrics_port": metrics_port})


@pytest.fixture(params=["lean", "pynetdicom"])
def setup(request, tmp_path):
    modality_port = free_port()
    stack = Stack(tmp_path, commitment_tree(tmp_path, request.param, modality_port, ["local", "second"],
                                            metrics_port=free_port())).start()
    modality = Modality("CT_A", modality_port)
    yield stack, modality
    modality.close()
    stack.stop()


def send(stack: Stack, folder: Path, n: int, calling: str) -> list[tuple[str, str]]:
    """A new study of ``n`` instances sent by ``calling`` and waited for until the store has catalogued it."""
    study_uid, paths = write_study(folder, n)
    assert scu_send(stack.port, paths, calling=calling) == [0] * n
    wait_for(lambda: stack.instances_of(study_uid) == n, 60, what="the study stored")
    return [(CT, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in paths]


def test_report_on_the_same_association_commits_what_is_in_both_placements(setup, tmp_path):
    stack, modality = setup
    refs = send(stack, tmp_path / "a", 3, "CT_A")
    other = send(stack, tmp_path / "b", 1, "CT_B")  # tenant b's: no such object for tenant a
    for name in ("second", "local"):  # the policy wrote both placements
        assert len(list((stack.data_dir / f"objects-{name}").rglob("*"))) > 3

    ok_uid = new_uid()
    assert modality.request(stack.port, ok_uid, refs, keep_open_s=15) == 0
    how, event_type, info = modality.wait(ok_uid, 0)
    assert (how, event_type) == ("same", EVENT_SUCCESS)
    assert committed_and_failed(info) == ([uid for _, uid in refs], [])
    assert info.ReferencedSOPSequence[0].RetrieveAETitle == stack.ae_title

    missing, failing_uid = new_uid(), new_uid()
    started = time.monotonic()
    assert modality.request(stack.port, failing_uid, [refs[0], other[0], (CT, missing), (MR, refs[1][1])],
                            keep_open_s=30) == 0
    how, event_type, info = modality.wait(failing_uid, 0)
    waited = time.monotonic() - started
    assert (how, event_type) == ("same", EVENT_FAILURES)
    assert committed_and_failed(info) == ([refs[0][1]], [(other[0][1], NO_SUCH_OBJECT_INSTANCE),
                                                         (missing, NO_SUCH_OBJECT_INSTANCE),
                                                         (refs[1][1], CLASS_INSTANCE_CONFLICT)])
    assert waited >= 10  # failures are reported when the wait (ingest.commitment_wait_s) expires, not before

    records = wait_for(lambda: json.loads(stack.cli("audit", "--json", "--event", "commitment").stdout), 30,
                       what="commitment audit records")
    assert len(records) == 2 or wait_for(lambda: len(json.loads(
        stack.cli("audit", "--json", "--event", "commitment").stdout)) == 2, 30)


def test_report_on_a_new_association_after_the_modality_released(setup, tmp_path):
    stack, modality = setup
    _, paths = write_study(tmp_path / "later", 2)
    refs = [(CT, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in paths]
    transaction = new_uid()
    # asked before the instances are even sent: the archive waits for them, the modality does not wait at all
    assert modality.request(stack.port, transaction, refs) == 0
    assert scu_send(stack.port, paths, calling="CT_A") == [0, 0]
    how, event_type, info = modality.wait(transaction, 30)
    assert (how, event_type) == ("new", EVENT_SUCCESS)
    assert committed_and_failed(info) == ([uid for _, uid in refs], [])

    # a refused N-ACTION gets its status and no report
    assert modality.request(stack.port, "1.2/3", refs) == INVALID_ARGUMENT_VALUE
    assert modality.request(stack.port, new_uid(), refs, action_type=2) == NO_SUCH_ACTION
    many = [(CT, f"1.2.3.{i}") for i in range(MAX_REFERENCES + 1)]  # about 1.3 MB of Action Information
    assert modality.request(stack.port, new_uid(), many) == RESOURCE_LIMITATION
    assert modality.comment == f"{MAX_REFERENCES + 1} instances in one request, over {MAX_REFERENCES}"
    # a modality that is not in ingest.move_destinations and released: the report cannot be delivered (logged,
    # audited); its N-ACTION was still answered
    stranger = Modality("CT_B", free_port())
    try:
        lost = new_uid()
        assert stranger.request(stack.port, lost, refs) == 0
        wait_for(lambda: any(r["detail"].get("transaction_uid") == lost and r["detail"]["delivery"] == "undelivered"
                             for r in json.loads(stack.cli("audit", "--json", "--event", "commitment").stdout)),
                 30, what="the undelivered report audited")
        assert stranger.wait(lost, 0) is None
    finally:
        stranger.close()
    # the ingest's /metrics (telemetry.metrics_port) counts each outcome
    port = stack.tree["telemetry"]["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("dicomflow_ingest_commitments_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            counts[labels["result"], labels["delivery"]] = float(line.rsplit(" ", 1)[1])
    # CT_B's request named tenant a's instances: no such object for it, and nowhere to send the report
    assert counts == {("success", "new"): 1.0, ("failures", "undelivered"): 1.0, ("refused 0x0115", "none"): 1.0,
                      ("refused 0x0123", "none"): 1.0, ("refused 0x0213", "none"): 1.0}
    assert 'dicomflow_ingest_commitment_instances_total{result="committed"} 2.0' in text
    assert 'dicomflow_ingest_commitment_instances_total{result="0x0112"} 2.0' in text
    assert "dicomflow_ingest_commitment_seconds_count 2.0" in text


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_a_receiver_stopping_sends_the_reports_still_due(tmp_path, engine):
    """A rolling update's SIGTERM reaches the receiver while a report waits for its instances: the receiver stops
    accepting but sends the report (here once the paused store worker stores them) before it exits; it used to
    exit at once and the report was lost with its thread."""
    modality_port = free_port()
    stack = Stack(tmp_path, commitment_tree(tmp_path, engine, modality_port, ["local", "second"])).start()
    modality = Modality("CT_A", modality_port)
    stores = stack_processes(stack.proc.pid).get(STORE, [])
    assert stores, "no store worker found"
    try:
        for pid in stores:  # acknowledged instances wait in the stream, not yet committed
            os.kill(pid, signal.SIGSTOP)
        _, paths = write_study(tmp_path / "due", 2)
        refs = [(CT, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in paths]
        assert scu_send(stack.port, paths, calling="CT_A") == [0, 0]
        transaction = new_uid()
        assert modality.request(stack.port, transaction, refs) == 0  # released at once: the report needs a new one
        receiver, = stack_processes(stack.proc.pid)[RECEIVER]
        os.kill(receiver, signal.SIGTERM)
        time.sleep(2.0)  # past the C-STOREs' drain: the receiver now waits only for the report
        assert Path(f"/proc/{receiver}").exists(), "the receiver exited with a report still due"
        for pid in stores:
            os.kill(pid, signal.SIGCONT)
        report = modality.wait(transaction, 30)
        assert report is not None, "the stopping receiver dropped the report"
        how, event_type, info = report
        assert (how, event_type) == ("new", EVENT_SUCCESS)
        assert committed_and_failed(info) == ([uid for _, uid in refs], [])
        wait_for(lambda: not Path(f"/proc/{receiver}").exists() or "Z" in Path(f"/proc/{receiver}/stat").read_text()
                 .split(")")[-1][:3], 20, what="the receiver gone once its report was sent")
    finally:
        for pid in stores:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        modality.close()
        stack.stop()


def test_a_placement_the_policy_gained_is_not_committed_until_written(tmp_path):
    modality_port = free_port()
    tree = commitment_tree(tmp_path, "lean", modality_port, ["local", "second"])
    stack = Stack(tmp_path, tree).start()
    modality = Modality("CT_A", modality_port)
    try:
        refs = send(stack, tmp_path / "a", 2, "CT_A")
        stack.stop()
        # the policy now asks for a third placement: what was stored before is not in it
        stack = Stack(tmp_path, commitment_tree(tmp_path, "lean", modality_port, ["local", "second", "third"])).start()
        transaction = new_uid()
        assert modality.request(stack.port, transaction, refs, keep_open_s=30) == 0
        how, event_type, info = modality.wait(transaction, 0)
        assert event_type == EVENT_FAILURES and how == "same"
        assert committed_and_failed(info) == ([], [(uid, PROCESSING_FAILURE) for _, uid in refs])
        # a new instance of the same tenant is written to all three and committed
        fresh = send(stack, tmp_path / "c", 1, "CT_A")
        transaction = new_uid()
        assert modality.request(stack.port, transaction, fresh, keep_open_s=30) == 0
        assert modality.wait(transaction, 0)[1] == EVENT_SUCCESS
        # Action Information over the 4 MiB the lean engine holds is not kept: refused, and the association goes on
        huge = [(CT, f"1.2.826.0.1.3680043.10.1234.{10**20 + i}") for i in range(45_000)]
        assert modality.request(stack.port, new_uid(), huge) == RESOURCE_LIMITATION
        assert modality.comment == "Action Information over 4194304 bytes"
    finally:
        modality.close()
        stack.stop()


def test_report_on_a_new_association_over_tls(tmp_path):
    """A modality whose move_destinations entry says tls gets its report over DICOM TLS, its certificate verified
    against tls_ca; one presenting a certificate of another CA gets none (undelivered, audited)."""
    ca = CA(tmp_path / "pki")
    ports = {"CT_A": free_port(), "CT_B": free_port()}
    tree = commitment_tree(tmp_path, "lean", ports["CT_A"], ["local", "second"])
    tree["ingest"]["move_destinations"] = {ae: {"host": "127.0.0.1", "port": port, "tls": True,
                                                "tls_ca": str(ca.path)} for ae, port in ports.items()}
    stack = Stack(tmp_path, tree).start()
    modalities = {}
    for ae, pair in (("CT_A", ca.server()), ("CT_B", CA(tmp_path / "impostor", "impostor CA").server())):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        modalities[ae] = Modality(ae, ports[ae], context)
    try:
        refs = send(stack, tmp_path / "a", 1, "CT_A")
        transaction = new_uid()
        assert modalities["CT_A"].request(stack.port, transaction, refs) == 0  # released at once
        how, event_type, info = modalities["CT_A"].wait(transaction, 30)
        assert (how, event_type) == ("new", EVENT_SUCCESS) and committed_and_failed(info) == ([refs[0][1]], [])

        lost = new_uid()
        assert modalities["CT_B"].request(stack.port, lost, refs) == 0
        wait_for(lambda: any(r["detail"].get("transaction_uid") == lost and r["detail"]["delivery"] == "undelivered"
                             for r in json.loads(stack.cli("audit", "--json", "--event", "commitment").stdout)),
                 60, what="the report to an untrusted modality audited as undelivered")
        assert modalities["CT_B"].wait(lost, 0) is None
    finally:
        for modality in modalities.values():
            modality.close()
        stack.stop()
