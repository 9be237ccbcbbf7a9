"""Where an instance's frames and bulk values lie in its stored data set bytes. Pure: no I/O.

WADO-RS frames and bulkdata (PS3.18 10.4.1.1.3, 10.4.1.1.5) answer a part of an object, and a
multi-frame instance may be gigabytes: it must never be read whole. The walkers here are
generators that *ask* for the bytes they need: each ``yield Read(offset, length)`` is answered
with ``generator.send(data)`` (the shell calls ``store.read_range``); ``StopIteration.value`` is the
result. They read element headers only and skip values by their lengths, so a walk costs a few
reads of ``READ_AHEAD`` bytes however large the values it passes are, and the same walk runs over
bytes in memory in the tests (:func:`walk_bytes`).

What they understand (PS3.5 7, A.4): implicit and explicit VR little endian, the encapsulated
syntaxes (explicit VR little endian outside the pixel data), sequences of defined and undefined
length, UN sequences (read as implicit VR, as ``shared.dicom.json_model`` does), and the pixel data's
Basic and Extended Offset Tables. A deflated data set has to be inflated whole first (by the
shell); big endian (retired) is refused.

- :func:`locate_pixels` -> :class:`Native` (value offset and length, the pixel description, and per
  frame the byte range and, for BitsAllocated 1, the bit offset) or :class:`Encapsulated` (the Basic
  Offset Table, the Extended Offset Table, or the fragments found by scanning);
  :func:`frame_fragments` -> the fragments of one encapsulated frame;
- :func:`locate_bulk` -> (offset, length) of the value a BulkDataURI of the metadata names:
  ``7FE00010``, ``<seq tag>/<item index>/<tag>``, ... walked exactly as ``json_model`` makes them;
- :func:`parse_frame_list`, :func:`extract_bits`: the frame list of a URL, a bit-packed frame
  brought to a byte boundary.

Errors name the HTTP status they become: :class:`RequestError` (400, 404, 406, 501: the request or
what can be made of this instance), :class:`LayoutError` (the stored object cannot be walked or is
shorter than its elements say: a server fault, 500, never an answer cut short silently).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

READ_AHEAD = 64 * 1024  # bytes asked for at each miss: the head of a data set fits in one or two
MAX_TABLE_BYTES = 64 * 1024 * 1024  # offset tables read whole: 8 M frames' worth at most
MAX_FRAMES_IN_LIST = 65536

PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA = 0x7FE00010, 0x7FE00008, 0x7FE00009
EXTENDED_OFFSET_TABLE, EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00001, 0x7FE00002
_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED, _NUMBER_OF_FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280100, \
    0x00280008
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})


class RequestError(ValueError):
    """What was asked cannot be answered from this instance; ``status`` is the HTTP status it becomes."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class LayoutError(ValueError):
    """The stored data set cannot be walked (malformed, or shorter than its elements claim): a 500."""


@dataclass(frozen=True)
class Read:
    """A walker's request: ``length`` bytes from ``offset`` of the object (fewer only at its end)."""

    offset: int
    length: int


Walk = Generator[Read, bytes, object]


@dataclass(frozen=True)
class FrameRange:
    """Where one native frame lies: read ``length`` bytes from ``offset``; for bit-packed pixels the
    frame is the ``bits`` bits from bit ``shift`` of those bytes (:func:`extract_bits`)."""

    offset: int
    length: int
    shift: int = 0
    bits: int = 0


