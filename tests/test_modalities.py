"""What real modalities send, judged without I/O: UIDs that break PS3.5 9.1 harmlessly and the encodings that
keep them safe, hostile UIDs, the tag walker's tolerances, and which SOP classes are taken as storage
(checked against pynetdicom's own negotiation). The examples are real files (:mod:`tests.modality_examples`);
the same classes go through real receivers in ``test_modalities_e2e.py``."""

from __future__ import annotations

import random
import re
import string
import struct

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pynetdicom import build_context
from pynetdicom.presentation import negotiate_unrestricted

from services.ingest import pdu
from services.ingest.sop_classes import STANDARD_STORAGE, storage_contexts
from shared.contract import subjects
from shared.contract.uids import (
    InvalidUID,
    name_uid,
    token_uid,
    uid_name,
    uid_token,
    uid_url,
    validate_uid,
)
from shared.dicom import tags
from shared.dicom.statuses import CANNOT_UNDERSTAND, INVALID_UID, Rejection
from shared.dicom.tags import file_meta_length, read_tags
from shared.storage.rados_layout import study_index_name, study_of_index
from tests import modality_examples as ex
from tests.helpers import dataset_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, on the non-conformant UIDs we send

# Harmless breaks of PS3.5 9.1 that storescp and Orthanc store (accepted by default, refused by strict_uids).
HARMLESS = ["2.25." + "0c2c7bdafb39176a34709965be7922d4de270e03e135c532ddc788e6e0e3", "1.2.123.456.78.9.0123.4567",
            "1.2." + "9" * 70, "ABCDEF0123456789", "1.2.3_4", "1.2.3-2E4", "1.2.3:a?b#c%41\"d'e", "1.2..3", "1.2.3."]
# Injection attempts: a NATS wildcard or token separator, a path, a header or value separator, control bytes.
HOSTILE = ["1.2.*", "1.2.>", "*", ">", "1.2/../../etc/passwd", "..", "../x", "1.2 3", "1.2\t3", "1.2\r\nNats-Msg-Id: x",
           "1.2\\3.4", "1.2\x00.3", "1.2\x1b[31m", "1.2.é", "", "  ", "1." + "2" * 130]


@pytest.mark.parametrize("uid", HARMLESS)
def test_harmless_nonconformant_uids_are_accepted_unless_strict(uid):
    assert validate_uid(uid, "SOPInstanceUID") == uid
    with pytest.raises(InvalidUID) as exc:
        validate_uid(uid, "SOPInstanceUID", strict=True)
    assert "SOPInstanceUID" in str(exc.value)


@pytest.mark.parametrize("uid", HOSTILE)
@pytest.mark.parametrize("strict", [False, True])
def test_injection_attempts_are_refused_under_both_settings(uid, strict):
    with pytest.raises(InvalidUID):
        validate_uid(uid, "StudyInstanceUID", strict=strict)
    with pytest.raises(InvalidUID):
        subjects.instance_in(uid, "1.2.3")
    with pytest.raises(InvalidUID):
        uid_token(uid)


@pytest.mark.parametrize("uid", HARMLESS)
def test_every_accepted_uid_is_one_subject_token_one_name_and_one_url_segment(uid):
    subject = subjects.instance_in(uid, uid)
    assert subject.split(".") == ["dicom", "in", uid_token(uid), uid_token(uid)]  # no extra token, no wildcard
    assert re.fullmatch(r"[0-9A-Za-z_-]+", uid_token(uid))
    name = uid_name(uid)
    assert re.fullmatch(r"[0-9A-Za-z._-]+", name) and name not in (".", "..")
    assert study_of_index(study_index_name(uid)) == uid
    assert re.fullmatch(r"[0-9A-Za-z._~%-]+", uid_url(uid))
    assert (token_uid(uid_token(uid)), name_uid(name)) == (uid, uid)


def test_encodings_are_injective_where_dot_to_underscore_was_not():
    """``.`` -> ``_`` alone gave 1.2.3_4 and 1.2.3.4 one token; random UIDs over the accepted alphabet never
    share a token or a name, and each decodes back."""
    assert uid_token("1.2.3_4") != uid_token("1.2.3.4")
    assert uid_token("1.2.3.4") == "1_2_3_4"  # digits-and-dots UIDs keep the tokens and names they had
    assert uid_name("1.2.3.4") == "1.2.3.4"
    alphabet = string.digits * 4 + "." * 8 + string.ascii_letters + "_-:+=,;?#%\"'()[]{}!@$^&|~`<"
    rng = random.Random(18)
    uids = set()
    while len(uids) < 5000:
        uid = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        try:
            uids.add(validate_uid(uid))
        except InvalidUID:
            continue
    tokens, names = {uid_token(u) for u in uids}, {uid_name(u) for u in uids}
    assert len(tokens) == len(names) == len(uids)
    assert all(token_uid(uid_token(u)) == u and name_uid(uid_name(u)) == u for u in uids)
    for forged in ("1_2-", "1_2-2e", "1_2-ZZ", "1_2-2E4"[:-1] + "-"):  # not made by uid_token: refused
        with pytest.raises(InvalidUID):
            token_uid(forged)


