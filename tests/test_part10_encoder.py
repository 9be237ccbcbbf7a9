"""shared.dicom.part10: the hand-made file meta group is byte for byte what pydicom's writer makes, and reads back."""

from __future__ import annotations

import io

import pytest
from pydicom.filereader import _read_file_meta_info

from shared.dicom.part10 import part10, part10_by_pydicom, read_file_meta, write_part10


@pytest.mark.parametrize("sop_class, sop, ts", [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1"),  # even and odd lengths
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.10.1234.762227098745355750043015099922557411",
     "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.88.11", "2.25.1", "1.2.840.10008.1.2.4.50"),
])
def test_part10_is_what_pydicom_writes(sop_class, sop, ts):
    data = b"\x08\x00\x16\x00UI\x04\x001.2\x00"
    ours = part10(data, sop_class, sop, ts)
    assert ours == part10_by_pydicom(data, sop_class, sop, ts)
    meta = read_file_meta(ours)
    assert (meta.sop_class_uid, meta.sop_uid, meta.transfer_syntax_uid) == (sop_class, sop, ts)
    assert ours[meta.data_offset:] == data
    meta_ds = _read_file_meta_info(io.BytesIO(ours[132:]))  # pydicom reads it back too
    assert meta_ds.MediaStorageSOPInstanceUID == sop and meta_ds.TransferSyntaxUID == ts


@pytest.mark.parametrize("pieces", [[], [b""], [b"\x08\x00\x16\x00UI\x04\x001.2\x00"], [b"ab", b"", b"c" * 70001, b"d"]])
def test_write_part10_streams_the_same_bytes(pieces):
    out = io.BytesIO()
    written = write_part10(out, iter(pieces), "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1")
    assert out.getvalue() == part10(b"".join(pieces), "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1")
    assert written == len(out.getvalue())
