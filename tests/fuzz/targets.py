"""The fuzz targets: each takes the fuzzer's bytes and must either return or raise the one exception type its
parser documents for bad input (a :class:`~services.ingest.pdu.ProtocolError`, a
:class:`~shared.dicom.statuses.Rejection`, a 400/406/416 of the HTTP layer). Anything else (an IndexError,
a struct.error, a RecursionError escaping, a hang) is a crash the fuzzer reports; each one found becomes a
file under ``regressions/<target>/``, replayed by ``tests/test_fuzz.py``.

Pure functions only (no sockets, no files), so the fuzzer runs them thousands of times a second.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import atheris

from services.ingest import pdu
from services.ingest.scp import SUPPORTED
from services.store.dicomweb import frames, negotiation, pixels, rendering
from shared.catalogue.query import QueryError, parse_qido
from shared.dicom.statuses import Rejection
from shared.dicom.tags import read_tags

_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")


def associate_rq(data: bytes) -> None:
    """An A-ASSOCIATE-RQ body through parsing, screening, negotiation and the A-ASSOCIATE-AC we would send."""
    try:
        req = pdu.parse_associate_rq(data)
    except pdu.ProtocolError:
        return
    if pdu.screen_associate_rq(req) is not None:
        return
    neg = pdu.negotiate(req, req.called_ae, [], SUPPORTED)
    if neg.reject is not None:
        return
    ac = pdu.associate_ac(req, neg, 16384)
    max_pdu, results = pdu.parse_associate_ac(ac[6:])  # what we send must read back
    assert max_pdu == 16384 and set(results) == {cid for cid, *_ in neg.results}, (max_pdu, results)


def data_phase(data: bytes) -> None:
    """A stream of PDUs after the association: header checks, PDV items, DIMSE message order."""
    messages = pdu.DimseAssembler({1: ("1.2.840.10008.5.1.4.1.1.2", ""), 3: ("1.2.840.10008.1.1", "")})
    pos = 0
    try:
        while pos + 6 <= len(data):
            kind, length = struct.unpack_from(">BxI", data, pos)
            pdu.check_pdu_header(kind, length, True, 4096)
            body = memoryview(data)[pos + 6: pos + 6 + length]
            pos += 6 + length
            if kind == pdu.P_DATA_TF:
                for cid, is_command, last, fragment in pdu.pdvs(body):
                    messages.pdv(cid, is_command, last, fragment)
    except pdu.ProtocolError:
        pass


def tag_reader(data: bytes) -> None:
    """A C-STORE's data set (first byte: which transfer syntax) through the routing-tag reader."""
    if not data:
        return
    try:
        read_tags(data[1:], _TRANSFER_SYNTAXES[data[0] % len(_TRANSFER_SYNTAXES)])
    except Rejection:
        pass


_QIDO_KEYS = ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "SeriesNumber",
              "InstanceNumber", "includefield", "fuzzymatching", "limit", "offset", "00100010", "0020000D",
              "ReferencedStudySequence.ReferencedSOPClassUID", "StudyDescription", "PatientBirthDate")


def _pairs(fdp: atheris.FuzzedDataProvider, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)] if fdp.ConsumeBool() else fdp.ConsumeUnicode(12)
        out.append((key, fdp.ConsumeUnicode(40)))
    return out


def qido(data: bytes) -> None:
    """QIDO-RS query parameters at each level."""
    fdp = atheris.FuzzedDataProvider(data)
    level = ("STUDY", "SERIES", "IMAGE")[fdp.ConsumeIntInRange(0, 2)]
    study = fdp.ConsumeUnicode(20) if fdp.ConsumeBool() else None
    try:
        parse_qido(level, _pairs(fdp, _QIDO_KEYS), study_uid=study)
    except QueryError:
        pass


_RENDER_KEYS = ("window", "viewport", "quality", "accept", "annotation", "iccprofile", "charset", "windowCenter",
                "windowWidth", "rows", "columns", "region", "frameNumber", "imageQuality", "contentType")


def rendered(data: bytes) -> None:
    """The rendered resources' parameters (PS3.18 8.3.5), WADO-URI's, a frame number in a path."""
    fdp = atheris.FuzzedDataProvider(data)
    pairs = _pairs(fdp, _RENDER_KEYS)
    accept = fdp.ConsumeUnicode(60)
    try:
        rendering.parse_rendered(pairs, accept, multipart=fdp.ConsumeBool())
    except rendering.RenderError as exc:
        assert exc.status in (400, 406), exc.status
    try:
        rendering.parse_wado_uri(dict(pairs), "image/jpeg")
    except rendering.RenderError as exc:
        assert exc.status == 400, exc.status
    try:
        rendering.parse_frame(fdp.ConsumeUnicode(12))
    except rendering.RenderError:
        pass
    rendering.choose_media(accept, fdp.ConsumeBool())
    rendering.wado_uri_content_type(fdp.ConsumeUnicode(40), fdp.ConsumeBool())


def retrieve_params(data: bytes) -> None:
    """WADO-RS: Accept negotiation, a frame list, a bulk data path, a Range header."""
    fdp = atheris.FuzzedDataProvider(data)
    accept = fdp.ConsumeUnicode(80)
    stored = _TRANSFER_SYNTAXES[fdp.ConsumeIntInRange(0, 3)]
    negotiation.parse_accept(accept)
    negotiation.choose(accept, [stored], fdp.ConsumeBool())
    frames.choose_frames(accept, stored)
    frames.bulk_wants_bare(accept)
    for parse in (pixels.parse_frame_list, pixels.parse_bulk_path):
        try:
            parse(fdp.ConsumeUnicode(40))
        except pixels.RequestError as exc:
            assert exc.status == 400, exc.status
    size = fdp.ConsumeIntInRange(0, 1 << 40)
    try:
        got = frames.parse_range(fdp.ConsumeUnicode(40), size)
    except frames.Unsatisfiable:
        return
    if got is not None:
        assert 0 <= got[0] <= got[1] < size, (got, size)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "associate_rq": associate_rq, "data_phase": data_phase, "tag_reader": tag_reader, "qido": qido,
    "rendered": rendered, "retrieve_params": retrieve_params}
