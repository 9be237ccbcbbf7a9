"""``dicomflow web``: one DICOMweb service, the store's read side (QIDO-RS, WADO-RS) and the ingest's STOW-RS
on one port and one base URL; stateless, so run as many as the load needs."""

from __future__ import annotations

import asyncio

from services.ingest.stow import stow
from services.store.dicomweb.resources import read_side
from shared.config import Config
from shared.web.server import serve as serve_mounts


async def serve(config: Config, port: int | None = None, metrics_port: int | None = None,
                stop: asyncio.Event | None = None, ready: asyncio.Event | None = None,
                listen_fd: int | None = None) -> None:
    """Serve DICOMweb until SIGTERM/SIGINT or ``stop`` (``ready`` is set once the port listens).

    ``listen_fd``: a listening socket inherited from ``dicomflow run`` (several replicas on one port).
    """
    mounts = [read_side(config), *([stow(config)] if config.web.stow else [])]
    await serve_mounts(config, mounts, port, metrics_port, stop, ready, listen_fd)
