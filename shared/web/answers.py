"""What every DICOMweb handler answers alike: errors with their reason, UIDs in paths checked, the app's shared parts."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from shared.config import Config
from shared.contract.uids import InvalidUID, validate_uid

CONFIG = web.AppKey("config", Config)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
PRINCIPAL = web.RequestKey("principal", object)

DICOM_JSON = "application/dicom+json"
_JSON_ACCEPTED = ("application/dicom+json", "application/json", "application/*", "*/*")


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


def warning(text: str) -> str:
    """A Warning header value (PS3.18 8.6.2)."""
    return f'299 dicomflow: "{text}"'


def error(status: int, reason: str, **headers: str) -> web.Response:
    """An error answer: the reason as text and in a Warning header."""
    return web.Response(status=status, text=reason + "\n", headers={"Warning": warning(reason), **headers})


def path_uid(request: web.Request, name: str) -> str:
    """A UID of the request's path, checked (400 naming it otherwise)."""
    try:
        return validate_uid(request.match_info[name], name)
    except InvalidUID as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n", headers={"Warning": warning(str(exc))}) from exc


def base_url(request: web.Request) -> str:
    """The URL clients reach this service's DICOMweb root by (``web.public_url`` when set: behind a proxy)."""
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


async def in_thread(request: web.Request, fn, *args):
    """``fn(*args)`` on the application's worker threads (blocking database and object store calls)."""
    return await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], fn, *args)
