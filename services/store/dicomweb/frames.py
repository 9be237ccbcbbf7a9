"""WADO-RS frames and bulkdata retrieve (PS3.18 10.4.1.1.3, 10.4.1.1.5, 8.7.3), read by range from the stores.

- ``.../instances/{sop}/frames/{list}``: the frames, in the order asked, one part each of a
  ``multipart/related`` answer. Native frames are ``application/octet-stream`` (little endian, as
  stored; BitsAllocated 1 frames brought to a byte boundary); encapsulated frames go out as stored,
  in their syntax's media type (``image/jpeg``, ``image/jls``, ``image/jp2``, ...), or as
  ``application/octet-stream`` when ``transfer-syntax=*`` asks for it. Nothing is transcoded: an
  Accept that needs it is a 406 naming what can be had.
- ``.../instances/{sop}/bulkdata/{path}``: the value a BulkDataURI of the metadata names, as one
  ``application/octet-stream`` part of a ``multipart/related`` answer, or bare when the Accept asks
  for ``application/octet-stream``; a bare answer honours one ``Range`` (206, or 416 with
  ``Content-Range: bytes */size``); a multipart one, and several ranges, answer whole (RFC 9110 14.2 lets a
  server ignore Range). The top level's encapsulated Pixel Data is answered frame by
  frame, as the frames resource answers it.

Integrity: these answers read parts of an object, so its whole-object blake3 digest cannot be
checked per request (that would mean reading gigabytes to send one frame). What is checked: the
object's size against the catalogue's before anything is sent, and every read's length; an object
missing, of another size, or shorter than its elements claim ends the request with a 5xx before the
answer starts, or by aborting the connection mid-answer (no closing boundary, a short body), with
a log line and ``dicomflow_web_corrupt_objects_total`` -- never with a silently short answer.
Retrieving the instance itself verifies the digest. A deflated data set is read whole (verified)
and inflated, up to ``TRANSCODE_MAX_BYTES``.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from dataclasses import dataclass

from aiohttp import web
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from shared.storage.objectstore import Backends, CorruptObject, ObjectMissing
from shared.storage.reading import CHUNK, Unavailable
from shared.web.answers import PRINCIPAL, base_url, error, in_thread, path_uid
from shared.web.audit import audit_retrieval

from . import metrics
from .keys import BACKENDS, CATALOGUE
from .negotiation import AS_STORED, parse_accept
from .pixels import (
    Encapsulated,
    FrameRange,
    LayoutError,
    Native,
    RequestError,
    check_frames,
    drive,
    extract_bits,
    frame_fragments,
    is_encapsulated,
    locate_bulk,
    locate_pixels,
    parse_frame_list,
)
from .retrieve import TRANSCODE_MAX_BYTES, _locate

log = logging.getLogger("dicomflow.web.frames")

OCTET = "application/octet-stream"
_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})

# PS3.18 table 8.7.3-4 (and -5): the media type a compressed frame goes out as, by its transfer syntax
MEDIA_TYPES = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.100": "video/mpeg2", "1.2.840.10008.1.2.4.101": "video/mpeg2",
    **{f"1.2.840.10008.1.2.4.{n}": "video/mp4" for n in range(102, 107)},
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}


# --- pure decisions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartType:
    """How each part of a frames answer is labelled: its media type and transfer syntax."""

    media_type: str
    transfer_syntax: str


def stored_media_type(transfer_syntax: str) -> str:
    """The media type of frames stored in ``transfer_syntax`` (octet-stream for native ones)."""
    return MEDIA_TYPES.get(transfer_syntax, OCTET) if is_encapsulated(transfer_syntax) else OCTET


def choose_frames(accept: str, stored: str) -> PartType | None:
    """The parts' type for frames of an instance stored in ``stored`` (None: 406). Pure.

    No Accept, ``*/*`` or ``type="*/*"``: native frames as octet-stream, compressed ones in their media
    type; ``type="application/octet-stream"``: native frames, or compressed ones with
    ``transfer-syntax=*``; ``type="image/jpeg"`` (or ``image/*``) and the like: compressed frames
    stored in a syntax of that media type. Frames are never decompressed nor recompressed here.
    """
    media = stored_media_type(stored)
    ranges = parse_accept(accept) or [parse_accept("multipart/related")[0]]
    for a in ranges:
        if a.media_type in ("*/*", "multipart/*"):
            part = "*/*"
        elif a.media_type == "multipart/related":
            part = a.part_type or "*/*"
        else:
            continue  # frames are answered as multipart/related only
        ts = a.transfer_syntax
        if not is_encapsulated(stored):
            if part in ("*/*", "application/*", OCTET) and ts in ("", AS_STORED, ExplicitVRLittleEndian):
                return PartType(OCTET, ExplicitVRLittleEndian)
            if part in ("*/*", "application/*", OCTET) and ts == ImplicitVRLittleEndian:
                return PartType(OCTET, ImplicitVRLittleEndian)  # the same pixel bytes: only the label differs
            continue
        if part == OCTET and ts in (AS_STORED, stored):
            return PartType(OCTET, stored)
        family = media.split("/")[0] + "/*"
        if part in ("*/*", media, family) and ts in ("", AS_STORED, stored):
            return PartType(media, stored)
    return None


def not_acceptable(stored: str) -> str:
    """The reason of a 406 for frames stored in ``stored``: what can be asked for instead."""
    if not is_encapsulated(stored):
        return ('native frames are served as multipart/related; type="application/octet-stream" only '
                "(no compression here)")
    media = stored_media_type(stored)
    return (f"the frames are stored as {stored} ({media}) and are not transcoded: ask for "
            f'multipart/related; type="{media}" or type="application/octet-stream"; transfer-syntax=*')


def bulk_wants_bare(accept: str) -> bool | None:
    """For a bulkdata request: True for a bare octet-stream answer, False for multipart, None: 406. Pure."""
    ranges = parse_accept(accept)
    if not ranges:
        return False
    for a in ranges:
        if a.media_type in ("*/*", "multipart/*") or (
                a.media_type == "multipart/related" and a.part_type in ("", "*/*", "application/*", OCTET)):
            return False
        if a.media_type in (OCTET, "application/*"):
            return True
    return None


class Unsatisfiable(ValueError):
    """A Range none of whose bytes exist (416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The (first, last) byte (inclusive) a ``Range`` header asks of ``size`` bytes; None: answer whole. Pure.

    One range of bytes (``a-b``, ``a-``, ``-n``); what is not that (other units, several ranges, bad
    syntax) is ignored, as RFC 9110 14.2 allows. Raises :class:`Unsatisfiable` for a range past the end.
    """
    header = header.strip()
    if not header.lower().startswith("bytes="):
        return None
    spec = header[6:].strip()
    if "," in spec or "-" not in spec:
        return None
    first, _, last = (s.strip() for s in spec.partition("-"))
    if not first:
        if not last.isdigit():
            return None
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable(spec)
        return max(0, size - n), size - 1
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable(spec)
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


# --- the object, read by range -------------------------------------------------------------------------------


class Source:
    """One instance's object, opened on its first placement: reads by range, each checked for its length.

    Blocking: call on the worker threads.
    """

    def __init__(self, backends: Backends, row: dict):
        self.row = row
        self.store, self.total = _locate(backends, row)
        if self.total != row["size"]:
            metrics.corrupt.inc()
            raise Unavailable(f"{row['sop_uid']}: object {row['digest']} in {self.store.name!r} holds {self.total} "
                              f"bytes, the catalogue says {row['size']}")
        self.transfer_syntax = row["transfer_syntax_uid"]
        self.memory: bytes | None = None
        if self.transfer_syntax == DeflatedExplicitVRLittleEndian:
            self._inflate()

    def _inflate(self) -> None:
        if self.total > TRANSCODE_MAX_BYTES:
            raise Unavailable(f"{self.row['sop_uid']}: a deflated data set of {self.total} bytes is too large to "
                              "inflate")
        try:
            data = self.store.get(self.row["digest"])  # whole, verified: deflate cannot be read by range
        except CorruptObject as exc:
            metrics.corrupt.inc()
            raise Unavailable(str(exc)) from exc
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            self.memory = inflater.decompress(data, TRANSCODE_MAX_BYTES)
        except zlib.error as exc:
            raise LayoutError(f"deflated data set cannot be inflated: {exc}") from exc
        if inflater.unconsumed_tail:
            raise Unavailable(f"{self.row['sop_uid']}: inflates to more than {TRANSCODE_MAX_BYTES} bytes")
        self.total, self.transfer_syntax = len(self.memory), ExplicitVRLittleEndian

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end of the object)."""
        if self.memory is not None:
            return self.memory[offset: offset + length]
        try:
            data, _ = self.store.read_range(self.row["digest"], offset, length)
        except (ObjectMissing, OSError) as exc:
            raise Unavailable(f"{self.row['sop_uid']}: reading {length} bytes at {offset}: {exc}") from exc
        return data

    def read_exact(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; a shorter read raises :class:`Unavailable`."""
        data = self.read(offset, length)
        if len(data) != length:
            metrics.corrupt.inc()
            raise Unavailable(f"{self.row['sop_uid']}: short read of object {self.row['digest']}: {len(data)} of "
                              f"{length} bytes at offset {offset} (the object is shorter than its elements say)")
        return data

    def walk(self, walker):
        """Run a walker of :mod:`.pixels` to its result over this object."""
        return drive(walker, self.read)

    def pixels(self) -> Native | Encapsulated:
        return self.walk(locate_pixels(self.transfer_syntax, self.total))

    def fragments(self, layout: Encapsulated, number: int) -> list:
        return self.walk(frame_fragments(layout, number, self.total))


