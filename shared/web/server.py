"""The DICOMweb HTTP server loop: the application with its mounts on ``web.host``:``web.port`` until stopped.

Stopping drains: on SIGTERM (or ``stop``) the process stops accepting at once, lets the requests in flight
finish (a WADO-RS study stream can take a while) for up to ``web.drain_s``, then cancels what is left and
exits. aiohttp's ``AppRunner.cleanup()`` does exactly that in this order (close the listening sockets, close
idle keep-alive connections, wait ``shutdown_timeout`` for the handlers, cancel them); connections still
being answered get ``Connection: close``.

Several processes may serve one port: ``listen_fd`` is a listening socket made by a supervisor
(``dicomflow run`` with ``web.replicas`` > 1) and inherited by each; the kernel hands each new connection to
one of the processes waiting in accept, so one that dies or drains loses none of the later ones.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web

from shared.audit import trail as audit
from shared.config import Config
from shared.lifecycle import stop_on_signals
from shared.telemetry import setup_tracing, start_metrics
from shared.tls import server_context

from .app import Mount, make_app

log = logging.getLogger("dicomflow.web")


async def serve(config: Config, mounts: list[Mount], port: int | None = None, metrics_port: int | None = None,
                stop: asyncio.Event | None = None, ready: asyncio.Event | None = None,
                listen_fd: int | None = None) -> None:
    """Serve ``mounts`` on ``config.web.host``:``port`` (default ``config.web.port``) until SIGTERM/SIGINT or ``stop``.

    ``listen_fd``: an inherited listening socket to serve instead of binding one (the port is then its).
    """
    setup_tracing("web", config.telemetry)
    start_metrics(config.telemetry, metrics_port)
    audit.install(config, "web")
    app = make_app(config, mounts)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=config.web.drain_s)
    await runner.setup()
    # HTTPS where a certificate is configured (the handshake in the event loop, never blocking other requests)
    tls = server_context(config.web.tls_cert, config.web.tls_key) if config.web.tls_cert else None
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
        sock.setblocking(False)
        site: web.BaseSite = web.SockSite(runner, sock, ssl_context=tls)
    else:
        site = web.TCPSite(runner, config.web.host, config.web.port if port is None else port, backlog=1024,
                           reuse_address=True, ssl_context=tls)
    await site.start()
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    if config.access.anonymous_tenant is not None and config.web.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("DICOMweb on %s answers requests without credentials as tenant %r: set "
                    "access.anonymous_tenant: null where the network reaches it", config.web.host,
                    config.access.anonymous_tenant)
    host, bound = site._server.sockets[0].getsockname()[:2]
    log.info("DICOMweb on %s://%s:%d%s%s", "https" if tls else "http", host, bound, config.web.path_prefix,
             " (inherited socket)" if listen_fd is not None else "")
    if ready is not None:
        ready.set()
    await stop.wait()
    await drain(runner, config.web.drain_s)
    await asyncio.to_thread(audit.close, 2)
    log.info("DICOMweb stopped")


async def drain(runner: web.AppRunner, drain_s: float) -> None:
    """Stop accepting, let the requests in flight finish (at most ``drain_s``), then flush what they wrote.

    ``runner.cleanup()`` returns once the handlers are done, but the last bytes of a large answer may still
    be in the transports' buffers; leaving then (``asyncio.run`` closing the loop) would cut the answer
    short. So the transports are taken before cleanup and awaited until empty, within the same deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_s
    for site in list(runner.sites):  # no new connections from here on
        await site.stop()
    await asyncio.sleep(0)
    connections = runner.server.connections if runner.server is not None else []
    transports = [c.transport for c in connections if c.transport is not None]
    log.info("DICOMweb stopping: no new connections; draining %d open connection(s) (at most %.0f s)",
             len(transports), drain_s)
    await runner.cleanup()  # waits up to shutdown_timeout (drain_s) for the handlers, then cancels them
    while any(t.get_write_buffer_size() for t in transports) and loop.time() < deadline:
        await asyncio.sleep(0.02)
