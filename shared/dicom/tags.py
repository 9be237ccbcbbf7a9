"""Reading the routing tags, and only those, from a data set's bytes as received.

Pure: bytes + transfer syntax in, :class:`~shared.contract.events.InstanceTags` out, or a
:class:`Rejection` naming the DICOM status. Pixel data is never parsed (we stop at group 0x0020).
"""

from __future__ import annotations

import io
import mmap
import struct
import zlib

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from shared.contract.events import InstanceTags
from shared.contract.uids import InvalidUID, validate_uid
from shared.dicom.statuses import CANNOT_UNDERSTAND, INVALID_UID, Rejection

_TAGS = {
    "sop_class_uid": 0x00080016,
    "sop_uid": 0x00080018,
    "accession_number": 0x00080050,
    "modality": 0x00080060,
    "institution_name": 0x00080080,
    "study_description": 0x00081030,
    "series_description": 0x0008103E,
    "patient_id": 0x00100020,
    "body_part": 0x00180015,
    "study_uid": 0x0020000D,
    "series_uid": 0x0020000E,
    "series_number": 0x00200011,
    "instance_number": 0x00200013,
}
_SPECIFIC = [Tag(t) for t in _TAGS.values()]
_LAST = max(_TAGS.values())
_CHARSET = 0x00080005
_WANTED = frozenset(_TAGS.values()) | {_CHARSET}


# The VRs an explicit-VR header may name, and those with a 4-byte length: pydicom's tables, not a copy.
_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
_LONG_VRS = frozenset(vr.value.encode() for vr in EXPLICIT_VR_LENGTH_32)


