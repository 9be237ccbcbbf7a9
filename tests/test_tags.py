"""Reading routing tags from data set bytes in every common transfer syntax, and refusing broken ones."""

from __future__ import annotations

import zlib

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomflow.synthetic import ct_instance, new_uid
from shared.dicom.statuses import CANNOT_UNDERSTAND, INVALID_UID, Rejection
from shared.dicom.tags import read_tags
from tests.helpers import dataset_bytes


def _encode(ds, ts, tmp_path) -> bytes:
    ds.file_meta.TransferSyntaxUID = ts
    path = tmp_path / "x.dcm"
    if ts == DeflatedExplicitVRLittleEndian:
        ds.save_as(path, enforce_file_format=True)
        return dataset_bytes(path)
    if ts in (JPEGBaseline8Bit, RLELossless):
        # An encapsulated (undefined-length) Pixel Data element with two fragments: structure, not codec.
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8fragment-one\xff\xd9", b"\xff\xd8two\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True, little_endian=ts != ExplicitVRBigEndian,
               implicit_vr=ts == ImplicitVRLittleEndian)
    return dataset_bytes(path)


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless])
def test_routing_tags_in_each_transfer_syntax(tmp_path, ts):
    study, series = new_uid(), new_uid()
    ds = ct_instance(study, series, 7, institution="Clinic A", series_description="HEAD 5mm")
    tags = read_tags(_encode(ds, ts, tmp_path), ts)
    assert (tags.study_uid, tags.series_uid, tags.sop_uid) == (study, series, ds.SOPInstanceUID)
    assert (tags.modality, tags.institution_name, tags.series_description, tags.body_part) == (
        "CT", "Clinic A", "HEAD 5mm", "HEAD")
    assert tags.instance_number == 7 and tags.patient_id == "PAT001"


def test_deflate_stream_that_is_not_deflate(tmp_path):
    with pytest.raises(Rejection) as exc:
        read_tags(b"this is not a deflate stream at all" * 3, DeflatedExplicitVRLittleEndian)
    assert exc.value.status == CANNOT_UNDERSTAND


@pytest.mark.parametrize("mutate,status", [
    (lambda b: b[: len(b) // 2], CANNOT_UNDERSTAND),       # truncated inside pixel data
    (lambda b: b[:5], CANNOT_UNDERSTAND),                  # truncated header
    (lambda b: b"", CANNOT_UNDERSTAND),
    (lambda b: b[8:] + b[:8], CANNOT_UNDERSTAND),          # out of order / misaligned
    (lambda b: b"\x08\x00\x18\x00ZZ\x04\x001.23" + b, CANNOT_UNDERSTAND),  # invalid VR
])
def test_broken_data_sets_are_refused(tmp_path, mutate, status):
    ds = ct_instance(new_uid(), new_uid(), 1)
    data = _encode(ds, ExplicitVRLittleEndian, tmp_path)
    with pytest.raises(Rejection) as exc:
        read_tags(mutate(data), ExplicitVRLittleEndian)
    assert exc.value.status == status


@pytest.mark.parametrize("field,value", [("StudyInstanceUID", None), ("SeriesInstanceUID", "1.2.*"),
                                         ("SOPInstanceUID", "1.2/../../x"), ("StudyInstanceUID", "")])
def test_missing_or_invalid_uids(tmp_path, field, value):
    ds = ct_instance(new_uid(), new_uid(), 1)
    if value is None:
        delattr(ds, field)
    else:
        setattr(ds, field, value)
    with pytest.raises(Rejection) as exc:
        read_tags(_encode(ds, ExplicitVRLittleEndian, tmp_path), ExplicitVRLittleEndian)
    assert exc.value.status == INVALID_UID
    assert field in exc.value.reason


def test_deflated_input_is_read_from_the_head_only(tmp_path):
    ds = ct_instance(new_uid(), new_uid(), 1, rows=256, cols=256)
    data = _encode(ds, DeflatedExplicitVRLittleEndian, tmp_path)
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)  # really deflated
    assert read_tags(data, DeflatedExplicitVRLittleEndian).sop_uid == ds.SOPInstanceUID


def test_non_ascii_text_goes_through_the_character_set(tmp_path):
    """ASCII values are read straight from the bytes; others are decoded by pydicom with the data set's charset."""
    ds = ct_instance(new_uid(), new_uid(), 1, institution="Hôpital Général")
    ds.SpecificCharacterSet = "ISO_IR 100"
    tags = read_tags(_encode(ds, ExplicitVRLittleEndian, tmp_path), ExplicitVRLittleEndian)
    assert tags.institution_name == "Hôpital Général"
    ascii_tags = read_tags(_encode(ct_instance(new_uid(), new_uid(), 7), ImplicitVRLittleEndian, tmp_path),
                           ImplicitVRLittleEndian)
    assert (ascii_tags.institution_name, ascii_tags.instance_number, ascii_tags.modality) == ("General Hospital", 7, "CT")