@pytest.mark.parametrize("name", sorted(ex.EXAMPLES))
def test_real_world_examples_are_read(tmp_path, name):
    path = ex.EXAMPLES[name](tmp_path)
    ds = dcmread(path, stop_before_pixels=True)
    data = dataset_bytes(path)
    skip = file_meta_length(data)
    assert data[skip:] == ex.stored_data_set(path)
    assert bool(skip) == (name == "file_meta_in_data_set")
    found = read_tags(data[skip:], str(ds.file_meta.TransferSyntaxUID))
    assert (found.study_uid, found.series_uid, found.sop_uid, found.sop_class_uid) == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
    if name in ("hex_digest", "leading_zeros"):
        with pytest.raises(Rejection) as exc:
            read_tags(data, str(ds.file_meta.TransferSyntaxUID), strict_uids=True)
        assert exc.value.status == INVALID_UID


def test_out_of_order_routing_tags_are_read_through_pydicom_too(tmp_path):
    """A non-ASCII value sends the routing tags through pydicom, which must not stop before a tag that comes
    late (it stops after the routing tags only where the elements are in order)."""
    path = ex.out_of_order(tmp_path)
    ds = dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstitutionName = "Hôpital Général"
    ds.save_as(tmp_path / "latin1.dcm", enforce_file_format=True)
    elements = ex._top_level_elements(dataset_bytes(tmp_path / "latin1.dcm"))
    study = [raw for tag, raw in elements if tag == 0x0020000D]
    rest = [raw for tag, raw in elements if tag != 0x0020000D]
    found = read_tags(b"".join(rest + study), ExplicitVRLittleEndian)  # the study UID last of all
    assert (found.study_uid, found.institution_name) == (ds.StudyInstanceUID, "Hôpital Général")


def test_a_routing_tag_met_twice_is_refused(tmp_path):
    path = ex.out_of_order(tmp_path)
    elements = ex._top_level_elements(dataset_bytes(path))
    study = [raw for tag, raw in elements if tag == 0x0020000D]
    other = b"\x20\x00\x0d\x00UI" + struct.pack("<H", 6) + b"1.2.3\x00"
    with pytest.raises(Rejection) as exc:
        read_tags(b"".join(raw for _, raw in elements) + other, ExplicitVRLittleEndian)
    assert exc.value.status == CANNOT_UNDERSTAND and "twice" in exc.value.reason
    assert study


def test_a_data_set_in_the_other_vr_encoding_is_refused_with_the_reason(tmp_path):
    """SC_rgb_jpeg.dcm: JPEG Baseline (explicit VR) in its meta, an implicit VR data set. storescp cannot read
    it and aborts the association; we answer 0xC000 saying why."""
    data = dataset_bytes(ex.implicit_as_jpeg(tmp_path))
    with pytest.raises(Rejection) as exc:
        read_tags(data, "1.2.840.10008.1.2.4.50")
    assert exc.value.status == CANNOT_UNDERSTAND
    assert "Implicit VR data set on an Explicit VR context" in exc.value.reason
    with pytest.raises(Rejection) as exc:
        read_tags(dataset_bytes(ex.out_of_order(tmp_path)), ImplicitVRLittleEndian)
    assert "Explicit VR data set on an Implicit VR context" in exc.value.reason


def test_file_meta_length_is_zero_unless_a_clean_group_0002_opens_the_data_set(tmp_path):
    data = dataset_bytes(ex.file_meta_in_data_set(tmp_path))
    skip = file_meta_length(data)
    assert skip and struct.unpack_from("<H", data, skip)[0] != 0x0002
    assert file_meta_length(data[:skip - 3]) == 0  # cut inside the meta
    assert file_meta_length(dataset_bytes(ex.out_of_order(tmp_path))) == 0
    assert file_meta_length(b"\x02\x00\x10\x00ZZ\x02\x001\x00" + data[skip:]) == 0  # not a VR


def test_walker_vr_tables_are_pydicoms():
    assert tags._VRS == {vr.value.encode() for vr in VR if len(vr.value) == 2}
    assert tags._LONG_VRS == {vr.value.encode() for vr in EXPLICIT_VR_LENGTH_32}


def _negotiated(contexts, supported) -> set[str]:
    raw = _rq(contexts)
    neg = pdu.negotiate(pdu.parse_associate_rq(raw[6:]), "DICOMFLOW", [], supported)
    return set() if neg.reject else {abstract for abstract, _ in neg.accepted().values()}


def _rq(contexts) -> bytes:
    from tests.test_ingest_scp import _rq_bytes

    for i, cx in enumerate(contexts):
        cx.context_id = 2 * i + 1
    return _rq_bytes("DICOMFLOW", "MODALITY", contexts)


