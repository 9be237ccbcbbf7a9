"""The aiohttp application of DICOMweb: the middlewares every resource shares, and the resources mounted on it.

A *mount* is a function ``(app, prefix) -> None`` that adds its resources (and their cleanup) to the
application: the read side (QIDO-RS, WADO-RS) is the store's, STOW-RS the ingest's, so one port and
one base URL serve them all while neither service imports the other. Each resource answers OPTIONS
with the methods it has.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from opentelemetry import trace

from shared.audit import trail as audit
from shared.audit.records import authentication_failed
from shared.config import Config
from shared.telemetry import extract_context

from . import metrics
from .answers import CONFIG, EXECUTOR, PRINCIPAL, error
from .auth import AUTHENTICATOR, Authenticator, Unauthorized

tracer = trace.get_tracer("dicomflow.web")

Mount = Callable[[web.Application, str], None]


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
            requests_total, seconds = _request_metrics(route, request.method, status)
            requests_total.inc()
            seconds.observe(time.perf_counter() - started)


@functools.lru_cache(maxsize=1024)
def _request_metrics(route: str, method: str, status: int):
    """The request counter and latency histogram children of one route, method and status.

    Kept, because ``labels()`` checks and looks its labels up under a lock on every call: a few percent
    of a WADO-RS instance download's event-loop time (py-spy under bench/retrieve_ab.py's load).
    """
    return (metrics.requests.labels(route=route, method=method, status=str(status)),
            metrics.request_seconds.labels(route=route))


def _cors(origins: list[str]):
    """The CORS middleware (answers a permitted preflight) and the response-prepare hook that names the origin.

    The headers go on in the hook, just before a response's headers are sent, rather than on what the handler
    returns: a streamed answer (a WADO-RS retrieve) has sent its headers by then, and an answer raised as an
    exception (a 400 for a bad UID) returns nothing to the middleware, so neither had them.
    """
    allowed = set(origins)

    def permitted(request: web.BaseRequest) -> str | None:
        origin = request.headers.get("Origin")
        return origin if origin is not None and ("*" in allowed or origin in allowed) else None

    @web.middleware
    async def cors(request: web.Request, handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and permitted(request) and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Accept, Content-Type, If-None-Match, Range, "
                                                "X-API-Key",
                "Access-Control-Max-Age": "600"})
        return await handler(request)

    async def name_origin(request: web.BaseRequest, response: web.StreamResponse) -> None:
        origin = permitted(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
            response.headers["Access-Control-Expose-Headers"] = ("Warning, ETag, Content-Type, Content-Length, "
                                                                 "Content-Range, Accept-Ranges")
            response.headers["Vary"] = "Origin"
    return cors, name_origin


@web.middleware
async def _authenticate(request: web.Request, handler) -> web.StreamResponse:
    if request.method == "OPTIONS":
        return await handler(request)
    try:
        request[PRINCIPAL] = await request.app[AUTHENTICATOR].principal(request.headers)
    except Unauthorized as exc:
        audit.emit(authentication_failed("", request.remote or "", str(exc), "HTTP"))
        return error(401, str(exc), **{"WWW-Authenticate": 'Bearer realm="dicomflow"'})
    return await handler(request)


def make_app(config: Config, mounts: Iterable[Mount]) -> web.Application:
    """The application serving ``config.web.path_prefix``, with every mount's resources on it."""
    cors, name_origin = _cors(config.web.cors_origins)
    app = web.Application(middlewares=[_observe, cors, _authenticate], client_max_size=1024 ** 2)
    app.on_response_prepare.append(name_origin)
    executor = ThreadPoolExecutor(max_workers=config.web.threads, thread_name_prefix="web")
    app[CONFIG] = config
    app[EXECUTOR] = executor
    app[AUTHENTICATOR] = Authenticator(config.access, executor)
    prefix = config.web.path_prefix.rstrip("/")
    for mount in mounts:
        mount(app, prefix)
    # Two mounts may serve one path (GET and POST /studies): OPTIONS, on the first, names both's methods.
    methods: dict[str, set[str]] = {}
    first: dict[str, web.AbstractResource] = {}
    for resource in app.router.resources():
        methods.setdefault(resource.canonical, set()).update(route.method for route in resource)
        first.setdefault(resource.canonical, resource)
    for path, resource in first.items():
        if "OPTIONS" not in methods[path]:
            resource.add_route("OPTIONS", _options(", ".join(sorted(methods[path] | {"OPTIONS"}))))

    async def close_executor(_app: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)
    app.on_cleanup.append(close_executor)
    return app


def _options(allow: str):
    async def options(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Allow": allow})
    return options