# --- the handlers --------------------------------------------------------------------------------------------


async def _instance(request: web.Request) -> dict | web.Response:
    study, series, sop = path_uid(request, "study"), path_uid(request, "series"), path_uid(request, "instance")
    rows = await in_thread(request, request.app[CATALOGUE].instances, request[PRINCIPAL].scope, study, series, sop)
    if rows:
        audit_retrieval(request, rows[:1], "WADO-RS bulkdata" if "/bulkdata" in request.path else "WADO-RS frames")
    return rows[0] if rows else error(404, "no such instance")


async def _guarded(request: web.Request, fn, *args):
    """``fn(*args)`` on the worker threads; a Response naming the reason (4xx, 5xx) when it fails."""
    try:
        return await in_thread(request, fn, *args)
    except RequestError as exc:
        return error(exc.status, str(exc))
    except Unavailable as exc:
        log.error("%s: %s", request.path, exc)
        return error(503, "the instance's object cannot be read; try again later")
    except LayoutError as exc:
        log.error("%s: the stored data set cannot be walked: %s", request.path, exc)
        return error(500, f"the stored data set cannot be read: {exc}")


def _frame_url(request: web.Request, number: int) -> str:
    m = request.match_info
    return (f"{base_url(request)}/studies/{m['study']}/series/{m['series']}/instances/{m['instance']}"
            f"/frames/{number}")