PROPOSED = {
    "ct": "1.2.840.10008.5.1.4.1.1.2",
    "us_retired": ex.RETIRED_US,
    "nm_retired": ex.RETIRED_NM,
    "standalone_curve_retired": "1.2.840.10008.5.1.4.1.1.9",
    "siemens_csa": ex.SIEMENS_CSA_NON_IMAGE,
    "ge_private_3d_model": "1.2.840.113619.4.26",
    "unknown_public": "1.2.840.10008.5.1.4.1.1.999999",
    "modality_worklist_find": "1.2.840.10008.5.1.4.31",
    "mpps": "1.2.840.10008.3.1.2.3.3",
    "storage_commitment": "1.2.840.10008.1.20.1",
}


def test_retired_and_listed_private_storage_classes_are_negotiated():
    assert {ex.RETIRED_US, ex.RETIRED_NM, PROPOSED["standalone_curve_retired"]} <= STANDARD_STORAGE
    assert PROPOSED["storage_commitment"] not in STANDARD_STORAGE
    contexts = [build_context(uid) for uid in PROPOSED.values()]
    default = _negotiated(contexts, storage_contexts([]))
    assert default == {PROPOSED[k] for k in ("ct", "us_retired", "nm_retired", "standalone_curve_retired")}
    listed = _negotiated([build_context(uid) for uid in PROPOSED.values()],
                         storage_contexts([ex.SIEMENS_CSA_NON_IMAGE]))
    assert listed == default | {ex.SIEMENS_CSA_NON_IMAGE}
    # a modality proposing only a private class it was not configured for: the association is rejected
    assert _negotiated([build_context(PROPOSED["ge_private_3d_model"])], storage_contexts([])) == set()


def test_any_accepts_what_pynetdicoms_unrestricted_storage_accepts():
    contexts = [build_context(uid) for uid in PROPOSED.values()]
    ours = _negotiated(contexts, storage_contexts("any"))
    proposed = [build_context(uid) for uid in PROPOSED.values()]
    for i, cx in enumerate(proposed):
        cx.context_id = 2 * i + 1
    theirs, _ = negotiate_unrestricted(proposed, [], None)
    assert ours == {str(cx.abstract_syntax) for cx in theirs if cx.result == 0}
    assert {PROPOSED[k] for k in ("ct", "us_retired", "nm_retired", "standalone_curve_retired", "siemens_csa",
                                  "ge_private_3d_model", "unknown_public")} <= ours
    assert not {PROPOSED["mpps"], PROPOSED["storage_commitment"]} & ours


def test_the_longest_accepted_uid_names_a_study_index_file(tmp_path):
    """uid_name is at most MAX_NAME_LEN characters, so every accepted study has an index file (NAME_MAX 255)."""
    from shared.contract.uids import MAX_LENIENT_UID_LEN, MAX_NAME_LEN
    from shared.storage.fs_study_index import FileStudyIndex

    longest = "1." + "2" * (MAX_LENIENT_UID_LEN - 2)
    escaped = "a" + ":" * ((MAX_NAME_LEN - 1) // 3)  # every ':' takes three characters
    index = FileStudyIndex(tmp_path)
    for uid in (longest, validate_uid(escaped)):
        assert index.omap_set_many([(study_index_name(uid), {"k": b"v"})]) == [None]
        assert index.omap_get(study_index_name(uid)) == {"k": b"v"}
    with pytest.raises(InvalidUID, match="once escaped"):
        validate_uid(escaped + ":")


@pytest.mark.parametrize("streamed", [False, True])
def test_the_intake_stores_the_data_set_after_a_file_meta_that_opens_it(tmp_path, streamed):
    """In memory and streamed to staging (the data set larger than ``stream_above_bytes``): what is staged,
    digested and published is the data set after the meta, and no temporary is left behind."""
    from prometheus_client import REGISTRY

    from services.ingest.intake import Intake, Received
    from shared.storage.objectstore import content_digest
    from tests.test_streamed_instances import _pieces, _Recorder, _store, _temporaries

    path = ex.file_meta_in_data_set(tmp_path)
    sent, expected = dataset_bytes(path), ex.stored_data_set(path)
    store, published = _store(tmp_path), []
    intake = Intake(store, _Recorder(published), 1024 * 1024, stream_above_bytes=1024)
    data = sent
    if streamed:
        data = intake.open_writer()
        for piece in _pieces(sent, 700):
            data.write(piece)
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    before = REGISTRY.get_sample_value("dicomflow_ingest_tolerated_total", {"kind": "file_meta_in_data_set"}) or 0
    assert intake.accept(Received(data=data, transfer_syntax=ImplicitVRLittleEndian, sop_class_uid="",
                                  sop_instance_uid=sop, calling_ae="MODALITY", called_ae="DICOMFLOW")) == (0, "")
    assert published[0].digest == content_digest(expected) and published[0].size == len(expected)
    assert store.get(published[0].digest) == expected
    assert _temporaries(store.root) == []
    assert REGISTRY.get_sample_value("dicomflow_ingest_tolerated_total", {"kind": "file_meta_in_data_set"}) == before + 1


def test_names_and_tokens_the_readme_shows():
    assert (uid_token("1.2.3_4"), uid_token("1.2.3.4"), uid_name("1.2.3:b")) == ("1_2_3-5F4", "1_2_3_4", "1.2.3-3Ab")
