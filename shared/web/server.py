"""The DICOMweb HTTP server loop: the application with its mounts on ``web.host``:``web.port`` until stopped."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from shared.config import Config
from shared.lifecycle import stop_on_signals
from shared.telemetry import setup_tracing, start_metrics

from .app import Mount, make_app

log = logging.getLogger("dicomflow.web")


async def serve(config: Config, mounts: list[Mount], port: int | None = None, metrics_port: int | None = None,
                stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> None:
    """Serve ``mounts`` on ``config.web.host``:``port`` (default ``config.web.port``) until SIGTERM/SIGINT or ``stop``."""
    setup_tracing("web", config.telemetry)
    start_metrics(config.telemetry, metrics_port)
    app = make_app(config, mounts)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.web.host, config.web.port if port is None else port, backlog=1024,
                       reuse_address=True)
    await site.start()
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    if config.access.anonymous_tenant is not None and config.web.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("DICOMweb on %s answers requests without credentials as tenant %r: set "
                    "access.anonymous_tenant: null where the network reaches it", config.web.host,
                    config.access.anonymous_tenant)
    log.info("DICOMweb on http://%s:%d%s", config.web.host, site._server.sockets[0].getsockname()[1],
             config.web.path_prefix)
    if ready is not None:
        ready.set()
    await stop.wait()
    await runner.cleanup()
