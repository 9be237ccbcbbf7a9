"""The DICOMweb resources (PS3.18): QIDO-RS searches and metadata from the catalogue alone, WADO-RS retrieve.

Every handler confines itself to the caller's tenant: another tenant's study is absent (an empty
search, a 404), never forbidden, so its existence does not leak.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from opentelemetry import trace

from shared.catalogue.query import INSTANCE, SERIES, STUDY, QueryError, parse_qido
from shared.catalogue.sql import SqlCatalogue
from shared.config import Config
from shared.storage.objectstore import Backends
from shared.telemetry import extract_context

from . import metrics
from .answers import BACKENDS, CATALOGUE, CONFIG, EXECUTOR, PRINCIPAL, error, path_uid, warning
from .auth import Authenticator, Unauthorized
from .retrieve import retrieve_handler

log = logging.getLogger("dicomflow.web")
tracer = trace.get_tracer("dicomflow.web")

DICOM_JSON = "application/dicom+json"
_JSON_ACCEPTED = ("application/dicom+json", "application/json", "application/*", "*/*")
_AUTH = web.AppKey("auth", Authenticator)


def accepts_json(accept: str) -> bool:
    """Whether an Accept header admits DICOM JSON (absent: yes). Pure."""
    if not accept.strip():
        return True
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        if media.lower() in _JSON_ACCEPTED:
            return True
    return False


def _base_url(request: web.Request) -> str:
    cfg = request.app[CONFIG].web
    if cfg.public_url:
        return cfg.public_url.rstrip("/")
    host = request.host
    if ":" not in host.rsplit("]", 1)[-1] and not any(h.startswith("X-Forwarded-") for h in request.headers):
        # A direct client that left the port out of Host (dicomweb-client does): the port it reached.
        # Behind a proxy the Host is the proxy's; there, web.public_url says what clients use.
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname and sockname[1] != (443 if request.scheme == "https" else 80):
            host = f"{host}:{sockname[1]}"
    return f"{request.scheme}://{host}{cfg.path_prefix}"


async def _in_thread(request: web.Request, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], fn, *args)


def _search_handler(level: str):
    async def handle(request: web.Request) -> web.StreamResponse:
        if not accepts_json(request.headers.get("Accept", "")):
            return error(406, f"QIDO-RS answers {DICOM_JSON} only")
        cfg = request.app[CONFIG].web
        study_uid = path_uid(request, "study") if "study" in request.match_info else None
        series_uid = path_uid(request, "series") if "series" in request.match_info else None
        try:
            query = parse_qido(level, list(request.query.items()), study_uid, series_uid, cfg.max_offset)
        except QueryError as exc:
            return error(400, str(exc))
        page = min(query.limit if query.limit is not None else cfg.max_results, cfg.max_results)
        # one more than the page tells whether the maximum cut the answer short
        probe = dataclasses.replace(query, limit=page + 1)
        principal = request[PRINCIPAL]
        found = await _in_thread(request, request.app[CATALOGUE].search, probe, principal.scope, page + 1,
                                 _base_url(request))
        headers = {}
        if len(found) > page:
            found = found[:page]
            if query.limit is None or query.limit > cfg.max_results:
                headers["Warning"] = warning(f"The number of results exceeded the maximum supported by the server"
                                              f" ({cfg.max_results}). Additional results can be requested.")
        metrics.results.labels(level=level).inc(len(found))
        return web.json_response(found, content_type=DICOM_JSON, headers=headers,
                                 dumps=_dumps)
    return handle


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _metadata_handler(scope: str):
    async def handle(request: web.Request) -> web.StreamResponse:
        if not accepts_json(request.headers.get("Accept", "")):
            return error(406, f"metadata is served as {DICOM_JSON} only")
        study_uid = path_uid(request, "study")
        series_uid = path_uid(request, "series") if scope in (SERIES, INSTANCE) else None
        sop_uid = path_uid(request, "instance") if scope == INSTANCE else None
        principal = request[PRINCIPAL]
        rows = await _in_thread(request, request.app[CATALOGUE].metadata, principal.scope, study_uid, series_uid,
                                sop_uid)
        if rows is None:
            return error(404, "no such " + {STUDY: "study", SERIES: "series", INSTANCE: "instance"}[scope])
        etag = '"' + hashlib.sha256("\n".join(f"{r[1]}:{r[3]}" for r in rows).encode()).hexdigest()[:32] + '"'
        if etag in (t.strip() for t in request.headers.get("If-None-Match", "").split(",")):
            return web.Response(status=304, headers={"ETag": etag})
        base = _base_url(request)
        parts = []
        for series, sop, _, _, text in rows:
            prefix = f'"BulkDataURI":"{base}/studies/{study_uid}/series/{series}/instances/{sop}/'
            parts.append(text.replace('"BulkDataURI":"', prefix))
        body = ("[" + ",".join(parts) + "]").encode()
        return web.Response(body=body, content_type=DICOM_JSON, headers={"ETag": etag})
    return handle


@web.middleware
async def _observe(request: web.Request, handler) -> web.StreamResponse:
    """Metrics and a server span per request (continuing a caller's trace from its traceparent)."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    status = 500
    with tracer.start_as_current_span(f"{request.method} {route}", context=extract_context(request.headers),
                                      kind=trace.SpanKind.SERVER) as span:
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            span.set_attribute("http.status_code", status)
            metrics.requests.labels(route=route, method=request.method, status=str(status)).inc()
            metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)


