"""What real modalities send, through ``dicomflow run`` (both engines) next to dcmtk's storescp as the reference.

Each class of :mod:`tests.modality_examples` (real files) is sent as a modality sends it: by dcmtk's
storescu (``-R``: only the classes of the files, which is how it proposes a retired class) where storescu
can send it, otherwise by pynetdicom sending the file's data set bytes as they are (a private SOP class
storescu refuses to propose; a data set opened by its file meta, a UN of undefined length, elements out
of order, which storescu would re-encode). The same sends go to ``storescp -B`` (bit-preserving): what
storescp stores, dicomflow must store, read back through the catalogue with ``dicomflow export`` and
byte-identical. UIDs: injection attempts and harmless breaks under both ``ingest.strict_uids`` settings.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from dicomflow.natsserver import free_port, wait_port
from dicomflow.synthetic import ct_instance
from shared.dicom.statuses import CANNOT_UNDERSTAND, INVALID_UID
from tests import modality_examples as ex
from tests.helpers import dataset_bytes, encode, scu_send, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, on the non-conformant UIDs sent

BY_STORESCU = ("retired_us", "retired_nm", "hex_digest", "leading_zeros")
AS_THEY_ARE = ("siemens_csa", "file_meta_in_data_set", "un_undefined_length", "out_of_order")


@contextlib.contextmanager
def _storescp(tmp: Path):
    """dcmtk's storescp, bit-preserving, accepting unknown SOP classes (as ``private_sop_classes`` does here)."""
    out = tmp / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-pm", "-B", "-od", str(out), str(port)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "storescp.log", "wb"))
    try:
        wait_port("127.0.0.1", port, 10)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def _storescu(port: int, ae_title: str, folder: Path) -> None:
    res = subprocess.run(["storescu", "-v", "-R", "-aet", "MODALITY", "-aec", ae_title, "127.0.0.1", str(port),
                          "+sd", str(folder)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Failed" not in res.stderr, res.stdout + res.stderr


def _send_as_they_are(port: int, ae_title: str, files: list[Path], comments: list[str] | None = None) -> list[int]:
    """Each file's data set bytes, unchanged, with its meta's SOP class and transfer syntax, on one association."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for f in files:
        meta = dcmread(f, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # the bytes as they are
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        statuses = []
        for f in files:
            rsp = assoc.send_c_store(f)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
            if comments is not None:
                comments.append(str(rsp.get("ErrorComment", "")))
        return statuses
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = chunked


class Stored:
    """A data set read back from a Part-10 file, with the transfer syntax its meta names."""

    def __init__(self, path: Path):
        self.syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        self.data = dataset_bytes(path)

    def content(self) -> dict:
        """As pydicom reads it; storescp leaves out the file meta and the trailing padding (FFFC,FFFC), which
        holds nothing (PS3.10 7.2)."""
        from io import BytesIO

        from pydicom.filereader import read_dataset

        ds = read_dataset(BytesIO(self.data), self.syntax.is_implicit_VR, self.syntax.is_little_endian)
        return {e.tag: (e.VR, e.value) for e in ds.iterall() if e.tag.group not in (0x0002, 0xFFFC)}

    def same_as(self, other: Stored) -> bool:
        """Byte-identical where both came in one transfer syntax; else the same content (a sender converts
        to the transfer syntax each receiver accepted: storescu sends rtdose.dcm implicit to pynetdicom,
        explicit to storescp and the lean engine)."""
        return self.data == other.data if self.syntax == other.syntax else self.content() == other.content()


def _by_sop(files) -> dict[str, Stored]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): Stored(f) for f in files}


def _exported(stack, tmp: Path, studies: set[str]) -> dict[str, Stored]:
    out: dict[str, Stored] = {}
    for i, study in enumerate(sorted(studies)):
        folder = tmp / f"export{i}"
        stack.cli("export", "--study", study, "--out", str(folder))
        out.update(_by_sop(sorted(folder.glob("*.dcm"))))
    return out


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_what_storescp_stores_is_stored_byte_identical(tmp_path, nats_server, stack_factory, engine):
    stack = stack_factory(nats_server.url, ingest={"engine": engine,
                                                   "private_sop_classes": [ex.SIEMENS_CSA_NON_IMAGE]})
    study = generate_uid()
    by_storescu, as_they_are = tmp_path / "storescu", tmp_path / "raw"
    by_storescu.mkdir()
    as_they_are.mkdir()
    sent_by_storescu = [ex.EXAMPLES[name](by_storescu, study) for name in BY_STORESCU]
    sent_raw = [ex.EXAMPLES[name](as_they_are, study) for name in AS_THEY_ARE]
    studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in sent_by_storescu + sent_raw}
    assert len(studies) == 2  # the shared one and the anonymiser's digest

    with _storescp(tmp_path) as (ref_port, ref_out):
        for port, ae_title in ((ref_port, "STORESCP"), (stack.port, stack.ae_title)):
            _storescu(port, ae_title, by_storescu)
            assert _send_as_they_are(port, ae_title, sent_raw) == [0] * len(sent_raw), ae_title
    reference = _by_sop(sorted(ref_out.iterdir()))
    assert len(reference) == len(sent_by_storescu) + len(sent_raw)

    wait_for(lambda: sum(stack.instances_of(s) for s in studies) == len(reference), 60, what="every instance stored")
    stored = _exported(stack, tmp_path, studies)
    assert stored.keys() == reference.keys()
    # sent by storescu: what storescp's bit-preserving copy holds
    for sop in _by_sop(sent_by_storescu):
        assert stored[sop].same_as(reference[sop]), sop
    # sent as they are: what was on the wire (less a file meta that opened it) is what is stored, and it reads
    # as what storescp stored (which re-sorts elements and re-encodes a UN sequence)
    for f in sent_raw:
        sop = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert stored[sop].data == ex.stored_data_set(f), f.name
        assert stored[sop].content() == reference[sop].content(), f.name

    # Like storescp: a data set it cannot read is refused, but with a status saying why (storescp aborts the
    # association), and the association goes on.
    refused = ex.implicit_as_jpeg(tmp_path)
    after = ex.retired_us(tmp_path, study)
    comments: list[str] = []
    assert _send_as_they_are(stack.port, stack.ae_title, [refused, after], comments) == [CANNOT_UNDERSTAND, 0]
    assert "Implicit VR data set on an Explicit VR context" in comments[0]

    # A private class the configuration does not list: the association is rejected, no context accepted.
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.113619.4.26")  # GE Private 3D Model Storage
    assoc = ae.associate("127.0.0.1", stack.port, ae_title=stack.ae_title)
    assert not assoc.is_established
    assoc.release()


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_any_takes_every_private_storage_class(tmp_path, nats_server, stack_factory, engine):
    stack = stack_factory(nats_server.url, ingest={"engine": engine, "private_sop_classes": "any"})
    study = generate_uid()
    csa = ex.siemens_csa(tmp_path, study)
    (tmp_path / "ge").mkdir()
    ge = ex.siemens_csa(tmp_path / "ge", study)
    ds = dcmread(ge)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.113619.4.26"  # a GE private class
    ds.save_as(ge, enforce_file_format=True)
    assert _send_as_they_are(stack.port, stack.ae_title, [csa, ge]) == [0, 0]
    wait_for(lambda: stack.instances_of(study) == 2, 60, what="both private instances stored")
    stored = _exported(stack, tmp_path, {study})
    assert {sop: s.data for sop, s in stored.items()} == {str(dcmread(f).SOPInstanceUID): dataset_bytes(f)
                                                          for f in (csa, ge)}


# Each a UID of the SOP instance sent; the hostile ones also as the Study Instance UID.
HOSTILE = ["1.2.3.*", "1.2.3.>", "1.2/../../etc/passwd", "1.2.3 4", "1.2.3\x01"]  # "\\": two UIDs (unit-tested)
HARMLESS = ["2.25.0c2c7bdafb39176a34709965be7922d4de270e03",  # letters (65+ characters: the storescu test above)
            "1.2.3.4", "1.2.3_4", "1.2.3-2E4",  # one subject token under '.' -> '_' alone; one that looks escaped
            "1.2.123.456.78.9.0123.4567",  # leading zeros
            "1.2.3.4.5:a?b#c%41\"d"]  # URL and JSON specials


def _as_sent(ds, stored: Path) -> bytes:
    """``ds`` encoded as pynetdicom sent it: in the transfer syntax the receiver accepted (the stored file's)."""
    return encode(ds, implicit=dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_implicit_VR)


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
@pytest.mark.parametrize("strict", [False, True])
def test_uids_injection_attempts_and_harmless_breaks(tmp_path, nats_server, stack_factory, strict, engine):
    stack = stack_factory(nats_server.url, ingest={"strict_uids": strict, "engine": engine},
                          web={"port": free_port()})
    study, series = generate_uid(), generate_uid()
    sent = []
    for uid in HOSTILE + HARMLESS:
        ds = ct_instance(study, series, len(sent) + 1, rows=8, cols=8)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        sent.append(ds)
    for uid in HOSTILE[:3]:
        ds = ct_instance(uid, series, 99, rows=8, cols=8)
        sent.append(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        statuses = scu_send(stack.port, sent, calling="MODALITY")
    expected_hostile = [INVALID_UID] * len(HOSTILE)
    expected_harmless = [INVALID_UID if strict and uid != "1.2.3.4" else 0 for uid in HARMLESS]
    assert statuses == expected_hostile + expected_harmless + [INVALID_UID] * 3
    stored = [uid for uid, status in zip(HARMLESS, expected_harmless, strict=True) if status == 0]
    wait_for(lambda: stack.instances_of(study) == len(stored), 60, what="the accepted instances stored")
    assert [s["study_uid"] for s in stack.studies()] == [study]  # no hostile study anywhere

    # read back: one file per instance, named safely, byte-identical; nothing written outside the folder
    out = tmp_path / "export"
    stack.cli("export", "--study", study, "--out", str(out))
    files = sorted(out.iterdir())
    assert sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files) == sorted(stored)
    by_uid = {ds.SOPInstanceUID: ds for ds in sent}
    for f in files:
        ds = by_uid[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)]
        assert dataset_bytes(f) == _as_sent(ds, f), f.name
    assert not (tmp_path / "etc").exists()
    if not strict:
        assert {"1.2.3.4.dcm", "1.2.3-5F4.dcm", "1.2.3-2D2E4.dcm"} <= {f.name for f in files}  # 1.2.3_4, 1.2.3-2E4
        # C-GET with dcmtk's getscu brings each back as sent
        got = tmp_path / "got"
        got.mkdir()
        res = subprocess.run(["getscu", "-S", "-aet", "MODALITY", "-aec", stack.ae_title, "-od", str(got),
                              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1",
                              str(stack.port)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        got_files = sorted(got.iterdir())
        assert len(got_files) == len(stored)
        for f in got_files:
            assert dataset_bytes(f) == _as_sent(by_uid[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)], f)

    if not strict:
        # DICOMweb: the RetrieveURL QIDO-RS gives for each instance leads to that instance (the UID percent-encoded)
        base = f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web"
        wait_port("127.0.0.1", stack.tree["web"]["port"], 20)
        with urllib.request.urlopen(f"{base}/studies/{study}/instances") as rsp:
            found = json.load(rsp)
        urls = {item["00080018"]["Value"][0]: item["00081190"]["Value"][0] for item in found}
        assert sorted(urls) == sorted(stored)
        for uid, url in urls.items():
            with urllib.request.urlopen(url + "/metadata") as rsp:
                assert json.load(rsp)[0]["00080018"]["Value"] == [uid]
