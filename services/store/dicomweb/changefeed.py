"""The change feed over HTTP in the Microsoft DICOM service's shape: ``GET /changefeed`` (a page of entries from a
sequence) and ``GET /changefeed/latest`` (the newest entry), confined to the caller's tenant.

Entries come from the DICOM_CHANGES stream (:mod:`shared.changefeed.reading`); each one's State and,
with ``includeMetadata`` (the default, as Microsoft's), the instance's DICOM JSON come from the
catalogue, so they say what holds now. The NATS connection is opened at the first request and again after
one that failed: QIDO-RS and WADO-RS in the same process never wait for NATS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import nats
from aiohttp import web

from shared.audit import records as audit_records
from shared.audit import trail as audit
from shared.bus.connection import connect
from shared.bus.jetstream import JetStreamAPIError
from shared.changefeed import reading
from shared.changefeed.describe import describe
from shared.changefeed.entries import FeedQueryError, parse_page
from shared.config import Config
from shared.web.answers import CONFIG, PRINCIPAL, base_url, error, in_thread
from shared.web.audit import requestor

from . import metrics
from .keys import CATALOGUE

log = logging.getLogger("dicomflow.web.changefeed")


class FeedConnection:
    """This web process's NATS connection for reading the feed, opened on first use."""

    def __init__(self, config: Config):
        self.config = config
        self._nc = None
        self._lock = asyncio.Lock()

    async def get(self):
        """The connection (raises when NATS cannot be reached within the connect timeout)."""
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                timeout = self.config.nats.connect_timeout_s * (len(self.config.nats_servers()) + 1) + 1
                self._nc = await asyncio.wait_for(connect(self.config, f"dicomflow-changefeed-{os.getpid()}",
                                                          max_reconnect_attempts=-1), timeout)
            return self._nc

    async def close(self) -> None:
        """Drain the connection if it was opened."""
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()


FEED = web.AppKey("changefeed_nats", FeedConnection)
THROUGH = "Changefeed-Through"


async def _unavailable(exc: BaseException) -> web.Response:
    log.warning("change feed unavailable: %s: %s", type(exc).__name__, exc)
    metrics.changefeed_failures.inc()
    return error(503, "the change feed is unavailable: NATS cannot be reached; try again", **{"Retry-After": "5"})


async def _read_feed(request: web.Request, read):
    """The page the query asks for and what ``read(nc, config, scope, page)`` found in the feed for the caller,
    or the answer instead: 400 for a malformed query, 503 while NATS cannot be reached."""
    config = request.app[CONFIG]
    try:
        page = parse_page(request.query.items(), config.changefeed.max_limit)
    except FeedQueryError as exc:
        return None, error(400, str(exc))
    try:
        nc = await request.app[FEED].get()
        return page, await read(nc, config, request[PRINCIPAL].scope, page)
    except (OSError, TimeoutError, nats.errors.Error, JetStreamAPIError) as exc:
        return None, await _unavailable(exc)


async def changefeed_handler(request: web.Request) -> web.StreamResponse:
    """``GET /changefeed?startSequence=&offset=&limit=&includeMetadata=``: a JSON array of entries, and in the
    ``Changefeed-Through`` header the last sequence the page looked at."""
    page, found = await _read_feed(request, lambda nc, config, scope, page: reading.read(
        nc, config.access, scope, page.limit, page.start))
    if page is None:
        return found
    entries = await in_thread(request, describe, request.app[CATALOGUE], found.changes, page.include_metadata,
                              base_url(request))
    metrics.changefeed_entries.inc(len(entries))
    audit.emit(audit_records.query(requestor(request), "DICOMweb", "changefeed", request.query_string, "", 0,
                                   tenant=request[PRINCIPAL].tenant or ""))
    # the last sequence looked at: a tenant's client may go on after it instead of after its own last entry,
    # and skip re-reading the other tenants' entries in between (no more is told than the gaps already tell)
    return web.json_response(entries, dumps=_dumps, headers={THROUGH: str(found.through)})


async def latest_handler(request: web.Request) -> web.StreamResponse:
    """``GET /changefeed/latest``: the newest entry the caller may see, as one JSON object (``{}``: none yet)."""
    page, newest = await _read_feed(request, lambda nc, config, scope, _page: reading.latest(
        nc, config.access, scope))
    if page is None:
        return newest
    if newest is None:
        return web.json_response({})
    entries = await in_thread(request, describe, request.app[CATALOGUE], [newest], page.include_metadata,
                              base_url(request))
    return web.json_response(entries[0], dumps=_dumps)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def add_changefeed(app: web.Application, prefix: str, config: Config) -> None:
    """The two change feed resources, beside the read side (whose catalogue they use)."""
    app[FEED] = FeedConnection(config)
    app.router.add_resource(f"{prefix}/changefeed").add_route("GET", changefeed_handler)
    app.router.add_resource(f"{prefix}/changefeed/latest").add_route("GET", latest_handler)

    async def close(_app: web.Application) -> None:
        await _app[FEED].close()
    app.on_cleanup.append(close)