@dataclass(frozen=True)
class Native:
    """Native (uncompressed) pixel data: the value's place and what divides it into frames."""

    offset: int
    length: int
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @property
    def frame_bits(self) -> int:
        return self.rows * self.columns * self.samples * self.bits_allocated

    def frame(self, number: int) -> FrameRange:
        """The range of frame ``number`` (1-based; :func:`check_frames` first)."""
        bits = self.frame_bits
        start_bit = (number - 1) * bits
        if bits % 8 == 0:
            rng = FrameRange(self.offset + start_bit // 8, bits // 8)
        else:  # BitsAllocated 1: frames are packed one after the other, not on byte boundaries
            first, last = start_bit // 8, (start_bit + bits + 7) // 8
            rng = FrameRange(self.offset + first, last - first, start_bit % 8, bits)
        if rng.offset + rng.length > self.offset + self.length:
            raise LayoutError(f"frame {number} of {self.frames} lies past the end of the pixel data "
                              f"({self.length} bytes for {self.frames} frames of {bits} bits)")
        return rng


@dataclass(frozen=True)
class Fragment:
    """One item of encapsulated pixel data: its value's offset in the object, and its length."""

    offset: int
    length: int


@dataclass(frozen=True)
class Encapsulated:
    """Encapsulated pixel data: where its items start and how frames map onto fragments.

    ``first`` is the offset of the first fragment's item tag, which both offset tables count from.
    Exactly one of ``offsets`` (Basic Offset Table), ``extended`` (Extended Offset Table) or
    ``fragments`` (all of them, scanned: no table) says where frames are.
    """

    offset: int  # the value (the Basic Offset Table item)
    first: int
    frames: int
    offsets: tuple[int, ...] = ()
    extended: tuple[int, ...] = ()
    fragments: tuple[Fragment, ...] = ()


def check_frames(numbers: list[int], frames: int) -> None:
    """404 for a frame number the instance does not have (PS3.18 10.4.1.1.3: not present)."""
    for n in numbers:
        if n > frames:
            raise RequestError(404, f"frame {n} of {frames} frame{'s' if frames != 1 else ''}: not present")


def parse_frame_list(text: str) -> list[int]:
    """The frame numbers of a ``frames/{list}`` path ("1,3,5"), in order; 400 when malformed."""
    parts = text.split(",")
    if len(parts) > MAX_FRAMES_IN_LIST:
        raise RequestError(400, f"at most {MAX_FRAMES_IN_LIST} frame numbers in one request")
    out = []
    for part in parts:
        part = part.strip()
        if not part.isdigit() or not part.isascii() or int(part) < 1:
            raise RequestError(400, f"frame list {text!r}: {part!r} is not a frame number (1, 2, ...)")
        out.append(int(part))
    return out


def parse_bulk_path(text: str) -> list[int | str]:
    """The tags and item indexes of a bulk path ("7FE00010", "00089215/0/7FE00010"); 400 when malformed."""
    parts = text.strip("/").split("/")
    if len(parts) % 2 != 1:
        raise RequestError(400, f"bulkdata path {text!r}: expected <tag> or <sequence tag>/<item index>/<tag>")
    out: list[int | str] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if len(part) != 8 or any(c not in "0123456789abcdefABCDEF" for c in part):
                raise RequestError(400, f"bulkdata path {text!r}: {part!r} is not an 8 hex digit tag")
            out.append(int(part, 16))
        else:
            if not part.isdigit() or not part.isascii():
                raise RequestError(400, f"bulkdata path {text!r}: {part!r} is not an item index")
            out.append(part)
    return out


def extract_bits(data: bytes, shift: int, bits: int) -> bytes:
    """``bits`` bits from bit ``shift`` of ``data`` (LSB first, PS3.5 8.1.1), as bytes starting on a byte
    boundary; unused high bits of the last byte are zero."""
    value = int.from_bytes(data, "little") >> shift
    value &= (1 << bits) - 1
    return value.to_bytes((bits + 7) // 8, "little")


# --- the walk ------------------------------------------------------------------------------------------------


def _dictionary_vr(tag: int) -> str:
    group, elem = tag >> 16, tag & 0xFFFF
    if group & 1:
        return "LO" if 0x0010 <= elem <= 0x00FF else "UN"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if " or " in vr:  # as json_model resolves them for native little endian
        return "OW" if vr == "OB or OW" else ("US" if vr.startswith("US or SS") else vr.split(" or ")[0])
    return vr


class _Cursor:
    """A window over the object, refilled by asking the shell (one ``Read`` per miss)."""

    def __init__(self, total: int, read_ahead: int):
        self.total, self.read_ahead = total, read_ahead
        self.start, self.buf = 0, b""

    def get(self, offset: int, n: int) -> Walk:
        if offset < 0 or offset + n > self.total:
            raise LayoutError(f"{n} bytes at offset {offset} lie past the end of the data set ({self.total} bytes)")
        if self.start <= offset and offset + n <= self.start + len(self.buf):
            return self.buf[offset - self.start: offset - self.start + n]
        data = yield Read(offset, max(n, min(self.read_ahead, self.total - offset)))
        if len(data) < n:
            raise LayoutError(f"short read: {len(data)} of {n} bytes at offset {offset} of an object of "
                              f"{self.total} bytes")
        self.start, self.buf = offset, bytes(data)
        return self.buf[:n]

    def header(self, pos: int, implicit: bool) -> Walk:
        """(tag, vr, length, value offset) of the element (or item) at ``pos``."""
        raw = yield from self.get(pos, min(12, self.total - pos) if self.total - pos >= 8 else 8)
        group, elem, = struct.unpack_from("<HH", raw)
        tag = group << 16 | elem
        if implicit or group == 0xFFFE:
            (length,) = struct.unpack_from("<L", raw, 4)
            return tag, ("" if group == 0xFFFE else _dictionary_vr(tag)), length, pos + 8
        vr = raw[4:6].decode("latin-1")
        if not (vr.isalpha() and vr.isupper()):
            raise LayoutError(f"invalid VR {vr!r} at offset {pos}")
        if vr in _LONG_VRS:
            if len(raw) < 12:
                raise LayoutError(f"truncated element header at offset {pos}")
            return tag, vr, struct.unpack_from("<L", raw, 8)[0], pos + 12
        return tag, vr, struct.unpack_from("<H", raw, 6)[0], pos + 8


def _is_sequence(tag: int, vr: str, length: int, implicit: bool) -> tuple[bool, bool]:
    """(whether the element is a sequence, whether its items are implicit VR), as json_model decides."""
    value_implicit = implicit
    if vr == "UN" and tag != PIXEL_DATA and (known := _dictionary_vr(tag)) != "UN":
        vr, value_implicit = known, True  # a known element sent as UN: its dictionary VR, implicit VR (PS3.5 6.2.2)
    if vr == "SQ":
        return True, value_implicit
    if length == _UNDEFINED and vr == "UN":
        return True, True
    return False, value_implicit


def _skip_value(cur: _Cursor, tag: int, vr: str, length: int, value: int, implicit: bool) -> Walk:
    """The offset after an element's value (walking undefined-length ones)."""
    seq, value_implicit = _is_sequence(tag, vr, length, implicit)
    if length != _UNDEFINED:
        return value + length
    if seq:
        return (yield from _skip_sequence(cur, value, value_implicit))
    fragments, end = yield from _scan_fragments(cur, value)
    return end


def _skip_sequence(cur: _Cursor, pos: int, implicit: bool) -> Walk:
    """Past an undefined-length sequence whose first item is at ``pos``."""
    while True:
        tag, _, length, value = yield from cur.header(pos, True)
        if tag == _SEQ_END:
            return value
        if tag != _ITEM:
            raise LayoutError(f"expected an item at offset {pos}, found {tag:08X}")
        pos = value + length if length != _UNDEFINED else (yield from _skip_item(cur, value, implicit))


def _skip_item(cur: _Cursor, pos: int, implicit: bool) -> Walk:
    """Past an undefined-length item's elements and its delimiter."""
    while True:
        tag, vr, length, value = yield from cur.header(pos, implicit)
        if tag == _ITEM_END:
            return value
        pos = yield from _skip_value(cur, tag, vr, length, value, implicit)


def _scan_fragments(cur: _Cursor, pos: int, stop: int | None = None) -> Walk:
    """The items from ``pos`` up to the sequence delimiter (or to offset ``stop``), and the offset after."""
    out = []
    while stop is None or pos < stop:
        tag, _, length, value = yield from cur.header(pos, True)
        if tag == _SEQ_END:
            if stop is not None:
                raise LayoutError(f"pixel data ends at offset {pos}, before offset {stop} its offset table names")
            return out, value
        if tag != _ITEM or length == _UNDEFINED:
            raise LayoutError(f"expected a fragment at offset {pos}, found {tag:08X} (length {length:#x})")
        if value + length > cur.total:
            raise LayoutError(f"fragment at offset {pos} claims {length} bytes past the end of the data set")
        out.append(Fragment(value, length))
        pos = value + length
    if pos != stop:
        raise LayoutError(f"a fragment crosses offset {stop}, where the offset table says a frame starts")
    return out, pos


def _check_syntax(transfer_syntax: str) -> bool:
    """Whether the syntax is implicit VR; refuses those this walker cannot read."""
    if transfer_syntax == ExplicitVRBigEndian:
        raise RequestError(406, "frames and bulk data of a big endian data set (a retired syntax) are not served; "
                                "retrieve the instance")
    return transfer_syntax == ImplicitVRLittleEndian


def locate_pixels(transfer_syntax: str, total: int, read_ahead: int = READ_AHEAD) -> Walk:
    """Walk a data set of ``total`` bytes to its pixel data: returns :class:`Native` or :class:`Encapsulated`.

    404 when the instance has no pixel data. Reads the elements before the pixel data (headers, and
    the values of the pixel description and offset tables), then only the pixel data's first items.
    """
    implicit = _check_syntax(transfer_syntax)
    cur = _Cursor(total, read_ahead)
    attrs: dict[int, int] = {}
    tables: dict[int, tuple[int, ...]] = {}
    pos = 0
    while pos < total:
        tag, vr, length, value = yield from cur.header(pos, implicit)
        if tag in (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA):
            return (yield from _pixels(cur, tag, length, value, attrs, tables))
        if tag > PIXEL_DATA:
            break
        if tag in (_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED) and length == 2:
            attrs[tag] = struct.unpack("<H", (yield from cur.get(value, 2)))[0]
        elif tag == _NUMBER_OF_FRAMES and 0 < length <= 16:
            text = (yield from cur.get(value, length)).decode("latin-1").strip(" \0")
            try:
                attrs[tag] = int(text)
            except ValueError as exc:
                raise LayoutError(f"Number of Frames {text!r} is not a number") from exc
        elif tag in (EXTENDED_OFFSET_TABLE, EXTENDED_OFFSET_TABLE_LENGTHS) and 0 < length != _UNDEFINED:
            if length > MAX_TABLE_BYTES or length % 8:
                raise LayoutError(f"Extended Offset Table of {length} bytes")
            raw = yield from cur.get(value, length)
            tables[tag] = struct.unpack(f"<{length // 8}Q", raw)
        pos = yield from _skip_value(cur, tag, vr, length, value, implicit)
    raise RequestError(404, "the instance has no pixel data")


def _pixels(cur: _Cursor, tag: int, length: int, value: int, attrs: dict, tables: dict) -> Walk:
    frames = attrs.get(_NUMBER_OF_FRAMES, 1) or 1
    if length != _UNDEFINED:
        rows, columns = attrs.get(_ROWS, 0), attrs.get(_COLUMNS, 0)
        samples = attrs.get(_SAMPLES, 1)
        bits = attrs.get(_BITS_ALLOCATED, {FLOAT_PIXEL_DATA: 32, DOUBLE_PIXEL_DATA: 64}.get(tag, 0))
        if not (rows and columns and samples and bits):
            raise LayoutError(f"pixel description incomplete: Rows {rows}, Columns {columns}, "
                              f"Samples per Pixel {samples}, Bits Allocated {bits}")
        if bits != 1 and bits % 8:
            raise LayoutError(f"Bits Allocated {bits} is neither 1 nor a multiple of 8")
        if value + length > cur.total:
            raise LayoutError(f"pixel data claims {length} bytes past the end of the data set")
        return Native(value, length, rows, columns, samples, bits, frames)
    if tag != PIXEL_DATA:
        raise LayoutError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length")
    item, _, bot_length, bot_value = yield from cur.header(value, True)
    if item != _ITEM or bot_length == _UNDEFINED or bot_length % 4 or bot_length > MAX_TABLE_BYTES:
        raise LayoutError(f"encapsulated pixel data at offset {value} does not start with a Basic Offset Table item")
    first = bot_value + bot_length
    if bot_length:
        raw = yield from cur.get(bot_value, bot_length)
        offsets = struct.unpack(f"<{bot_length // 4}L", raw)
        if len(offsets) != frames:
            raise LayoutError(f"the Basic Offset Table has {len(offsets)} entries for {frames} frames")
        if list(offsets) != sorted(offsets):
            raise LayoutError("the Basic Offset Table is not in ascending order")
        return Encapsulated(value, first, frames, offsets=offsets)
    extended = tables.get(EXTENDED_OFFSET_TABLE)
    if extended:
        if len(extended) != frames:
            raise LayoutError(f"the Extended Offset Table has {len(extended)} entries for {frames} frames")
        return Encapsulated(value, first, frames, extended=extended)
    fragments, _ = yield from _scan_fragments(cur, first)
    if len(fragments) != frames and frames != 1:
        raise RequestError(501, f"{len(fragments)} fragments for {frames} frames and no offset table: "
                                "the frames' boundaries are not known; retrieve the instance")
    return Encapsulated(value, first, frames, fragments=tuple(fragments))


def frame_fragments(layout: Encapsulated, number: int, total: int, read_ahead: int = 4096) -> Walk:
    """The fragments of frame ``number`` (1-based) of encapsulated pixel data: a list of :class:`Fragment`."""
    cur = _Cursor(total, read_ahead)
    if layout.fragments:
        if layout.frames == 1:
            return list(layout.fragments)
        return [layout.fragments[number - 1]]
    if layout.extended:
        pos = layout.first + layout.extended[number - 1]
        tag, _, length, value = yield from cur.header(pos, True)  # each frame is one fragment (PS3.5 A.4)
        if tag != _ITEM or length == _UNDEFINED or value + length > total:
            raise LayoutError(f"the Extended Offset Table names offset {pos} for frame {number}: no fragment there")
        return [Fragment(value, length)]
    start = layout.first + layout.offsets[number - 1]
    stop = layout.first + layout.offsets[number] if number < layout.frames else None
    if stop is None:
        fragments, _ = yield from _scan_fragments(cur, start)
    else:
        fragments, _ = yield from _scan_fragments(cur, start, stop)
    if not fragments:
        raise LayoutError(f"frame {number} has no fragments")
    return fragments


@dataclass(frozen=True)
class Bulk:
    """A bulk value: ``length`` bytes from ``offset``; ``encapsulated``: undefined-length pixel data
    (``length`` then counts its items and delimiter, -1 for the top level's, which is answered by frames);
    ``top_pixels``: it is the instance's Pixel Data."""

    offset: int
    length: int
    vr: str
    encapsulated: bool = False
    top_pixels: bool = False


def locate_bulk(transfer_syntax: str, total: int, path: str, read_ahead: int = READ_AHEAD) -> Walk:
    """Walk to the bulk value a BulkDataURI path names: returns a :class:`Bulk`; 404 when absent or not bulk.

    The path is the one ``json_model`` writes: ``<tag>`` at the top level, ``<seq tag>/<item index>/``
    before each nested level (items counted from 0).
    """
    steps = parse_bulk_path(path)
    implicit = _check_syntax(transfer_syntax)
    cur = _Cursor(total, read_ahead)
    pos, end, in_item = 0, total, False
    depth = 0
    while True:
        target = steps[depth]
        found = None
        while pos < end:
            tag, vr, length, value = yield from cur.header(pos, implicit)
            if tag == _ITEM_END and in_item:
                break
            if tag == target:
                found = (tag, vr, length, value)
                break
            if tag > target and tag != _ITEM_END:
                break  # elements are in ascending order (PS3.5 7.1)
            pos = yield from _skip_value(cur, tag, vr, length, value, implicit)
        if found is None:
            raise RequestError(404, f"no element {target:08X} at bulkdata/{path}")
        tag, vr, length, value = found
        if depth == len(steps) - 1:
            seq, _ = _is_sequence(tag, vr, length, implicit)
            if seq or vr not in BULK_VRS:
                raise RequestError(404, f"bulkdata/{path} is a {'sequence' if seq else vr} element, not bulk data")
            top_pixels = depth == 0 and tag == PIXEL_DATA
            if length == _UNDEFINED:
                if top_pixels:  # answered frame by frame (locate_pixels): no need to scan it here
                    return Bulk(value, -1, vr, encapsulated=True, top_pixels=True)
                _, after = yield from _scan_fragments(cur, value)
                return Bulk(value, after - value, vr, encapsulated=True)
            if value + length > total:
                raise LayoutError(f"bulkdata/{path} claims {length} bytes past the end of the data set")
            return Bulk(value, length, vr, top_pixels=top_pixels)
        seq, implicit = _is_sequence(tag, vr, length, implicit)
        if not seq:
            raise RequestError(404, f"bulkdata/{path}: {tag:08X} is not a sequence")
        index = int(steps[depth + 1])
        seq_end = None if length == _UNDEFINED else value + length
        pos = value
        for i in range(index + 1):
            if seq_end is not None and pos >= seq_end:
                raise RequestError(404, f"bulkdata/{path}: sequence {tag:08X} has {i} item{'s' if i != 1 else ''}")
            item, _, item_length, item_value = yield from cur.header(pos, True)
            if item == _SEQ_END:
                raise RequestError(404, f"bulkdata/{path}: sequence {tag:08X} has {i} item{'s' if i != 1 else ''}")
            if item != _ITEM:
                raise LayoutError(f"expected an item at offset {pos}, found {item:08X}")
            if i < index:
                pos = (item_value + item_length if item_length != _UNDEFINED
                       else (yield from _skip_item(cur, item_value, implicit)))
            else:
                pos = item_value
                in_item = True
                end = total if item_length == _UNDEFINED else item_value + item_length
        depth += 2


# --- running a walk over bytes in memory (tests, inflated data sets) -----------------------------------------


def drive(walk: Walk, read: Callable[[int, int], bytes]):
    """Run a walker to its result, answering each of its reads with ``read(offset, length)``."""
    try:
        request = next(walk)
        while True:
            request = walk.send(read(request.offset, request.length))
    except StopIteration as stop:
        return stop.value


def walk_bytes(walk: Walk, data: bytes):
    """Run a walker over a data set held in memory."""
    return drive(walk, lambda offset, length: data[offset: offset + length])


def is_encapsulated(transfer_syntax: str) -> bool:
    """Whether pixel data in this syntax is encapsulated (compressed)."""
    return UID(transfer_syntax).is_encapsulated
