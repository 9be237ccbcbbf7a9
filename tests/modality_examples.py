"""Real-world examples of what modalities send that a strict receiver refuses, as Part-10 files.

Each is a real file shipped with pydicom (``pydicom.data``), kept as it is or changed only in the way
that makes it an example of its class, the rest of its bytes untouched:

- ``retired_us``: a real ultrasound image (examples_rgb_color.dcm, from a US scanner) labelled with the
  SOP class such scanners used before 1996, Ultrasound Image Storage (Retired) 1.2.840.10008.5.1.4.1.1.6;
- ``retired_nm``: a real MR image labelled Nuclear Medicine Image Storage (Retired) 1.2.840.10008.5.1.4.1.1.5;
- ``siemens_csa``: a Siemens CSA Non-Image object (private SOP class 1.3.12.2.1107.5.9.1, as syngo
  scanners write for spectroscopy and protocol reports): a real MR header without pixels, with the
  private ``SIEMENS CSA NON-IMAGE`` block such objects carry;
- ``hex_digest``: CT_small.dcm as an anonymiser that replaces each UID by ``2.25.`` and the SHA-256 hex
  digest of the original leaves it (letters, 69 characters);
- ``leading_zeros``: rtdose.dcm, whose vendor wrote UIDs with leading-zero components
  (``1.2.123.456.78.9.0123.4567.89012345678901``, in its Referenced SOP Instance UID), with that UID as its
  own SOP Instance UID;
- ``file_meta_in_data_set``: rtplan.dcm (Implicit VR Little Endian) as a sender that sends the file after its
  preamble sends it: the file meta (group 0002, always Explicit VR) opens the data set, in the other VR
  encoding than the negotiated one. dcmtk's storescp stores the data set after the meta;
- ``implicit_as_jpeg``: SC_rgb_jpeg.dcm exactly as shipped: its file meta (and so a sender that proposes
  it) says JPEG Baseline, whose data sets are explicit VR, but the data set is implicit VR. storescp
  refuses it (it cannot read it: "Failed to receive message", the association aborted);
- ``un_undefined_length``: MR_small.dcm with the private element of UN_sequence.dcm (written by GDCM 2.4.4):
  a UN of undefined length whose content is an Implicit VR sequence (PS3.5 6.2.2);
- ``out_of_order``: CT_small.dcm with its Study Instance UID element moved after the image pixel module.
"""

from __future__ import annotations

import hashlib
import struct
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from tests.helpers import dataset_bytes

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"
RETIRED_NM = "1.2.840.10008.5.1.4.1.1.5"
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
LEADING_ZEROS_UID = "1.2.123.456.78.9.0123.4567.89012345678901"  # as rtdose.dcm's vendor wrote it


def _source(name: str) -> Path:
    return Path(get_testdata_file(name))


def _fresh_uids(ds, study: str | None = None) -> None:
    """New Study/Series/SOP Instance UIDs, so that each example is its own study."""
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def retired_us(folder: Path, study: str | None = None) -> Path:
    ds = dcmread(_source("examples_rgb_color.dcm"))
    _fresh_uids(ds, study)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RETIRED_US
    return _save(ds, folder / "retired_us.dcm")


def retired_nm(folder: Path, study: str | None = None) -> Path:
    ds = dcmread(_source("MR_small.dcm"))
    _fresh_uids(ds, study)
    ds.Modality = "NM"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RETIRED_NM
    return _save(ds, folder / "retired_nm.dcm")


def siemens_csa(folder: Path, study: str | None = None) -> Path:
    ds = dcmread(_source("MR_small.dcm"))
    _fresh_uids(ds, study)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SIEMENS_CSA_NON_IMAGE
    ds.Manufacturer = "SIEMENS"
    block = ds.private_block(0x0029, "SIEMENS CSA NON-IMAGE", create=True)
    block.add_new(0x08, "CS", "SPEC NUM 4")
    block.add_new(0x10, "OB", b"SV10\x04\x03\x02\x01" + bytes(56))
    return _save(ds, folder / "siemens_csa.dcm")


def _digest_uid(uid: str) -> str:
    return "2.25." + hashlib.sha256(uid.encode()).hexdigest()


