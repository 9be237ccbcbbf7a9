"""The DICOMweb resources (PS3.18): QIDO-RS searches and metadata from the catalogue alone, WADO-RS retrieve,
rendered images and thumbnails, WADO-URI; and the change feed (Microsoft's /changefeed).

Every handler confines itself to the caller's tenant: another tenant's study is absent (an empty
search, a 404), never forbidden, so its existence does not leak.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from aiohttp import web

from shared.audit import records as audit_records
from shared.audit import trail as audit
from shared.catalogue.open import open_catalogue
from shared.catalogue.query import INSTANCE, SERIES, STUDY, QueryError, parse_qido
from shared.config import Config
from shared.contract.uids import uid_url
from shared.storage.objectstore import Backends
from shared.telemetry import add_health_check
from shared.web.answers import (
    CONFIG,
    DICOM_JSON,
    PRINCIPAL,
    accepts_json,
    base_url,
    error,
    in_thread,
    path_uid,
    warning,
)
from shared.web.app import Mount
from shared.web.audit import requestor

from . import metrics
from .changefeed import add_changefeed
from .deletion import mount_delete
from .frames import bulkdata_handler, frames_handler
from .keys import BACKENDS, CATALOGUE
from .rendered import instance_handler, multipart_handler, thumbnail_handler, wado_uri
from .retrieve import retrieve_handler

log = logging.getLogger("dicomflow.web")

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
        found = await in_thread(request, request.app[CATALOGUE].search, probe, principal.scope, page + 1,
                                 base_url(request))
        headers = {}
        if len(found) > page:
            found = found[:page]
            if query.limit is None or query.limit > cfg.max_results:
                headers["Warning"] = warning(f"The number of results exceeded the maximum supported by the server"
                                              f" ({cfg.max_results}). Additional results can be requested.")
        metrics.results.labels(level=level).inc(len(found))
        audit.emit(audit_records.query(requestor(request), "DICOMweb", f"QIDO-RS {level}", request.query_string,
                                       "", 0, tenant=principal.tenant or ""))
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
        rows = await in_thread(request, request.app[CATALOGUE].metadata, principal.scope, study_uid, series_uid,
                                sop_uid)
        if rows is None:
            return error(404, "no such " + {STUDY: "study", SERIES: "series", INSTANCE: "instance"}[scope])
        etag = '"' + hashlib.sha256("\n".join(f"{r[1]}:{r[3]}" for r in rows).encode()).hexdigest()[:32] + '"'
        if etag in (t.strip() for t in request.headers.get("If-None-Match", "").split(",")):
            return web.Response(status=304, headers={"ETag": etag})
        base = base_url(request)
        parts = []
        for series, sop, _, _, text in rows:
            prefix = (f'"BulkDataURI":"{base}/studies/{uid_url(study_uid)}/series/{uid_url(series)}'
                      f'/instances/{uid_url(sop)}/')
            parts.append(text.replace('"BulkDataURI":"', prefix))
        body = ("[" + ",".join(parts) + "]").encode()
        return web.Response(body=body, content_type=DICOM_JSON, headers={"ETag": etag})
    return handle


def read_side(config: Config) -> Mount:
    """The read side's resources (QIDO-RS, metadata, WADO-RS) over the configured catalogue, as a web mount."""
    def add(app: web.Application, p: str) -> None:
        catalogue = open_catalogue(config.catalogue.url, config.data_path())
        add_health_check("catalogue", catalogue.ping)
        app[CATALOGUE] = catalogue
        app[BACKENDS] = Backends(app[CONFIG])
        uid = r"{%s:[^/]+}"
        study, series, instance = uid % "study", uid % "series", uid % "instance"
        # aiohttp tries the resources under one path prefix (all of these: /studies) in the order added, each a
        # regular expression: the viewers' hot paths (an instance, its frames, metadata) come first. The
        # patterns cannot overlap ({uid} and {frames} stop at a slash), so the order changes no answer.
        routes = [
            (f"{p}/studies/{study}/series/{series}/instances/{instance}", retrieve_handler("instance")),
            (f"{p}/studies/{study}/series/{series}/instances/{instance}/frames/{{frames}}", frames_handler),
            (f"{p}/studies/{study}/series/{series}/metadata", _metadata_handler(SERIES)),
            (f"{p}/studies/{study}/series/{series}/instances/{instance}/metadata", _metadata_handler(INSTANCE)),
            (f"{p}/studies/{study}/metadata", _metadata_handler(STUDY)),
            (f"{p}/studies/{study}/series/{series}/instances/{instance}/bulkdata/{{path:.+}}", bulkdata_handler),
            (f"{p}/studies/{study}", retrieve_handler("study")),
            (f"{p}/studies/{study}/series/{series}", retrieve_handler("series")),
            (f"{p}/studies", _search_handler(STUDY)),
            (f"{p}/series", _search_handler(SERIES)),
            (f"{p}/instances", _search_handler(INSTANCE)),
            (f"{p}/studies/{study}/series", _search_handler(SERIES)),
            (f"{p}/studies/{study}/instances", _search_handler(INSTANCE)),
            (f"{p}/studies/{study}/series/{series}/instances", _search_handler(INSTANCE)),
            # rendered (PS3.18 10.4.1.1.4): /frames/{frame}/rendered is its own resource beside /frames/{frames}
            (f"{p}/studies/{study}/rendered", multipart_handler("study")),
            (f"{p}/studies/{study}/thumbnail", thumbnail_handler("study")),
            (f"{p}/studies/{study}/series/{series}/rendered", multipart_handler("series")),
            (f"{p}/studies/{study}/series/{series}/thumbnail", thumbnail_handler("series")),
            (f"{p}/studies/{study}/series/{series}/instances/{instance}/rendered", instance_handler(False)),
            (f"{p}/studies/{study}/series/{series}/instances/{instance}/thumbnail", instance_handler(True)),
            (f"{p}/studies/{study}/series/{series}/instances/{instance}/frames/{{frame:[^/]+}}/rendered",
             instance_handler(False, frames=True)),
            (f"{p}/wado", wado_uri),  # WADO-URI (PS3.18 chapter 9), under the same prefix
        ]
        resources = {}
        for path, handler in routes:
            resources[path] = app.router.add_resource(path)
            resources[path].add_route("GET", handler)
        if config.deletion.web:
            mount_delete(app, {"study": resources[f"{p}/studies/{study}"],
                               "series": resources[f"{p}/studies/{study}/series/{series}"],
                               "instance": resources[f"{p}/studies/{study}/series/{series}/instances/{instance}"]})
        add_changefeed(app, p, config)

        async def close_backends(_app: web.Application) -> None:
            _app[BACKENDS].close()
            catalogue.close()
        app.on_cleanup.append(close_backends)
    return add
