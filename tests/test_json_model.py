"""The lean DICOM JSON encoder against pydicom's (an independent implementation) and PS3.18 F.2."""

from __future__ import annotations

import glob
import os
import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info
from pydicom.sequence import Sequence

from shared.dicom.json_model import JsonModelError, NeedMoreBytes, json_model
from tests.helpers import encode

_DATA = os.path.join(os.path.dirname(pydicom.__file__), "data")
_FILES = sorted(glob.glob(os.path.join(_DATA, "*_files", "**", "*.dcm"), recursive=True))
# Malformed on purpose (truncated, or a data set in another encoding than its transfer syntax says):
# the ingest refuses such data sets, and so does the encoder.
_MALFORMED = {"MR_truncated.dcm", "rtplan_truncated.dcm", "SC_rgb_jpeg.dcm"}


def _comparable(model: dict) -> dict:
    """Both outputs in one form: pydicom keeps group lengths and private elements with its own
    VR guesses, inlines small binary values and keeps "" for an empty value among several."""
    out = {}
    for key, element in model.items():
        group = int(key[:4], 16)
        if key.endswith("0000") or key == "FFFCFFFC" or group & 1 or group == 2:
            continue
        element = dict(element)
        if element.pop("InlineBinary", None) is not None or element.pop("BulkDataURI", None) is not None:
            element["bulk"] = True
        values = []
        for value in element.get("Value", []):
            if isinstance(value, dict) and element["vr"] == "SQ":
                value = _comparable(value)
            elif isinstance(value, dict):
                value = {k: v for k, v in value.items() if v} or None
            elif isinstance(value, str):
                value = value.strip() or None
            elif isinstance(value, (int, float)):
                value = float(value)
            values.append(value)
        element.pop("Value", None)
        if values and not all(v is None for v in values):
            element["Value"] = values
        out[key] = element
    return out


def _raw(path: str) -> tuple[bytes, str] | None:
    with open(path, "rb") as fp:
        if fp.read(132)[128:] != b"DICM":
            return None
        meta = _read_file_meta_info(fp)
        if "TransferSyntaxUID" not in meta:
            return None
        return fp.read(), str(meta.TransferSyntaxUID)


@pytest.mark.parametrize("path", _FILES, ids=os.path.basename)
def test_same_model_as_pydicom_for_real_files(path):
    raw = _raw(path)
    if raw is None:
        pytest.skip("not a Part 10 file with a transfer syntax")
    data, syntax = raw
    if os.path.basename(path) in _MALFORMED:
        with pytest.raises(JsonModelError):
            json_model(data, syntax)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reference = pydicom.dcmread(path).to_json_dict(bulk_data_threshold=0,
                                                             bulk_data_element_handler=lambda e: "bulk")
        except Exception as exc:  # noqa: BLE001 - a file pydicom itself cannot convert has no reference
            pytest.skip(f"pydicom cannot convert it: {exc}")
    assert _comparable(json_model(data, syntax)) == _comparable(reference)


def test_ps3_18_f2_rules():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.add_new(0x00080008, "CS", ["ORIGINAL", "", "AXIAL"])
    ds.add_new(0x00080020, "DA", "")
    ds.PatientName = "Müller^Jürgen=ミュラー^ユルゲン"
    ds.add_new(0x00180050, "DS", "2.50")
    ds.add_new(0x00200013, "IS", "7")
    ds.add_new(0x00280010, "US", 512)
    ds.add_new(0x00281050, "DS", ["40", "41"])
    item = Dataset()
    item.add_new(0x00090010, "LO", "ACME")
    item.add_new(0x00420011, "OB", b"\x01\x02")
    ds.add_new(0x00400275, "SQ", Sequence([item]))
    ds.add_new(0x7FE00010, "OW", b"\x00" * 8)
    raw = encode(ds).replace(b"40\\41 ", b"40\\x  ")  # a DS that is not a number
    model = json_model(raw, "1.2.840.10008.1.2.1")
    assert model["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}  # F.2.5: empty value is null
    assert model["00080020"] == {"vr": "DA"}  # empty element: no Value
    assert model["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen", "Ideographic": "ミュラー^ユルゲン"}]}
    assert model["00180050"] == {"vr": "DS", "Value": [2.5]}
    assert model["00200013"] == {"vr": "IS", "Value": [7]}
    assert model["00280010"] == {"vr": "US", "Value": [512]}
    assert model["00281050"] == {"vr": "DS", "Value": [40.0, None]}  # not a number: null, never a failure
    sequence = model["00400275"]["Value"][0]
    assert sequence["00420011"] == {"vr": "OB", "BulkDataURI": "bulkdata/00400275/0/00420011"}
    assert model["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}
    assert not any(key.endswith("0000") for key in model)


def test_implicit_vr_uses_the_dictionary_and_pixel_representation():
    ds = Dataset()
    ds.add_new(0x00280103, "US", 1)  # signed pixels
    ds.add_new(0x00280106, "SS", -100)
    ds.add_new(0x00100010, "PN", "Doe^Jane")
    model = json_model(encode(ds, implicit=True), "1.2.840.10008.1.2")
    assert model["00280106"] == {"vr": "SS", "Value": [-100]}
    assert model["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]


def test_known_element_sent_as_un_is_read_with_its_dictionary_vr():
    ds = Dataset()
    ds.add_new(0x00080020, "UN", b"20260102")
    model = json_model(encode(ds), "1.2.840.10008.1.2.1")
    assert model["00080020"] == {"vr": "DA", "Value": ["20260102"]}


def test_truncated_data_set_is_an_error():
    ds = Dataset()
    ds.PatientID = "X" * 20
    raw = encode(ds)
    with pytest.raises(JsonModelError):
        json_model(raw[:-5], "1.2.840.10008.1.2.1")


def test_a_head_of_the_data_set_is_enough_up_to_the_pixels():
    ds = Dataset()
    ds.PatientName = "Head^Only"
    ds.add_new(0x00280010, "US", 512)
    item = Dataset()
    item.add_new(0x00081150, "UI", "1.2.3")
    ds.add_new(0x00081140, "SQ", Sequence([item] * 50))
    ds.add_new(0x7FE00010, "OW", b"\x01\x00" * 100_000)
    raw = encode(ds)
    whole = json_model(raw, "1.2.840.10008.1.2.1")
    pixels_at = raw.index(b"\xe0\x7f\x10\x00")
    head = json_model(raw[: pixels_at + 64], "1.2.840.10008.1.2.1", total=len(raw))
    assert head == whole
    with pytest.raises(NeedMoreBytes) as more:  # the head ends inside the sequence: read more
        json_model(raw[:200], "1.2.840.10008.1.2.1", total=len(raw))
    assert 200 < more.value.needed <= len(raw)
    with pytest.raises(JsonModelError):  # without total, a short data set is an error, not a head
        json_model(raw[: pixels_at + 64], "1.2.840.10008.1.2.1")
