"""What every DICOMweb handler answers alike: errors with their reason, UIDs in paths checked, the app's parts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from shared.catalogue.sql import SqlCatalogue
from shared.config import Config
from shared.contract.uids import InvalidUID, validate_uid
from shared.storage.objectstore import Backends

CATALOGUE = web.AppKey("catalogue", SqlCatalogue)
CONFIG = web.AppKey("config", Config)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
BACKENDS = web.AppKey("backends", Backends)
PRINCIPAL = web.RequestKey("principal", object)


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