async def _write(request: web.Request, response: web.StreamResponse, source: Source, offset: int, length: int
                 ) -> None:
    end = offset + length
    while offset < end:
        n = min(CHUNK, end - offset)
        await response.write(await in_thread(request, source.read_exact, offset, n))
        offset += n
    metrics.retrieved_bytes.inc(length)


async def _frame_parts(request: web.Request, response: web.StreamResponse, source: Source,
                       layout: Native | Encapsulated, numbers: list[int], part: PartType, boundary: str) -> None:
    """Write each frame as a part, reading it by range (at most ``CHUNK`` bytes held at a time)."""
    for number in numbers:
        if isinstance(layout, Native):
            rng: FrameRange = layout.frame(number)
            pieces = [(rng.offset, rng.length)]
            size = (rng.bits + 7) // 8 if rng.bits else rng.length
        else:
            fragments = await in_thread(request, source.fragments, layout, number)
            pieces = [(f.offset, f.length) for f in fragments]
            size = sum(f.length for f in fragments)
        await response.write(f"--{boundary}\r\nContent-Type: {part.media_type}; transfer-syntax={part.transfer_syntax}"
                             f"\r\nContent-Location: {_frame_url(request, number)}\r\nContent-Length: {size}\r\n\r\n"
                             .encode())
        if isinstance(layout, Native) and rng.bits:
            packed = await in_thread(request, source.read_exact, rng.offset, rng.length)
            await response.write(extract_bits(packed, rng.shift, rng.bits))
            metrics.retrieved_bytes.inc(size)
        else:
            for offset, length in pieces:
                await _write(request, response, source, offset, length)
        await response.write(b"\r\n")
    await response.write(f"--{boundary}--\r\n".encode())


async def _send_frames(request: web.Request, source: Source, layout, numbers: list[int], part: PartType
                       ) -> web.StreamResponse:
    try:
        check_frames(numbers, layout.frames)
        if isinstance(layout, Native):
            for n in numbers:
                layout.frame(n)  # a frame past the end of the value fails here, before the answer starts
    except RequestError as exc:
        return error(exc.status, str(exc))
    except LayoutError as exc:
        log.error("%s: %s", request.path, exc)
        return error(500, f"the stored data set cannot be read: {exc}")
    boundary = uuid.uuid4().hex
    response = web.StreamResponse(headers={
        "Content-Type": f'multipart/related; type="{part.media_type}"; boundary={boundary}'})
    await response.prepare(request)
    try:
        await _frame_parts(request, response, source, layout, numbers, part, boundary)
        await response.write_eof()
    except (Unavailable, LayoutError) as exc:
        log.error("frames of %s ended early: %s", request.path, exc)
        if request.transport is not None:
            request.transport.abort()  # no closing boundary: the client knows the answer is incomplete
    return response