def _cors_middleware(origins: list[str]):
    allowed = set(origins)

    @web.middleware
    async def cors(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        permitted = origin is not None and ("*" in allowed or origin in allowed)
        if request.method == "OPTIONS" and permitted and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Accept, Content-Type, If-None-Match, X-API-Key",
                "Access-Control-Max-Age": "600"})
        else:
            response = await handler(request)
        if permitted:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
            response.headers["Access-Control-Expose-Headers"] = "Warning, ETag, Content-Type, Content-Length"
            response.headers["Vary"] = "Origin"
        return response
    return cors


@web.middleware
async def _authenticate(request: web.Request, handler) -> web.StreamResponse:
    if request.method == "OPTIONS":
        return await handler(request)
    try:
        request[PRINCIPAL] = await request.app[_AUTH].principal(request.headers)
    except Unauthorized as exc:
        return error(401, str(exc), **{"WWW-Authenticate": 'Bearer realm="dicomflow"'})
    return await handler(request)


def make_app(config: Config, catalogue: SqlCatalogue) -> web.Application:
    """The aiohttp application serving ``config.web.path_prefix`` over ``catalogue``."""
    app = web.Application(middlewares=[_observe, _cors_middleware(config.web.cors_origins), _authenticate])
    executor = ThreadPoolExecutor(max_workers=config.web.threads, thread_name_prefix="catalogue")
    app[CONFIG] = config
    app[CATALOGUE] = catalogue
    app[EXECUTOR] = executor
    app[BACKENDS] = Backends(config)
    app[_AUTH] = Authenticator(config.access, executor)
    p = config.web.path_prefix.rstrip("/")
    uid = r"{%s:[^/]+}"
    study, series, instance = uid % "study", uid % "series", uid % "instance"
    routes = [
        (f"{p}/studies", _search_handler(STUDY)),
        (f"{p}/series", _search_handler(SERIES)),
        (f"{p}/instances", _search_handler(INSTANCE)),
        (f"{p}/studies/{study}/series", _search_handler(SERIES)),
        (f"{p}/studies/{study}/instances", _search_handler(INSTANCE)),
        (f"{p}/studies/{study}/series/{series}/instances", _search_handler(INSTANCE)),
        (f"{p}/studies/{study}/metadata", _metadata_handler(STUDY)),
        (f"{p}/studies/{study}/series/{series}/metadata", _metadata_handler(SERIES)),
        (f"{p}/studies/{study}/series/{series}/instances/{instance}/metadata", _metadata_handler(INSTANCE)),
        (f"{p}/studies/{study}", retrieve_handler("study")),
        (f"{p}/studies/{study}/series/{series}", retrieve_handler("series")),
        (f"{p}/studies/{study}/series/{series}/instances/{instance}", retrieve_handler("instance")),
    ]
    for path, handler in routes:
        resource = app.router.add_resource(path)
        resource.add_route("GET", handler)
        resource.add_route("OPTIONS", _options)

    async def close_executor(_app: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)
        _app[BACKENDS].close()
    app.on_cleanup.append(close_executor)
    return app


async def _options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": "GET, OPTIONS"})