def hex_digest(folder: Path, study: str | None = None, salt: str = "") -> Path:
    ds = dcmread(_source("CT_small.dcm"))
    ds.StudyInstanceUID = _digest_uid(salt + ds.StudyInstanceUID)
    ds.SeriesInstanceUID = _digest_uid(salt + ds.SeriesInstanceUID)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _digest_uid(salt + ds.SOPInstanceUID)
    return _save(ds, folder / "hex_digest.dcm")


def leading_zeros(folder: Path, study: str | None = None) -> Path:
    ds = dcmread(_source("rtdose.dcm"))
    _fresh_uids(ds, study)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = LEADING_ZEROS_UID
    return _save(ds, folder / "leading_zeros.dcm")


def implicit_as_jpeg(folder: Path, study: str | None = None) -> Path:
    path = folder / "implicit_as_jpeg.dcm"
    path.write_bytes(_source("SC_rgb_jpeg.dcm").read_bytes())
    return path


def _with_data_set(source: Path, path: Path, data: bytes, transfer_syntax: str | None = None) -> Path:
    """A Part-10 file: ``source``'s file meta (its transfer syntax replaced, when given), then ``data``."""
    meta = dcmread(source, stop_before_pixels=True).file_meta
    if transfer_syntax is not None:
        meta.TransferSyntaxUID = transfer_syntax
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    path.write_bytes(out.getvalue() + data)
    return path


def file_meta_in_data_set(folder: Path, study: str | None = None) -> Path:
    ds = dcmread(_source("rtplan.dcm"))
    _fresh_uids(ds, study)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    whole = _save(ds, folder / "rtplan.tmp")
    # a file whose "data set" is the whole of rtplan.dcm after its preamble: what a sender that sends the
    # file from byte 132 puts on the wire
    path = _with_data_set(whole, folder / "file_meta_in_data_set.dcm", whole.read_bytes()[132:])
    whole.unlink()
    return path


def stored_data_set(path: Path) -> bytes:
    """What a receiver that takes ``path`` should store: its data set, less a file meta that opens it."""
    data = dataset_bytes(path)
    if data[:2] != b"\x02\x00":
        return data
    inner = dcmread(BytesIO(b"\x00" * 128 + b"DICM" + data), stop_before_pixels=True)
    return data[12 + int(inner.file_meta.FileMetaInformationGroupLength):]


def _top_level_elements(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, bytes) of each top-level element of an explicit VR little endian data set with defined lengths."""
    out, pos = [], 0
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4: pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            (length,) = struct.unpack_from("<L", data, pos + 8)
            end = pos + 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            end = pos + 8 + length
        assert length != 0xFFFFFFFF, "undefined length: not in these examples"
        out.append((group << 16 | elem, data[pos:end]))
        pos = end
    return out


def un_undefined_length(folder: Path, study: str | None = None) -> Path:
    src = _source("MR_small.dcm")
    ds = dcmread(src)
    _fresh_uids(ds, study)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    tmp = _save(ds, folder / "un.tmp")
    un = dataset_bytes(_source("UN_sequence.dcm"))
    assert un[4:6] == b"UN" and un[8:12] == b"\xff\xff\xff\xff"
    elements = _top_level_elements(dataset_bytes(tmp))
    before = [raw for tag, raw in elements if tag < 0x4453100C]
    after = [raw for tag, raw in elements if tag > 0x4453100C]
    path = _with_data_set(tmp, folder / "un_undefined_length.dcm", b"".join(before) + un + b"".join(after))
    tmp.unlink()
    return path


def out_of_order(folder: Path, study: str | None = None) -> Path:
    src = _source("CT_small.dcm")
    ds = dcmread(src)
    _fresh_uids(ds, study)
    tmp = _save(ds, folder / "order.tmp")
    elements = _top_level_elements(dataset_bytes(tmp))
    study = [raw for tag, raw in elements if tag == 0x0020000D]
    rest = [raw for tag, raw in elements if tag != 0x0020000D]
    pixels = next(i for i, (tag, _) in enumerate(e for e in elements if e[0] != 0x0020000D) if tag == 0x7FE00010)
    path = _with_data_set(tmp, folder / "out_of_order.dcm", b"".join(rest[:pixels] + study + rest[pixels:]))
    tmp.unlink()
    return path


EXAMPLES = {f.__name__: f for f in (retired_us, retired_nm, siemens_csa, hex_digest, leading_zeros,
                                     file_meta_in_data_set, un_undefined_length, out_of_order)}
"""What storescp stores: each must be stored, byte-identical (the sent data set after any file meta)."""