async def frames_handler(request: web.Request) -> web.StreamResponse:
    """GET ``.../instances/{instance}/frames/{frames}`` (PS3.18 10.4.1.1.3)."""
    try:
        numbers = parse_frame_list(request.match_info["frames"])
    except RequestError as exc:
        return error(exc.status, str(exc))
    row = await _instance(request)
    if isinstance(row, web.Response):
        return row
    part = choose_frames(request.headers.get("Accept", ""), row["transfer_syntax_uid"])
    if part is None:
        return error(406, not_acceptable(row["transfer_syntax_uid"]))
    source = await _guarded(request, Source, request.app[BACKENDS], row)
    if isinstance(source, web.Response):
        return source
    layout = await _guarded(request, source.pixels)
    if isinstance(layout, web.Response):
        return layout
    return await _send_frames(request, source, layout, numbers, part)


async def bulkdata_handler(request: web.Request) -> web.StreamResponse:
    """GET ``.../instances/{instance}/bulkdata/{path}``: a value a BulkDataURI names (PS3.18 10.4.1.1.5)."""
    path = request.match_info["path"]
    accept = request.headers.get("Accept", "")
    bare = bulk_wants_bare(accept)
    row = await _instance(request)
    if isinstance(row, web.Response):
        return row
    source = await _guarded(request, Source, request.app[BACKENDS], row)
    if isinstance(source, web.Response):
        return source
    bulk = await _guarded(request, lambda: source.walk(locate_bulk(source.transfer_syntax, source.total, path)))
    if isinstance(bulk, web.Response):
        return bulk
    if bulk.top_pixels and bulk.encapsulated:
        # compressed pixel data: its frames, each a part in its media type (as the frames resource answers)
        part = choose_frames(accept, row["transfer_syntax_uid"])
        if part is None:
            return error(406, not_acceptable(row["transfer_syntax_uid"]) + " (encapsulated pixel data is "
                              "answered frame by frame, as multipart/related)")
        layout = await _guarded(request, source.pixels)
        if isinstance(layout, web.Response):
            return layout
        return await _send_frames(request, source, layout, list(range(1, layout.frames + 1)), part)
    if bare is None:
        return error(406, 'bulk data is served as multipart/related; type="application/octet-stream" or as '
                          "application/octet-stream")
    if bare:
        return await _send_bare(request, source, bulk.offset, bulk.length)
    boundary = uuid.uuid4().hex
    response = web.StreamResponse(headers={
        "Content-Type": f'multipart/related; type="{OCTET}"; boundary={boundary}'})
    await response.prepare(request)
    try:
        await response.write(f"--{boundary}\r\nContent-Type: {OCTET}\r\nContent-Location: {request.url}\r\n"
                             f"Content-Length: {bulk.length}\r\n\r\n".encode())
        await _write(request, response, source, bulk.offset, bulk.length)
        await response.write(f"\r\n--{boundary}--\r\n".encode())
        await response.write_eof()
    except Unavailable as exc:
        log.error("bulkdata %s ended early: %s", request.path, exc)
        if request.transport is not None:
            request.transport.abort()
    return response


async def _send_bare(request: web.Request, source: Source, offset: int, length: int) -> web.StreamResponse:
    try:
        wanted = parse_range(request.headers.get("Range", ""), length)
    except Unsatisfiable:
        return error(416, f"the range is past the end of the value ({length} bytes)",
                     **{"Content-Range": f"bytes */{length}"})
    headers = {"Content-Type": OCTET, "Accept-Ranges": "bytes"}
    status, start, count = 200, 0, length
    if wanted is not None:
        status, start, count = 206, wanted[0], wanted[1] - wanted[0] + 1
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{length}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = count  # a client sees a short body as an error, whatever the connection does
    await response.prepare(request)
    try:
        await _write(request, response, source, offset + start, count)
        await response.write_eof()
    except Unavailable as exc:
        log.error("bulkdata %s ended early: %s", request.path, exc)
        if request.transport is not None:
            request.transport.abort()
    return response
