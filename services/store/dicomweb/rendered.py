"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.4, 8.3.5) and WADO-URI (PS3.18 chapter 9).

The handlers wire I/O around the pure ``rendering`` module: parameters are checked first (400/406 before any
read), the catalogue says which instance (in the caller's tenant only: another tenant's is 404), the object is
read whole and verified (``store.get``, up to ``web.render_max_bytes``: 413 above) and rendered on the worker
threads, never on the event loop. A series' or study's ``rendered`` is multipart/related of each instance's first
frame, each read, rendered and written before the next is read, so a request holds one instance at a time.
"""

from __future__ import annotations

import logging
import uuid

from aiohttp import web
from pydicom.uid import ExplicitVRLittleEndian

from shared.contract.uids import InvalidUID, validate_uid
from shared.storage.objectstore import Backends, CorruptObject, ObjectMissing
from shared.storage.reading import Unavailable
from shared.web.answers import CONFIG, EXECUTOR, PRINCIPAL, error, in_thread, path_uid, warning
from shared.web.audit import audit_retrieval

from . import metrics
from .keys import BACKENDS, CATALOGUE
from .negotiation import AS_STORED, can_serve
from .rendering import (
    THUMBNAIL,
    RenderError,
    RenderParams,
    parse_frame,
    parse_rendered,
    parse_wado_uri,
    render,
    wado_uri_content_type,
)
from .retrieve import Streamer, _locate

log = logging.getLogger("dicomflow.web.rendered")


class TooLarge(Exception):
    """An object above ``web.render_max_bytes``."""


def read_object(backends: Backends, row: dict, limit: int) -> bytes:
    """An instance's data set bytes, whole and verified, from the first placement that holds them (blocking)."""
    if row["size"] is not None and row["size"] > limit:
        raise TooLarge(f"{row['sop_uid']}: {row['size']} bytes is above web.render_max_bytes ({limit})")
    store, size = _locate(backends, row)
    if size > limit:
        raise TooLarge(f"{row['sop_uid']}: {size} bytes is above web.render_max_bytes ({limit})")
    try:
        return store.get(row["digest"])
    except CorruptObject as exc:
        metrics.corrupt.inc()
        raise Unavailable(str(exc)) from exc
    except (ObjectMissing, OSError) as exc:
        raise Unavailable(f"{row['sop_uid']}: {exc}") from exc


def _read_and_render(backends: Backends, row: dict, limit: int, frame: int, params: RenderParams
                     ) -> tuple[bytes, str]:
    """Read then render one instance's frame (blocking: one trip to the worker threads)."""
    return render(read_object(backends, row, limit), row["transfer_syntax_uid"], frame, params)


def is_image(row: dict) -> bool:
    """Whether the catalogue saw pixel dimensions (SR, presentation states and the like have none)."""
    return bool(row.get("n_rows")) and bool(row.get("n_columns"))


async def _answer_one(request: web.Request, row: dict, frame: int, params: RenderParams) -> web.StreamResponse:
    """One instance's frame as one image, or the error that stopped it."""
    audit_retrieval(request, [row], "WADO-URI" if request.path.endswith("/wado") else "WADO-RS rendered")
    frames = int(row.get("number_of_frames") or 1)
    if frame > frames and is_image(row):
        return error(404, f"no frame {frame}: the instance has {frames}")
    limit = request.app[CONFIG].web.render_max_bytes
    try:
        body, media = await in_thread(request, _read_and_render, request.app[BACKENDS], row, limit, frame, params)
    except RenderError as exc:
        return error(exc.status, str(exc))
    except TooLarge as exc:
        return error(413, str(exc))
    except Unavailable as exc:
        log.error("rendering %s failed: %s", request.path, exc)
        return error(503, f"the instance cannot be read: {exc}")
    return web.Response(body=body, content_type=media)


