"""WADO-RS retrieve of studies, series and instances (PS3.18 10.4), streamed from the object stores.

Each instance goes out as a Part-10 file: the file meta written here, then the data set read from the
first placement that holds it in chunks of ``CHUNK`` bytes, hashed with blake3 as it goes
(:mod:`shared.storage.reading`: the last chunk only once the whole matched). Memory per request stays
at about one chunk whatever the study's or the instance's size. One instance served as stored is
looked up, opened and its first chunk read in one executor hop and answered with a Content-Length;
studies, series and transcoded instances go chunked. An object whose bytes do not match its digest
ends the response without its last chunk and closing boundary (the client sees an incomplete answer,
never wrong bytes presented as whole), with the reason in the log and
``dicomflow_web_corrupt_objects_total``. Transcoding between the uncompressed syntaxes needs the data
set whole (pydicom): only up to ``TRANSCODE_MAX_BYTES``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
from aiohttp import web

from shared.dicom.part10 import part10
from shared.storage.objectstore import Backends, CorruptObject, ObjectStore
from shared.storage.reading import Unavailable, locate, open_verified
from shared.web.answers import EXECUTOR, PRINCIPAL, error, path_uid
from shared.web.audit import audit_retrieval

from . import metrics
from .keys import BACKENDS, CATALOGUE
from .negotiation import AS_STORED, Choice, choose

log = logging.getLogger("dicomflow.web.retrieve")

TRANSCODE_MAX_BYTES = 256 * 1024 * 1024


def _locate(backends: Backends, row: dict) -> tuple[ObjectStore, int]:
    """(store, size) of the first placement that holds the instance's object (blocking)."""
    try:
        return locate(backends, row["digest"], row["placements"])
    except Unavailable as exc:
        raise Unavailable(f"{row['sop_uid']}: {exc}") from None


def transcode(data: bytes, row: dict, target: str) -> bytes:
    """The instance as a Part-10 file in another uncompressed transfer syntax (blocking, whole in memory)."""
    ds = pydicom.dcmread(io.BytesIO(part10(data, row["sop_class_uid"], row["sop_uid"], row["transfer_syntax_uid"])))
    ds.file_meta.TransferSyntaxUID = target
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


Opened = tuple[int, Iterator[tuple[bytes, bool]], bytes, bool]  # size, the rest of its chunks, first chunk, is last


class CorruptInstance(Unavailable):
    """The placement read does not match the instance's digest."""


def _opened_in(backends: Backends, row: dict) -> Opened:
    """(size, the rest of its verified chunks, first chunk, is last) of the instance (blocking): one
    executor hop finds, opens, reads and (for an object of one chunk) verifies most instances."""
    try:
        size, chunks = open_verified(backends, row["digest"], row["placements"])
        first, last = next(chunks)
    except Unavailable as exc:
        raise Unavailable(f"{row['sop_uid']}: {exc}") from None
    except CorruptObject as exc:
        metrics.corrupt.inc()
        raise CorruptInstance(f"{row['sop_uid']}: {exc}") from None
    return size, chunks, first, last


class Streamer:
    """Writes instances into a response, verified as they are read.

    Small pieces (a part's headers, the file meta, the CRLF and boundary between parts) are held back
    and go out with the next write rather than each as a write of its own: a multipart instance was
    four or five sends.
    """

    def __init__(self, backends: Backends, executor, response: web.StreamResponse):
        self.backends, self.executor, self.response = backends, executor, response
        self._held: list[bytes] = []

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def hold(self, data: bytes) -> None:
        """Send ``data`` before whatever is written next (a few hundred bytes at most)."""
        self._held.append(data)

    async def write(self, data: bytes) -> None:
        """Write ``data`` after what is held; a large chunk goes on its own, after the held bytes."""
        if self._held:
            if len(data) <= 64 * 1024:
                self._held.append(data)
                data = b""
            held, self._held = b"".join(self._held), []
            await self.response.write(held)
        if data:
            await self.response.write(data)

    async def flush(self) -> None:
        """Write what is held."""
        await self.write(b"")

    async def write_instance(self, row: dict, transfer_syntax: str, opened: Opened | Unavailable | None = None
                             ) -> None:
        """One instance as a Part-10 file, in ``transfer_syntax`` ("*": as stored).

        ``opened``: the instance's object as :func:`_opened_in` opened it (or why it could not), already.
        """
        stored = row["transfer_syntax_uid"]
        if transfer_syntax not in (AS_STORED, stored):
            store, size = await self._run(_locate, self.backends, row)
            if size > TRANSCODE_MAX_BYTES:
                raise Unavailable(f"{row['sop_uid']}: {size} bytes is too large to transcode")
            try:
                data = await self._run(store.get, row["digest"])  # verified whole
            except CorruptObject as exc:
                metrics.corrupt.inc()
                raise Unavailable(str(exc)) from exc
            await self.write(await self._run(transcode, data, row, transfer_syntax))
            return
        if opened is None:
            opened = await self._run(_opened_in, self.backends, row)
        if isinstance(opened, Unavailable):
            raise opened
        size, chunks, chunk, last = opened
        self.hold(part10(b"", row["sop_class_uid"], row["sop_uid"], stored))
        await self.write(chunk)
        while not last:
            try:
                chunk, last = await self._run(next, chunks)  # the last chunk only once the digest matched
            except CorruptObject as exc:
                metrics.corrupt.inc()
                raise Unavailable(f"{row['sop_uid']}: {exc}") from None
            await self.write(chunk)
        metrics.retrieved_bytes.inc(size)


