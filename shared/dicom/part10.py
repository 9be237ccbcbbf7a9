"""DICOM Part-10 files around data set bytes kept exactly as received.

The bytes on the bus and in the object stores are the data set as the modality sent it (no file
meta); whoever hands an instance on as a file (export, forwarding, retrieval) wraps it here, and
whoever receives files (STOW-RS) finds where their data set begins here.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

_PREAMBLE = b"\x00" * 128 + b"DICM"
_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"  # (0002,0001) FileMetaInformationVersion 00\01
# What pydicom's own writer puts there (ImplementationClassUID, ImplementationVersionName), so the files are the same.
_IMPLEMENTATION_UID = PYDICOM_IMPLEMENTATION_UID
_IMPLEMENTATION_NAME = f"PYDICOM {'.'.join(pydicom.__version_info__)}"


def _short(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """One group 0002 element with a 2-byte length (explicit VR little endian), padded to an even length."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def part10(data: bytes, sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, file meta information, then the data set bytes unchanged.

    The meta group is encoded here rather than through pydicom's writer, which took ~330 us an instance
    (a tenth of a WADO-RS instance download's CPU, measured with bench/retrieve.py); the bytes are the
    same as ``pydicom.filewriter.write_file_meta_info(..., enforce_standard=True)`` writes (tested).
    """
    body = b"".join((_VERSION,
                     _short(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
                     _short(0x0003, b"UI", sop_uid.encode("ascii"), b"\x00"),
                     _short(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00"),
                     _short(0x0012, b"UI", _IMPLEMENTATION_UID.encode("ascii"), b"\x00"),
                     _short(0x0013, b"SH", _IMPLEMENTATION_NAME.encode("ascii"), b" ")))
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body))
    return b"".join((_PREAMBLE, group_length, body, data))


def write_part10(out: BinaryIO, chunks: Iterable[bytes], sop_class_uid: str, sop_uid: str,
                 transfer_syntax_uid: str) -> int:
    """:func:`part10` written to ``out`` with the data set given in chunks, one at a time (an instance of any
    size in bounded memory): the same bytes. Returns how many were written."""
    written = out.write(part10(b"", sop_class_uid, sop_uid, transfer_syntax_uid))
    for chunk in chunks:
        written += out.write(chunk)
    return written


def part10_by_pydicom(data: bytes, sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str) -> bytes:
    """:func:`part10` through pydicom's file meta writer: the reference it is tested against."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = io.BytesIO()
    buf.write(_PREAMBLE)
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(data)
    return buf.getvalue()


class NotPart10(ValueError):
    """Bytes that do not begin as a DICOM Part-10 file (preamble, "DICM", group 0002 in explicit VR LE)."""


@dataclass(frozen=True)
class FileMeta:
    """What a Part-10 file's meta information says of its data set, and where the data set begins."""

    transfer_syntax_uid: str
    sop_class_uid: str
    sop_uid: str
    data_offset: int


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_META_TAGS = {0x00020002: "sop_class_uid", 0x00020003: "sop_uid", 0x00020010: "transfer_syntax_uid"}


def read_file_meta(head: bytes | memoryview) -> FileMeta | None:
    """The file meta of a Part-10 file from its first bytes; None while ``head`` is too short to tell.

    Also taken: the meta group with no preamble before it, as pydicom writes a data set that has file
    meta but no preamble (dicomweb-client's STOW-RS sends such). The meta group is walked element by
    element (its group length, when present, is not trusted: a writer that got it wrong would
    otherwise shift the data set). Raises :class:`NotPart10`.
    """
    head = memoryview(head)
    if len(head) >= 6 and bytes(head[:2]) == b"\x02\x00" and bytes(head[4:6]).isalpha():
        pos = 0
    elif len(head) < 132:
        return None
    elif bytes(head[128:132]) != b"DICM":
        raise NotPart10('no "DICM" after the 128-byte preamble, nor a file meta group at the start')
    else:
        pos = 132
    found: dict[str, str] = {}
    while True:
        if len(head) < pos + 8:
            return None
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = bytes(head[pos + 4:pos + 6])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise NotPart10(f"file meta element (0002,{element:04X}) has no explicit VR")
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_at = pos + 8
        if length == 0xFFFFFFFF:
            raise NotPart10(f"file meta element (0002,{element:04X}) of undefined length")
        if len(head) < value_at + length:
            return None
        key = _META_TAGS.get((group << 16) | element)
        if key:
            found[key] = bytes(head[value_at:value_at + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + length
    if "transfer_syntax_uid" not in found:
        raise NotPart10("the file meta has no TransferSyntaxUID (0002,0010)")
    return FileMeta(found["transfer_syntax_uid"], found.get("sop_class_uid", ""), found.get("sop_uid", ""), pos)
