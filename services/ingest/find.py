"""The C-FIND service of the one DICOM AE: identifiers in, pending responses out, over the shared catalogue.

The decisions (what the identifier asks, what each response holds) are :mod:`shared.catalogue.find`'s;
here the bytes: the identifier read with the lean DICOM JSON encoder, each response identifier written
with pydicom in the presentation context's transfer syntax (a few per query: not the C-STORE hot path).

Searches run on a small pool of their own: the catalogue keeps one connection per thread that uses it
(until it is closed), and both engines run one thread per association, so searching there left a
database connection open for every association that ever queried. The catalogue is opened at the first
C-FIND, and again after an open that failed: storing must not wait for, or fail with, the catalogue's
database, and a search that fails answers 0xC000 rather than dropping the association.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from shared.audit import records as audit_records
from shared.audit import trail as audit
from shared.catalogue.find import (
    CANCEL,
    PENDING,
    SUCCESS,
    UNABLE_TO_PROCESS,
    FindError,
    parse_identifier,
    response_identifier,
)
from shared.catalogue.query import Query
from shared.catalogue.sql import SqlCatalogue
from shared.config import AccessConfig
from shared.dicom.json_model import JsonModelError, json_model
from shared.dicom.statuses import failure_cause
from shared.tenancy import tenant_of_ae

from . import metrics

log = logging.getLogger("dicomflow.ingest.find")

T = TypeVar("T")

FIND_TRANSFER_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def identifier_text(identifier: bytes, transfer_syntax: str) -> str:
    """A C-FIND/C-GET/C-MOVE identifier as DICOM JSON text, for the audit record of the request."""
    try:
        return json.dumps(json_model(identifier, transfer_syntax), sort_keys=True)
    except Exception:  # noqa: BLE001 - an unreadable identifier is audited as such, never raised
        return f"<unreadable identifier of {len(identifier)} bytes>"


def encode(model: dict, transfer_syntax: str) -> bytes:
    """A DICOM JSON model as data set bytes in an uncompressed little endian transfer syntax."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, transfer_syntax == ImplicitVRLittleEndian
    write_dataset(out, Dataset.from_json(model))
    return out.getvalue()


class Finder:
    """Answers C-FIND requests of calling AEs, each confined to its tenant.

    ``open_catalogue`` opens the catalogue, at the first C-FIND (:meth:`close` closes what it opened);
    ``searchers``: the search threads, and so the most database connections this finder holds.
    """

    def __init__(self, open_catalogue: Callable[[], SqlCatalogue], access: AccessConfig, ae_title: str,
                 max_results: int, searchers: int = 2):
        self._open_catalogue = open_catalogue
        self._catalogue: SqlCatalogue | None = None
        self._opening = threading.Lock()
        self._pool = ThreadPoolExecutor(searchers, thread_name_prefix="cfind-search")
        self.access = access
        self.ae_title = ae_title
        self.max_results = max_results

    def responses(self, identifier: bytes, transfer_syntax: str, sop_class: str, calling_ae: str
                  ) -> Iterator[tuple[int, bytes | None, str]]:
        """(status, response identifier bytes or None, error comment) of each response, pending ones first."""
        for status, model, comment in self.results(identifier, transfer_syntax, sop_class, calling_ae):
            yield status, encode(model, transfer_syntax) if model is not None else None, comment

    def results(self, identifier: bytes, transfer_syntax: str, sop_class: str, calling_ae: str
                ) -> Iterator[tuple[int, dict | None, str]]:
        """(status, response identifier as DICOM JSON or None, error comment) of each response.

        The query is audited with its final status (0xFE00 when the SCU cancelled or went away first).
        """
        final: tuple[int, str] = (CANCEL, "cancelled by the SCU")
        try:
            for status, model, comment in self._results(identifier, transfer_syntax, sop_class, calling_ae):
                if status != PENDING:
                    final = (status, comment)
                yield status, model, comment
        finally:
            audit.emit(audit_records.query(
                audit_records.dicom_peer(calling_ae, "", True, "source"), self.ae_title, sop_class,
                identifier_text(identifier, transfer_syntax), transfer_syntax, *final,
                tenant=tenant_of_ae(self.access, calling_ae) or ""))

    def _results(self, identifier: bytes, transfer_syntax: str, sop_class: str, calling_ae: str
                 ) -> Iterator[tuple[int, dict | None, str]]:
        try:
            request = parse_identifier(json_model(identifier, transfer_syntax), sop_class, self.max_results)
        except JsonModelError as exc:
            metrics.finds.labels(status=f"0x{UNABLE_TO_PROCESS:04X}").inc()
            yield UNABLE_TO_PROCESS, None, f"identifier cannot be read: {exc}"
            return
        except FindError as exc:
            metrics.finds.labels(status=f"0x{exc.status:04X}").inc()
            log.warning("C-FIND from %s refused 0x%04X: %s", calling_ae, exc.status, exc.comment)
            yield exc.status, None, exc.comment
            return
        tenant = tenant_of_ae(self.access, calling_ae)
        try:
            results = [] if tenant is None else self._pool.submit(self._search, request.query, tenant).result()
        except Exception as exc:  # noqa: BLE001 - the database is down or refused: the SCU may ask again later
            log.exception("C-FIND from %s: the catalogue search failed", calling_ae)
            metrics.finds.labels(status=f"0x{UNABLE_TO_PROCESS:04X}").inc()
            yield UNABLE_TO_PROCESS, None, f"catalogue unavailable: {failure_cause(exc)}"
            return
        log.info("C-FIND %s from %s (tenant %s): %d matches", request.level_name, calling_ae, tenant, len(results))
        for result in results:
            yield PENDING, response_identifier(request, result, self.ae_title), ""
        metrics.finds.labels(status=f"0x{SUCCESS:04X}").inc()
        yield SUCCESS, None, ""

    def _search(self, query: Query, tenant: str) -> list[dict]:
        return self._with_catalogue(lambda catalogue: catalogue.search(query, tenant, self.max_results))

    def _with_catalogue(self, fn: Callable[[SqlCatalogue], T]) -> T:
        with self._opening:
            if self._catalogue is None:
                self._catalogue = self._open_catalogue()
        return fn(self._catalogue)

    def lookup(self, fn: Callable[[SqlCatalogue], T]) -> T:
        """``fn(catalogue)`` on the search threads (C-GET and C-MOVE find their instances this way); raises
        what the open or ``fn`` raised."""
        return self._pool.submit(self._with_catalogue, fn).result()

    def close(self) -> None:
        """Stop the search threads (a search under way is finished) and close the catalogue if it was opened."""
        self._pool.shutdown(wait=True)
        if self._catalogue is not None:
            self._catalogue.close()