_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Walker:
    """Walks element headers (and sequence items) of a whole data set without decoding values.

    As tolerant as dcmtk's storescp (and pydicom) where a real sender strays and the bytes stay
    unambiguous: a UN element of undefined length, whose content is Implicit VR Little Endian (PS3.5
    6.2.2, CP-246), and elements out of ascending order. A routing tag met twice is refused: which one
    would route the instance is a guess. A data set in the other VR encoding than the negotiated
    transfer syntax, or with implicit VR items in an explicit sequence, is refused as storescp refuses
    it (pydicom would guess; what we store must read the same everywhere).
    """

    def __init__(self, raw: bytes, little: bool, partial: bool):
        self.raw, self.partial = raw, partial
        self.little = little
        self.end = len(raw)
        self.found: dict[int, bytes] = {}  # top-level routing tags met on the way: tag -> value bytes
        self.in_order = True  # whether every level's elements came in ascending order

    def fail(self, msg: str) -> None:
        raise Rejection(CANNOT_UNDERSTAND, msg)

    def header(self, pos: int, implicit: bool, o: str) -> tuple[int, bytes, int, int]:
        """(tag, vr, length, value offset) of the element at ``pos``."""
        if self.end - pos < 8:
            self.fail(f"truncated element header at offset {pos}")
        group, elem = struct.unpack_from(o + "HH", self.raw, pos)
        tag = group << 16 | elem
        if implicit or group == 0xFFFE:
            (length,) = struct.unpack_from(o + "L", self.raw, pos + 4)
            return tag, b"", length, pos + 8
        vr = self.raw[pos + 4: pos + 6]
        if vr not in _VRS:
            self.fail(f"invalid VR {vr!r} at offset {pos}")
        if vr in _LONG_VRS:
            if self.end - pos < 12:
                self.fail(f"truncated element header at offset {pos}")
            (length,) = struct.unpack_from(o + "L", self.raw, pos + 8)
            return tag, vr, length, pos + 12
        (length,) = struct.unpack_from(o + "H", self.raw, pos + 6)
        return tag, vr, length, pos + 8

    def elements(self, pos: int, implicit: bool, o: str, stop_at_item_end: bool, top: bool = False) -> int:
        """Walk elements from ``pos``; returns the offset after them (or after the item delimiter)."""
        last = -1
        while pos < self.end:
            if self.partial and self.end - pos < 12:
                return self.end
            tag, vr, length, value = self.header(pos, implicit, o)
            if tag == _ITEM_END and stop_at_item_end:
                return value
            if tag <= last:
                if tag == last or tag >> 16 == 0xFFFE:
                    self.fail(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos} "
                              + ("repeated" if tag == last else "out of place"))
                self.in_order = False
            last = tag
            if top and tag in _WANTED:
                if tag in self.found:
                    self.fail(f"routing element ({tag >> 16:04X},{tag & 0xFFFF:04X}) appears twice")
                self.found[tag] = b""
            if length == 0xFFFFFFFF:
                # A UN of undefined length holds an Implicit VR Little Endian sequence (PS3.5 6.2.2).
                pos = self.items(value, True, "<") if vr == b"UN" else self.items(value, implicit, o)
                continue
            if value + length > self.end:
                if self.partial:
                    return self.end
                self.fail(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {length} bytes, "
                          f"{self.end - value} remain")
            if top and tag in _WANTED:
                self.found[tag] = self.raw[value: value + length]
            pos = value + length
        if stop_at_item_end:
            if self.partial:
                return self.end
            self.fail("data set ends inside a sequence item")
        return pos

    def items(self, pos: int, implicit: bool, o: str) -> int:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            if self.partial and self.end - pos < 8:
                return self.end
            tag, _, length, value = self.header(pos, implicit, o)
            if tag == _SEQ_END:
                return value
            if tag != _ITEM:
                self.fail(f"expected an item at offset {pos}, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length == 0xFFFFFFFF:
                pos = self.elements(value, implicit, o, stop_at_item_end=True)
            else:
                if value + length > self.end:
                    if self.partial:
                        return self.end
                    self.fail(f"item at offset {pos} claims {length} bytes, {self.end - value} remain")
                pos = value + length

    def walk(self, implicit: bool) -> None:
        """Walk the whole data set."""
        self.elements(0, implicit, "<" if self.little else ">", stop_at_item_end=False, top=True)


def file_meta_length(data: bytes | bytearray | memoryview | mmap.mmap) -> int:
    """How many bytes of file meta information (group 0002) open a received data set; 0: none.

    Some senders send a file as it is after its preamble, file meta included. The meta is always
    Explicit VR Little Endian (PS3.10 7.1), whatever the negotiated transfer syntax, so under Implicit
    VR it is the other encoding; dcmtk's storescp takes such a data set and stores the data set after
    the meta, and so does the intake (the meta is no part of a data set, PS3.7 9.3.1). 0 as well when
    the group does not walk cleanly: the data set is then judged as it came.
    """
    pos, end = 0, len(data)
    while end - pos >= 8 and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        vr = bytes(data[pos + 4: pos + 6])
        if vr not in _VRS:
            return 0
        if vr in _LONG_VRS:
            if end - pos < 12:
                return 0
            (length,) = struct.unpack_from("<L", data, pos + 8)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value = pos + 8
        if length == 0xFFFFFFFF or value + length > end:
            return 0
        pos = value + length
    return pos


def check_structure(raw: bytes, implicit: bool, little: bool, partial: bool = False) -> dict[int, bytes]:
    """Walk every element header of the data set and reject what is not well-formed DICOM.

    pydicom reads leniently (an element claiming more bytes than exist just gets what is left), so a
    truncated or garbage data set would otherwise pass as one with odd values. ``partial``: ``raw``
    is only the head of the data set (deflated input), running off its end is not an error.
    Returns the raw values of the top-level routing tags (and Specific Character Set) it passed.
    """
    return _walk(raw, implicit, little, partial).found


def _walk(raw: bytes, implicit: bool, little: bool, partial: bool) -> _Walker:
    walker = _Walker(raw, little, partial)
    try:
        walker.walk(implicit)
    except Rejection as rej:
        raise Rejection(rej.status, _encoding_hint(raw, implicit) + rej.reason) from None
    return walker


def _encoding_hint(raw: bytes, implicit: bool) -> str:
    """Why a data set does not walk, where its first element shows the other VR encoding (the sender's error)."""
    if len(raw) < 6 or (bytes(raw[4:6]) in _VRS) != implicit:
        return ""
    # short: the start of an Error Comment (64 characters) must say it
    return ("Explicit VR data set on an Implicit VR context: " if implicit
            else "Implicit VR data set on an Explicit VR context: ")


def _ascii_values(found: dict[int, bytes]) -> dict[str, str] | None:
    """The routing tags' text straight from the walked bytes, when every value is plain ASCII.

    Anything else (another character set, a non-ASCII value) returns None and goes through pydicom,
    which knows every character set; for ASCII both give the same text, without a Dataset.
    """
    charset = found.get(_CHARSET)
    if charset is not None and charset.strip(b" \0") not in (b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192"):
        return None
    out = {}
    for key, tag in _TAGS.items():
        value = found.get(tag)
        if value is None:
            out[key] = ""
            continue
        if not value.isascii():
            return None
        out[key] = value.decode("ascii").replace("\0", " ").strip()[:256]
    return out


def _stop(tag, vr, length) -> bool:
    return tag > _LAST


def _text(ds, keyword: str) -> str:
    elem = ds.get(Tag(_TAGS[keyword]))
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:256]


def _int(text: str) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


def read_tags(data: bytes | bytearray | memoryview, transfer_syntax: str, strict_uids: bool = False) -> InstanceTags:
    """The routing tags of a data set encoded in ``transfer_syntax`` (no file meta).

    ``strict_uids``: refuse UIDs that break PS3.5 9.1 (0xC001); otherwise only those no encoding makes
    safe (:func:`~shared.contract.uids.validate_uid`).
    """
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    try:
        partial = transfer_syntax == DeflatedExplicitVRLittleEndian
        if partial:
            # Only the head of the stream is inflated: the tags we need come before the pixels.
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(data), 4 * 1024 * 1024)
        else:
            # BytesIO(bytes) shares, no copy; a mapped file (a streamed instance) is walked in place
            raw = data if isinstance(data, (bytes, mmap.mmap)) else bytes(data)
        if not raw:
            raise Rejection(CANNOT_UNDERSTAND, "empty data set")
        walked = _walk(raw, implicit, little, partial)
        texts = None if partial else _ascii_values(walked.found)
        if texts is None:
            # pydicom stops after the routing tags only where the elements come in order
            ds = read_dataset(io.BytesIO(raw), implicit, little,
                              stop_when=_stop if walked.in_order else None, specific_tags=_SPECIFIC)
            texts = {k: _text(ds, k) for k in _TAGS}
        values = {k: v for k, v in texts.items() if k not in ("series_number", "instance_number")}
    except Rejection:
        raise
    except Exception as exc:  # pydicom raises many types for broken input; all mean "cannot parse"
        raise Rejection(CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}: {exc}") from exc
    try:
        for key, name in (("study_uid", "StudyInstanceUID"), ("series_uid", "SeriesInstanceUID"),
                          ("sop_uid", "SOPInstanceUID")):
            values[key] = validate_uid(values[key] or None, name, strict=strict_uids)
    except InvalidUID as exc:
        raise Rejection(INVALID_UID, str(exc)) from exc
    return InstanceTags(**values, series_number=_int(texts["series_number"]),
                        instance_number=_int(texts["instance_number"]))
