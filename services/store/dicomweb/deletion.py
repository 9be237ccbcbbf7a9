"""DICOMweb DELETE of a study, series or instance (as the Microsoft and Google DICOM stores serve it).

``DELETE /studies/{s}[/series/{se}[/instances/{i}]]``: 204 No Content once the instances are gone from
the catalogue and their objects from the placements (Microsoft's answer; Google's long-running operation
is not needed: the work is bounded by the study), 404 when the caller's tenant has nothing there (another
tenant's study is absent, never forbidden), 400 for a malformed UID. Each ``dicom.deleted`` event is
published before the answer; if NATS cannot take them the deletion stands (a retry would find nothing
to delete) and the answer says so in a Warning header.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web
from nats.aio.client import Client as NATS

from shared.audit import trail as audit
from shared.bus.connection import connect, ensure_streams
from shared.config import Config
from shared.deletion.announce import announce
from shared.deletion.execute import Outcome, audit_record, delete
from shared.deletion.plan import Target
from shared.web.answers import CONFIG, PRINCIPAL, error, in_thread, path_uid, warning
from shared.web.audit import requestor

from .keys import BACKENDS, CATALOGUE

log = logging.getLogger("dicomflow.web.delete")


class Announcer:
    """This web process's NATS connection for the deleted events, opened at the first DELETE."""

    def __init__(self, config: Config):
        self.config = config
        self._nc: NATS | None = None
        self._lock = asyncio.Lock()

    async def publish(self, events) -> int:
        """Publish ``events``; the number not published."""
        try:
            async with self._lock:
                if self._nc is None:
                    nc = await asyncio.wait_for(connect(self.config, f"dicomflow-web-delete-{os.getpid()}"),
                                                self.config.nats.connect_timeout_s + 5)
                    await ensure_streams(nc, self.config)
                    self._nc = nc
        except Exception as exc:  # noqa: BLE001 - counted as not published, the deletion stands
            log.error("deleted events: NATS unreachable: %s", exc)
            return len(events)
        return await announce(self._nc.jetstream(), events, self.config.nats.publish_timeout_s)

    async def close(self) -> None:
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception as exc:  # noqa: BLE001 - closing at shutdown
                log.warning("nats drain: %s", exc)


ANNOUNCER = web.AppKey("delete_announcer", Announcer)


def delete_handler(level: str):
    """The DELETE handler of a study, series or instance resource."""
    async def handle(request: web.Request) -> web.StreamResponse:
        study = path_uid(request, "study")
        series = path_uid(request, "series") if level in ("series", "instance") else None
        sop = path_uid(request, "instance") if level == "instance" else None
        principal = request[PRINCIPAL]
        target = Target(principal.scope, study, series, sop)
        who = requestor(request)
        try:
            outcome = await in_thread(request, delete, request.app[CATALOGUE], request.app[BACKENDS], target,
                                      "request", principal.name)
        except Exception as exc:
            log.exception("DELETE %s failed", target.describe())
            audit.emit(_for_tenant(audit_record(_nothing(target), who.user_id, who.host, f"{type(exc).__name__}: "
                                                                                          f"{exc}"), principal))
            return error(500, f"deletion failed: {exc}")
        if not outcome.found:
            return error(404, f"no such {level}")
        audit.emit(_for_tenant(audit_record(outcome, who.user_id, who.host), principal))
        headers = {}
        unpublished = await request.app[ANNOUNCER].publish(outcome.events)
        notes = []
        if unpublished:
            notes.append(f"{unpublished} of {len(outcome.events)} dicom.deleted events could not be published")
        if outcome.failed:
            notes.append(f"{len(outcome.failed)} objects could not be removed (nothing refers to them)")
        if notes:
            headers["Warning"] = warning("; ".join(notes))
        return web.Response(status=204, headers=headers)
    return handle


def _nothing(target: Target) -> Outcome:
    return Outcome(target)


def _for_tenant(record, principal):
    if record is None:
        return None
    return record.model_copy(update={"tenant": principal.tenant or ""})


def mount_delete(app: web.Application, routes: dict[str, web.Resource]) -> None:
    """Add DELETE to the study, series and instance resources (``routes``: level -> resource)."""
    app[ANNOUNCER] = Announcer(app[CONFIG])
    for level, resource in routes.items():
        resource.add_route("DELETE", delete_handler(level))

    async def close(_app: web.Application) -> None:
        await _app[ANNOUNCER].close()
    app.on_cleanup.append(close)
