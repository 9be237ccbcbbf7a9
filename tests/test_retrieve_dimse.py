"""C-GET and C-MOVE on the one AE, both engines, with dcmtk's getscu and movescu: byte-identical instances back,
counts and final statuses, tenants, an unknown or unreachable destination; the pure parts without I/O."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from services.ingest import pdu
from shared.catalogue.find import FindError
from shared.catalogue.retrieve import (
    CANCEL,
    PATIENT_ROOT_GET,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    SUCCESS,
    UNABLE_TO_PERFORM,
    WARNING,
    final_status,
    parse_retrieve_identifier,
)
from tests.helpers import dataset_bytes, encode, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"


def ident(level: str, **tags) -> dict:
    model = {"00080052": {"vr": "CS", "Value": [level]}}
    for tag, value in tags.items():
        model[tag] = {"vr": "UI" if tag != "00100020" else "LO", "Value": value if isinstance(value, list) else [value]}
    return model


def test_identifier_names_what_to_retrieve_by_unique_keys():
    req = parse_retrieve_identifier(ident("STUDY", **{"0020000D": ["1.2.3", "1.2.4"]}), STUDY_ROOT_GET)
    assert req.study_uids == ("1.2.3", "1.2.4") and req.series_uids == () and req.patient_id is None
    req = parse_retrieve_identifier(ident("IMAGE", **{"0020000D": "1.2", "0020000E": "1.3", "00080018": ["1.4", "1.5"]}),
                                    STUDY_ROOT_MOVE)
    assert (req.study_uids, req.series_uids, req.sop_uids) == (("1.2",), ("1.3",), ("1.4", "1.5"))
    req = parse_retrieve_identifier(ident("PATIENT", **{"00100020": "PAT1"}), PATIENT_ROOT_GET)
    assert req.patient_id == "PAT1" and req.study_uids == ()
    for model, sop_class, status, why in [
        (ident("PATIENT", **{"00100020": "P"}), STUDY_ROOT_GET, 0xA900, "Study Root"),
        (ident("SERIES", **{"0020000D": "1.2"}), STUDY_ROOT_GET, 0xA900, "0020,000E"),
        (ident("STUDY"), STUDY_ROOT_GET, 0xA900, "0020,000D"),
        (ident("FRAME", **{"0020000D": "1.2"}), STUDY_ROOT_GET, 0xA900, "QueryRetrieveLevel"),
        (ident("SERIES", **{"0020000D": ["1.2", "1.3"], "0020000E": "1.4"}), STUDY_ROOT_GET, 0xA900, "one value"),
        (ident("STUDY", **{"0020000D": "1.2/../x"}), STUDY_ROOT_GET, 0xC000, "no UID may hold"),
    ]:
        with pytest.raises(FindError, match=why) as err:
            parse_retrieve_identifier(model, sop_class)
        assert err.value.status == status


def test_final_status_counts_sub_operations():
    assert final_status(3, 3, 0, 0) == SUCCESS
    assert final_status(0, 0, 0, 0) == SUCCESS
    assert final_status(3, 2, 1, 0) == WARNING
    assert final_status(3, 2, 0, 1) == WARNING
    assert final_status(3, 0, 3, 0) == UNABLE_TO_PERFORM
    assert final_status(3, 1, 0, 0, cancelled=True) == CANCEL


def test_role_selection_is_read_and_answered_for_accepted_storage_contexts():
    rq = pdu.associate_rq("GETSCU", "DICOMFLOW", [(1, STUDY_ROOT_GET, ["1.2.840.10008.1.2"]),
                                                  (3, CT, ["1.2.840.10008.1.2.1"])], 16384,
                          roles={CT: (0, 1), "1.2.840.10008.5.1.4.1.1.4": (0, 1)})
    req = pdu.parse_associate_rq(rq[6:])
    assert req.roles == {CT: (0, 1), "1.2.840.10008.5.1.4.1.1.4": (0, 1)}
    req.roles.pop("1.2.840.10008.5.1.4.1.1.4")
    assert req.roles == {CT: (0, 1)} and req.max_pdu == 16384
    neg = pdu.negotiate(req, "DICOMFLOW", [], {STUDY_ROOT_GET: frozenset({"1.2.840.10008.1.2"}),
                                               CT: frozenset({"1.2.840.10008.1.2.1"})})
    ac = pdu.associate_ac(req, neg, 65536)
    assert CT.encode() + b"\x00\x01" in ac  # the role echoed
    max_pdu, results = pdu.parse_associate_ac(ac[6:])
    assert max_pdu == 65536 and results == {1: (0, "1.2.840.10008.1.2"), 3: (0, "1.2.840.10008.1.2.1")}


def test_counts_in_responses():
    cmd = pdu.parse_command(pdu.response(pdu.C_GET_RSP, 7, 0xFF00, STUDY_ROOT_GET, counts=(2, 1, 0, 0))[12:])
    assert [pdu.command_us(cmd, e) for e in (0x1020, 0x1021, 0x1022, 0x1023)] == [2, 1, 0, 0]
    final = pdu.parse_command(pdu.response(pdu.C_GET_RSP, 7, 0, STUDY_ROOT_GET, counts=(None, 3, 0, 0))[12:])
    assert 0x1020 not in final and pdu.command_us(final, 0x1021) == 3
    store = pdu.parse_command(pdu.store_rq(5, CT, "1.2.3", "MOVER", 9)[12:])
    assert pdu.command_uid(store, 0x1030) == "MOVER" and pdu.command_us(store, 0x1031) == 9
    assert pdu.command_us(store, 0x0100) == pdu.C_STORE_RQ


# --- against `dicomflow run`, with dcmtk -------------------------------------------------------------------------

@pytest.fixture(params=["lean", "pynetdicom"])
def stack(request, stack_factory, tmp_path):
    move_port = free_port()
    stack = stack_factory(
        ingest={"engine": request.param, "move_destinations": {
            "MOVESCU": {"host": "127.0.0.1", "port": move_port},
            "DEAD": {"host": "127.0.0.1", "port": free_port()},
            "BONLY": {"host": "127.0.0.1", "port": move_port, "tenants": ["b"]}}},
        access={"default_tenant": None, "tenants": {"a": {"aes": ["CT_A"]}, "b": {"aes": ["CT_B"]}}})
    stack.move_port, stack.engine = move_port, request.param
    return stack


def getscu(stack, calling: str, keys: list[str], out: Path, root: str = "-S") -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["getscu", "-v", root, "+B", "-aet", calling, "-aec", stack.ae_title, "-od", str(out),
                           *[a for k in keys for a in ("-k", k)], "127.0.0.1", str(stack.port)],
                          capture_output=True, text=True, timeout=120, env={"TCP_NODELAY": "1", "PATH": "/usr/bin"})


def movescu(stack, calling: str, dest: str, keys: list[str], out: Path) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["movescu", "-v", "-S", "+B", "-aet", calling, "-aec", stack.ae_title, "-aem", dest,
                           "+P", str(stack.move_port), *[a for k in keys for a in ("-k", k)],
                           "127.0.0.1", str(stack.port)], cwd=out,  # movescu writes where it runs, whatever -od says
                          capture_output=True, text=True, timeout=120, env={"TCP_NODELAY": "1", "PATH": "/usr/bin"})


def received(folder: Path, engine: str = "lean") -> dict[str, bytes]:
    """SOP Instance UID -> data set bytes of each file received; with the pynetdicom engine, which hands pynetdicom
    Datasets and lets it pick among the uncompressed syntaxes the SCU accepted, the data set in Explicit VR LE."""
    out = {}
    for f in folder.iterdir():
        ds = dcmread(f)
        out[ds.SOPInstanceUID] = dataset_bytes(f) if engine == "lean" else encode(ds)
    return out


def final_counts(output: str) -> tuple[int, int, int]:
    """(completed, failed, warning) of the last response dcmtk printed."""
    done = re.findall(r"Completed Suboperations\s*:\s*(\d+)", output)
    failed = re.findall(r"Failed Suboperations\s*:\s*(\d+)", output)
    warned = re.findall(r"Warning Suboperations\s*:\s*(\d+)", output)
    return int(done[-1]) if done else 0, int(failed[-1]) if failed else 0, int(warned[-1]) if warned else 0


def test_get_and_move_send_the_study_back_byte_identical(stack, tmp_path):
    study_uid, files = write_study(tmp_path / "sent", 5, series=2)
    assert stack.storescu(tmp_path / "sent", calling_ae="CT_A").returncode == 0
    wait_for(lambda: stack.instances_of(study_uid) == 5, 60, what="5 instances catalogued")
    sent = {dcmread(f).SOPInstanceUID: dataset_bytes(f) if stack.engine == "lean" else encode(dcmread(f))
            for f in files}

    got = getscu(stack, "CT_A", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"], tmp_path / "get")
    assert got.returncode == 0, got.stderr
    assert received(tmp_path / "get", stack.engine) == sent
    assert final_counts(got.stderr + got.stdout) == (5, 0, 0)

    # one series, Patient Root, by PatientID at the PATIENT level too
    series_uid = dcmread(files[0]).SeriesInstanceUID
    got = getscu(stack, "CT_A", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}",
                                 f"SeriesInstanceUID={series_uid}"], tmp_path / "series")
    assert got.returncode == 0 and set(received(tmp_path / "series")) == {
        uid for uid, f in zip(sent, files, strict=True) if dcmread(f).SeriesInstanceUID == series_uid}
    got = getscu(stack, "CT_A", ["QueryRetrieveLevel=PATIENT", f"PatientID={dcmread(files[0]).PatientID}"],
                 tmp_path / "patient", root="-P")
    assert got.returncode == 0 and received(tmp_path / "patient", stack.engine) == sent

    moved = movescu(stack, "CT_A", "MOVESCU", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"],
                    tmp_path / "move")
    assert moved.returncode == 0, moved.stderr
    assert received(tmp_path / "move", stack.engine) == sent
    out = moved.stdout + moved.stderr
    assert "Final Move Response (Success)" in out and out.count("Received Store Request") == 5, out

    # another tenant's AE names the same study: nothing of it
    other = getscu(stack, "CT_B", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"], tmp_path / "b")
    assert other.returncode == 0 and not list((tmp_path / "b").iterdir())
    # a destination that is not the caller's, an unknown one: 0xA801; one that does not answer: every sub-op failed
    for dest in ("BONLY", "NOWHERE"):
        res = movescu(stack, "CT_A", dest, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"],
                      tmp_path / dest)
        assert "Refused: MoveDestinationUnknown" in res.stdout + res.stderr, res.stderr
    res = movescu(stack, "CT_A", "DEAD", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"],
                  tmp_path / "dead")
    assert re.search(r"Final Move Response \((Refused|Failed|Warning)", res.stdout + res.stderr), res.stderr
    # a malformed identifier: a failure status with the reason, and the association still serves
    bad = getscu(stack, "CT_A", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}"], tmp_path / "bad")
    assert re.search(r"DoesNotMatchSOPClass", bad.stdout + bad.stderr, re.I), bad.stdout + bad.stderr


def test_c_cancel_ends_a_c_get_between_sub_operations(stack, tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    study_uid, _ = write_study(tmp_path / "sent", 12)
    assert stack.storescu(tmp_path / "sent", calling_ae="CT_A").returncode == 0
    wait_for(lambda: stack.instances_of(study_uid) == 12, 60, what="12 instances catalogued")
    ae = AE(ae_title="CT_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    stored: list[str] = []

    def on_store(event):
        stored.append(event.request.AffectedSOPInstanceUID)
        if len(stored) == 2:  # before this C-STORE is answered: the SCP reads the cancel while it waits
            [cx] = [c for c in event.assoc.accepted_contexts
                    if c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet]
            event.assoc.send_c_cancel(1, cx.context_id)
        return 0x0000

    assoc = ae.associate("127.0.0.1", stack.port, ae_title=stack.ae_title,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
    statuses = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet,
                                                                msg_id=1) if status]
    assoc.release()
    assert statuses[-1] == CANCEL, [hex(s) for s in statuses]
    assert 2 <= len(stored) < 12
