"""The C-FIND service of the one DICOM AE: identifiers in, pending responses out, over the shared catalogue.

The decisions (what the identifier asks, what each response holds) are :mod:`shared.catalogue.find`'s;
here the bytes: the identifier read with the lean DICOM JSON encoder, each response identifier written
with pydicom in the presentation context's transfer syntax (a few per query: not the C-STORE hot path).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from shared.catalogue.find import (
    PENDING,
    SUCCESS,
    UNABLE_TO_PROCESS,
    FindError,
    parse_identifier,
    response_identifier,
)
from shared.catalogue.sql import SqlCatalogue
from shared.config import AccessConfig
from shared.dicom.json_model import JsonModelError, json_model
from shared.tenancy import tenant_of_ae

from . import metrics

log = logging.getLogger("dicomflow.ingest.find")

IMPLICIT_LE = "1.2.840.10008.1.2"
FIND_TRANSFER_SYNTAXES = frozenset({IMPLICIT_LE, "1.2.840.10008.1.2.1"})


def encode(model: dict, transfer_syntax: str) -> bytes:
    """A DICOM JSON model as data set bytes in an uncompressed little endian transfer syntax."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, transfer_syntax == IMPLICIT_LE
    write_dataset(out, Dataset.from_json(model))
    return out.getvalue()


class Finder:
    """Answers C-FIND requests of calling AEs, each confined to its tenant."""

    def __init__(self, catalogue: SqlCatalogue, access: AccessConfig, ae_title: str, max_results: int):
        self.catalogue = catalogue
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
        """(status, response identifier as DICOM JSON or None, error comment) of each response."""
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
        results = self.catalogue.search(request.query, tenant, self.max_results) if tenant is not None else []
        log.info("C-FIND %s from %s (tenant %s): %d matches", request.level_name, calling_ae, tenant, len(results))
        for result in results:
            yield PENDING, response_identifier(request, result, self.ae_title), ""
        metrics.finds.labels(status=f"0x{SUCCESS:04X}").inc()
        yield SUCCESS, None, ""