def _middle(rows: list[dict]) -> dict | None:
    """The middle image of a series' instances (the catalogue lists them by InstanceNumber)."""
    images = [r for r in rows if is_image(r)]
    return images[(len(images) - 1) // 2] if images else None


async def _rows(request: web.Request, study: str, series: str | None = None, sop: str | None = None) -> list[dict]:
    return await in_thread(request, request.app[CATALOGUE].instances, request[PRINCIPAL].scope, study, series, sop)


def instance_handler(thumbnail: bool, frames: bool = False):
    """GET .../instances/{i}/rendered, .../frames/{n}/rendered and .../instances/{i}/thumbnail."""
    async def handle(request: web.Request) -> web.StreamResponse:
        study, series, sop = path_uid(request, "study"), path_uid(request, "series"), path_uid(request, "instance")
        try:
            frame = parse_frame(request.match_info["frame"]) if frames else 1
            params = parse_rendered(list(request.query.items()), request.headers.get("Accept", ""),
                                    default_viewport=THUMBNAIL if thumbnail else None)
        except RenderError as exc:
            return error(exc.status, str(exc))
        rows = await _rows(request, study, series, sop)
        if not rows:
            return error(404, "no such instance")
        return await _answer_one(request, rows[0], frame, params)
    return handle


def thumbnail_handler(level: str):
    """GET /studies/{s}/thumbnail and /studies/{s}/series/{se}/thumbnail: the middle image of the series (of the
    study: of its first series by SeriesNumber that has images), as one image."""
    async def handle(request: web.Request) -> web.StreamResponse:
        study = path_uid(request, "study")
        series = path_uid(request, "series") if level == "series" else None
        try:
            params = parse_rendered(list(request.query.items()), request.headers.get("Accept", ""),
                                    default_viewport=THUMBNAIL)
        except RenderError as exc:
            return error(exc.status, str(exc))
        rows = await _rows(request, study, series)
        if not rows:
            return error(404, f"no such {level}")
        if level == "study":
            rows = await _in_series_order(request, study, rows)
        row = None
        for series_uid in dict.fromkeys(r["series_uid"] for r in rows):  # a series of reports has no thumbnail
            row = _middle([r for r in rows if r["series_uid"] == series_uid])
            if row is not None:
                break
        if row is None:
            return error(406, f"the {level} has no image to render")
        return await _answer_one(request, row, 1, params)
    return handle


async def _in_series_order(request: web.Request, study: str, rows: list[dict]) -> list[dict]:
    """A study's instances with its series in SeriesNumber order (the catalogue lists them by series UID),
    InstanceNumber order kept within each."""
    listed = await in_thread(request, request.app[CATALOGUE].series_of, request[PRINCIPAL].scope, study)
    rank = {s["series_uid"]: i for i, s in enumerate(listed)}
    return sorted(rows, key=lambda r: rank.get(r["series_uid"], len(rank)))


def multipart_handler(level: str):
    """GET /studies/{s}/rendered and /studies/{s}/series/{se}/rendered: multipart/related of every image's
    first frame (series by SeriesNumber, instances by InstanceNumber), one instance read and rendered at a time."""
    async def handle(request: web.Request) -> web.StreamResponse:
        study = path_uid(request, "study")
        series = path_uid(request, "series") if level == "series" else None
        try:
            params = parse_rendered(list(request.query.items()), request.headers.get("Accept", ""), multipart=True)
        except RenderError as exc:
            return error(exc.status, str(exc))
        rows = await _rows(request, study, series)
        if not rows:
            return error(404, f"no such {level}")
        if level == "study":
            rows = await _in_series_order(request, study, rows)
        images = [r for r in rows if is_image(r)]
        if not images:
            return error(406, f"the {level} has no image to render")
        limit, backends = request.app[CONFIG].web.render_max_bytes, request.app[BACKENDS]
        boundary = uuid.uuid4().hex
        response: web.StreamResponse | None = None
        skipped: list[str] = []
        try:
            for row in images:
                try:
                    body, media = await in_thread(request, _read_and_render, backends, row, limit, 1, params)
                except (RenderError, TooLarge) as exc:
                    # an instance that cannot be rendered (a syntax not decoded here, too large) is left out,
                    # as a viewer would; the others still come
                    skipped.append(f"{row['sop_uid']}: {exc}")
                    continue
                if response is None:
                    response = web.StreamResponse(headers={
                        "Content-Type": f'multipart/related; type="{media}"; boundary={boundary}'})
                    await response.prepare(request)
                await response.write(f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode())
                await response.write(body)
                await response.write(b"\r\n")
        except Unavailable as exc:
            log.error("rendering %s ended early: %s", request.path, exc)
            if response is None:
                return error(503, f"an instance cannot be read: {exc}")
            if request.transport is not None:
                request.transport.abort()  # no closing boundary: the client knows the answer is incomplete
            return response
        if skipped:
            log.warning("rendering %s left out %d instance(s): %s", request.path, len(skipped), "; ".join(skipped))
        if response is None:
            return error(406, f"no instance of the {level} can be rendered: {skipped[0]}")
        await response.write(f"--{boundary}--\r\n".encode())
        await response.write_eof()
        return response
    return handle


# --- WADO-URI ---------------------------------------------------------------------------------------------------

WADO_URI_PARAMS = {"requestType", "studyUID", "seriesUID", "objectUID", "contentType", "charset", "anonymize",
                   "annotation", "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber",
                   "imageQuality", "presentationUID", "presentationSeriesUID", "transferSyntax"}


def _wado_uri_query(request: web.Request) -> dict[str, str]:
    """The WADO-URI query, checked: required parameters and UIDs (a ``web.HTTPBadRequest`` naming the parameter)."""
    q: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in WADO_URI_PARAMS:
            raise _bad(f"{key}: not a WADO-URI parameter")
        if key in q:
            raise _bad(f"{key}: given more than once")
        q[key] = value
    if "requestType" not in q:
        raise _bad("requestType: missing (WADO-URI needs requestType=WADO)")
    if q["requestType"] != "WADO":
        raise _bad(f"requestType: {q['requestType']!r} is not WADO")
    for name in ("studyUID", "seriesUID", "objectUID"):
        if name not in q:
            raise _bad(f"{name}: missing")
        try:
            validate_uid(q[name], name)
        except InvalidUID as exc:
            raise _bad(str(exc)) from exc
    if q.get("anonymize", "").lower() == "yes":
        raise _bad("anonymize: de-identification is not supported", 406)
    if "presentationUID" in q or "presentationSeriesUID" in q:
        raise _bad("presentationUID: presentation states are not applied", 406)
    return q


def _bad(reason: str, status: int = 400) -> web.HTTPException:
    """An error to raise from the query's checks, answered as ``error`` answers."""
    cls = web.HTTPNotAcceptable if status == 406 else web.HTTPBadRequest
    return cls(text=reason + "\n", headers={"Warning": warning(reason)})


async def wado_uri(request: web.Request) -> web.StreamResponse:
    """GET {prefix}/wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..[&contentType=..] (PS3.18 9)."""
    q = _wado_uri_query(request)
    rows = await _rows(request, q["studyUID"], q["seriesUID"], q["objectUID"])
    if not rows:
        return error(404, "no such instance")
    row = rows[0]
    media = wado_uri_content_type(q.get("contentType"), is_image(row))
    if media is None:
        return error(406, f"contentType: cannot answer {q['contentType']!r}: application/dicom, image/jpeg, "
                          f"image/png or image/gif")
    if media == "application/dicom":
        return await _wado_uri_file(request, row, q.get("transferSyntax"))
    try:
        params, frame = parse_wado_uri(q, media)
    except RenderError as exc:
        return error(exc.status, str(exc))
    return await _answer_one(request, row, frame, params)


async def _wado_uri_file(request: web.Request, row: dict, asked: str | None) -> web.StreamResponse:
    """The instance as a Part-10 file: in ``transferSyntax`` when given (406 when it cannot be met), else Explicit
    VR Little Endian when the stored syntax transcodes to it (the default of PS3.18 chapter 9), else as stored
    (a compressed object: it is not decompressed here)."""
    audit_retrieval(request, [row], "WADO-URI")
    stored = row["transfer_syntax_uid"]
    if asked:
        if asked != AS_STORED:
            try:
                validate_uid(asked, "transferSyntax")
            except InvalidUID as exc:
                return error(400, str(exc))
        if not can_serve(asked, stored):
            return error(406, f"transferSyntax: cannot answer in {asked}: stored as {stored}")
        ts = stored if asked == AS_STORED else asked
    else:
        ts = ExplicitVRLittleEndian if can_serve(ExplicitVRLittleEndian, stored) else stored
    response = web.StreamResponse(headers={"Content-Type": f"application/dicom; transfer-syntax={ts}"})
    await response.prepare(request)
    try:
        streamer = Streamer(request.app[BACKENDS], request.app[EXECUTOR], response)
        await streamer.write_instance(row, ts)
        await streamer.flush()
        await response.write_eof()
    except Unavailable as exc:
        log.error("WADO-URI of %s ended early: %s", row["sop_uid"], exc)
        if request.transport is not None:
            request.transport.abort()  # cut short: the client sees an incomplete answer, never wrong bytes
    return response