@dataclass
class Found:
    """What a retrieve's one executor hop found: the catalogue rows, how to answer (None: 406), and for a lone
    instance served as stored its object opened with the first chunk read, or why it could not be."""

    rows: list[dict]
    choice: Choice | None
    opened: Opened | Unavailable | None = None


def _find(catalogue, backends: Backends, scope: str | None, study: str, series: str | None, sop: str | None,
          accept: str, single: bool) -> Found:
    """The request's rows and answer, and a lone instance's first chunk (blocking).

    An instance download was two executor hops (the catalogue lookup, then the open and first read), each a
    thread hand-off and a wake-up of the event loop; the size read here also lets its answer have a length.
    """
    rows = catalogue.instances(scope, study, series, sop)
    if not rows:
        return Found(rows, None)
    found = Found(rows, choose(accept, [r["transfer_syntax_uid"] for r in rows], single))
    if found.choice is not None and len(rows) == 1 and \
            found.choice.transfer_syntax in (AS_STORED, rows[0]["transfer_syntax_uid"]):
        try:
            found.opened = _opened_in(backends, rows[0])
        except Unavailable as exc:
            found.opened = exc  # raised where the stream would have opened it: after the 200 and the audit
    return found


def retrieve_handler(level: str):
    """The GET handler of a study, series or instance (``level``) resource."""
    async def handle(request: web.Request) -> web.StreamResponse:
        study = path_uid(request, "study")
        series = path_uid(request, "series") if level in ("series", "instance") else None
        sop = path_uid(request, "instance") if level == "instance" else None
        executor = request.app[EXECUTOR]
        backends = request.app[BACKENDS]
        found = await asyncio.get_running_loop().run_in_executor(
            executor, _find, request.app[CATALOGUE], backends, request[PRINCIPAL].scope, study, series, sop,
            request.headers.get("Accept", ""), level == "instance")
        rows, choice = found.rows, found.choice
        if not rows:
            return error(404, f"no such {level}")
        if choice is None:
            stored = sorted({r["transfer_syntax_uid"] for r in rows})
            return error(406, f"cannot answer in the transfer syntax asked for: stored as {', '.join(stored)}; "
                               f"ask for transfer-syntax=* to get it as stored")
        if isinstance(found.opened, Unavailable):
            # A lone instance that cannot be served is known before its answer starts: an error status, not a 200
            # cut short. Corrupt bytes stay corrupt (500); a placement that cannot be read may come back (503).
            log.error("retrieve of %s refused: %s", request.path, found.opened)
            if isinstance(found.opened, CorruptInstance):
                return error(500, "the stored instance does not match its digest; an administrator is told")
            return error(503, "the stored instance cannot be read now; try again", **{"Retry-After": "5"})
        audit_retrieval(request, rows, "WADO-RS")
        return await _stream(request, rows, choice, backends, executor, found.opened)
    return handle


async def _stream(request: web.Request, rows: list[dict], choice: Choice, backends: Backends, executor,
                  opened: Opened | Unavailable | None = None) -> web.StreamResponse:
    """Stream ``rows`` as ``choice`` says; ``opened``: the first row's object, already opened (:func:`_find`)."""
    def syntax(row: dict) -> str:
        return row["transfer_syntax_uid"] if choice.transfer_syntax == AS_STORED else choice.transfer_syntax

    boundary = secrets.token_hex(16)
    if choice.multipart:
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    else:
        content_type = f"application/dicom; transfer-syntax={syntax(rows[0])}"
    response = web.StreamResponse(headers={"Content-Type": content_type})

    def part_headers(row: dict) -> bytes:
        if not choice.multipart:
            return b""
        return f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax(row)}\r\n\r\n".encode()
    between = b"\r\n" if choice.multipart else b""
    closing = f"--{boundary}--\r\n".encode() if choice.multipart else b""
    if isinstance(opened, tuple):
        # A lone instance of known size, as stored: a Content-Length instead of chunked encoding, whose
        # framing of each write made aiohttp join (copy) every chunk on Python before 3.12.9. A client also
        # sees a corrupt object's cut answer as short of its length.
        row = rows[0]
        meta = part10(b"", row["sop_class_uid"], row["sop_uid"], row["transfer_syntax_uid"])
        response.content_length = len(part_headers(row)) + len(meta) + opened[0] + len(between) + len(closing)
    await response.prepare(request)
    streamer = Streamer(backends, executor, response)
    try:
        for i, row in enumerate(rows):
            streamer.hold(part_headers(row))
            await streamer.write_instance(row, syntax(row), opened if i == 0 else None)
            streamer.hold(between)
        streamer.hold(closing)
        await streamer.flush()
        await response.write_eof()
    except Unavailable as exc:
        log.error("retrieve of %s ended early: %s", request.path, exc)
        if request.transport is not None:
            request.transport.abort()  # no closing boundary (nor all of its length): the client knows it is incomplete
    return response
