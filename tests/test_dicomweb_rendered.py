"""WADO-RS rendered/thumbnail and WADO-URI against the real service (requests, dicomweb-client), and the pure
renderer's parameters, window functions and pixels without I/O."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from dicomflow.synthetic import new_uid
from services.store.dicomweb import rendering
from services.store.dicomweb.rendering import (
    LINEAR,
    LINEAR_EXACT,
    SIGMOID,
    RenderError,
    RenderParams,
    Viewport,
    Window,
    apply_window,
    choose_media,
    fit,
    parse_rendered,
    parse_viewport,
    parse_wado_uri,
    parse_window,
    render,
    wado_uri_content_type,
)
from shared.catalogue.entry import InstanceFacts, entry_from_model
from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.dicom.json_model import json_model
from shared.storage.objectstore import Backends, content_digest
from shared.tenancy import api_key_hash
from tests.helpers import dataset_bytes, encode
from tests.test_dicomweb_wado import data_set_of
from tests.web_harness import WebService

KEY_A, KEY_B = "render-key-a-1234", "render-key-b-1234"
A = {"X-API-Key": KEY_A}


# --- data sets --------------------------------------------------------------------------------------------------

def image(pixels: np.ndarray, study_uid: str | None = None, series_uid: str | None = None, number: int = 1,
          photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A secondary-capture-like image data set around ``pixels`` ((frames,) rows, cols (, 3))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID = study_uid or new_uid()
    ds.SeriesInstanceUID = series_uid or new_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "P1", "Render^Test", "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    colour = photometric in ("RGB", "YBR_FULL")
    frames = pixels.ndim == (4 if colour else 3)
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def ct(study_uid=None, series_uid=None, number=1, rows=32, cols=48) -> tuple[Dataset, np.ndarray]:
    """A signed 16-bit CT with rescale and two windows in the data set; also its stored values."""
    rng = np.random.default_rng(number)
    stored = rng.integers(-600, 1800, (rows, cols)).astype(np.int16)
    ds = image(stored, study_uid, series_uid, number, RescaleSlope="2", RescaleIntercept="-1024",
               WindowCenter=["40", "300"], WindowWidth=["400", "1500"])
    return ds, stored


def expected_window(values: np.ndarray, c: float, w: float, function: str = LINEAR) -> np.ndarray:
    """PS3.3 C.11.2.1.2, written out independently of the renderer, onto 0..255 (rounded)."""
    x = values.astype(np.float64)
    if function == LINEAR:
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
        y[x <= c - 0.5 - (w - 1) / 2] = 0
        y[x > c - 0.5 + (w - 1) / 2] = 255
    elif function == LINEAR_EXACT:
        y = ((x - c) / w + 0.5) * 255
        y[x <= c - w / 2] = 0
        y[x > c + w / 2] = 255
    else:
        y = 255 / (1 + np.exp(-4 * (x - c) / w))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def decoded(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


# --- the service ------------------------------------------------------------------------------------------------

def _config(tmp_path, **web):
    return load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path), "web": web,
        "access": {"anonymous_tenant": None,
                   "tenants": {"a": {"api_keys_sha256": [api_key_hash(KEY_A)]},
                               "b": {"api_keys_sha256": [api_key_hash(KEY_B)]}}}})


@pytest.fixture
def service(tmp_path):
    config = _config(tmp_path)
    catalogue = open_catalogue("", tmp_path)
    backends = Backends(config)
    with WebService(config) as web:
        yield web, catalogue, backends.get("local")
    backends.close()
    catalogue.close()


def put(catalogue, objects, ds: Dataset | None = None, raw: bytes | None = None, ts: str = ExplicitVRLittleEndian,
        tenant: str = "a") -> bytes:
    """Stage and catalogue one instance as the store would (``raw``: data set bytes as received)."""
    raw = encode(ds) if raw is None else raw
    digest = content_digest(raw)
    objects.put(digest, raw)
    facts = InstanceFacts(tenant, ts, digest, len(raw), "default", ("local",), "MOD", "2026", "2026")
    catalogue.record_batch([entry_from_model(json_model(raw, ts), facts)])
    return raw


def url(web, ds, tail: str = "") -> str:
    return (f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}{tail}")


def get(address: str, accept_header: str | None = None, key: str = KEY_A, **params) -> requests.Response:
    headers = {"X-API-Key": key, **({"Accept": accept_header} if accept_header else {})}
    return requests.get(address, headers=headers, params=params, timeout=30)


def multipart_parts(res: requests.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related answer."""
    boundary = res.headers["Content-Type"].split("boundary=")[1].encode()
    out = []
    for part in res.content.split(b"--" + boundary)[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        media = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-type"))
        out.append((media, body[:-2]))
    return out


def test_ct_window_from_the_data_set_and_the_window_parameter(service):
    web, catalogue, objects = service
    ds, stored = ct()
    put(catalogue, objects, ds)
    values = stored.astype(np.float64) * 2 - 1024  # Modality LUT
    png = get(url(web, ds, "/rendered"), "image/png")
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    assert np.array_equal(decoded(png.content), expected_window(values, 40, 400))  # the data set's first window
    for window, (c, w, fn) in {"-500,1200,linear": (-500, 1200, LINEAR),
                               "100,700,linear-exact": (100, 700, LINEAR_EXACT),
                               "0,1000,sigmoid": (0, 1000, SIGMOID),
                               "300,51": (300, 51, LINEAR)}.items():
        res = get(url(web, ds, "/rendered"), "image/png", window=window)
        assert res.status_code == 200, res.text
        assert np.array_equal(decoded(res.content), expected_window(values, c, w, fn)), window
    jpeg = get(url(web, ds, "/rendered"), quality="100")  # no Accept: JPEG
    assert jpeg.status_code == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    diff = np.abs(decoded(jpeg.content).astype(int) - expected_window(values, 40, 400).astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) < 25
    # dicomweb-client's rendered retrieve gets the same image
    client = DICOMwebClient(web.url, headers=A)
    body = client.retrieve_instance_rendered(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                             media_types=("image/png",))
    assert body == png.content


def test_monochrome1_rgb_ybr_and_jpeg_baseline(service):
    web, catalogue, objects = service
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    mono1 = image(ramp, photometric="MONOCHROME1")
    rgb_pixels = np.random.default_rng(7).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    rgb = image(rgb_pixels, photometric="RGB")
    for ds in (mono1, rgb):
        put(catalogue, objects, ds)
    # no window anywhere: the frame's min..max, linear-exact, maps 0..255 onto itself; MONOCHROME1 inverts it
    assert np.array_equal(decoded(get(url(web, mono1, "/rendered"), "image/png").content), 255 - ramp)
    assert np.array_equal(decoded(get(url(web, rgb, "/rendered"), "image/png").content), rgb_pixels)
    # JPEG baseline (YBR_FULL) as dcmtk wrote it: decoded by pydicom with Pillow, converted to RGB
    path = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    src = pydicom.dcmread(path)
    put(catalogue, objects, raw=dataset_bytes(path), ts=JPEGBaseline8Bit)
    got = decoded(get(url(web, src, "/rendered"), "image/png").content)
    assert got.shape == (100, 100, 3) and np.array_equal(got, src.pixel_array)
    # an uncompressed YBR_FULL_422 file, as pydicom ships it
    path = Path(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    src = pydicom.dcmread(path)
    put(catalogue, objects, raw=dataset_bytes(path), ts=src.file_meta.TransferSyntaxUID)
    got = decoded(get(url(web, src, "/rendered"), "image/png").content)
    assert np.array_equal(got, pydicom.pixels.pixel_array(src, as_rgb=True))
    # RLE is stored fine, but not rendered here
    path = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    src = pydicom.dcmread(path)
    put(catalogue, objects, raw=dataset_bytes(path), ts=RLELossless)
    res = get(url(web, src, "/rendered"))
    assert res.status_code == 406 and f"cannot render {RLELossless}" in res.text


def test_frames_viewport_accept_and_bad_parameters(service):
    web, catalogue, objects = service
    frames = np.stack([np.full((16, 24), v, np.uint16) + np.arange(24, dtype=np.uint16) for v in (0, 100, 200)])
    multi = image(frames, WindowCenter="112", WindowWidth="256")
    put(catalogue, objects, multi)
    for n in (1, 2, 3):
        res = get(url(web, multi, f"/frames/{n}/rendered"), "image/png")
        assert np.array_equal(decoded(res.content), expected_window(frames[n - 1], 112, 256)), n
    assert np.array_equal(decoded(get(url(web, multi, "/rendered"), "image/png").content),
                          expected_window(frames[0], 112, 256))  # the instance: its first frame
    client = DICOMwebClient(web.url, headers=A)
    body = client.retrieve_instance_frames_rendered(multi.StudyInstanceUID, multi.SeriesInstanceUID,
                                                    multi.SOPInstanceUID, [2], media_types=("image/png",))
    assert np.array_equal(decoded(body), expected_window(frames[1], 112, 256))
    assert get(url(web, multi, "/frames/4/rendered")).status_code == 404
    assert get(url(web, multi, "/frames/0/rendered")).status_code == 400
    assert get(url(web, multi, "/frames/x/rendered")).status_code == 400
    # viewport: fit keeping the aspect ratio; with a source region: that region, flipped with negative sw
    ds, stored = ct(rows=32, cols=48)
    put(catalogue, objects, ds)
    assert Image.open(io.BytesIO(get(url(web, ds, "/rendered"), viewport="24,24").content)).size == (24, 16)
    assert Image.open(io.BytesIO(get(url(web, ds, "/rendered"), viewport="480,100").content)).size == (150, 100)
    full = expected_window(stored.astype(np.float64) * 2 - 1024, 40, 400)
    crop = decoded(get(url(web, ds, "/rendered"), "image/png", viewport="10,8,5,4,10,8").content)
    assert np.array_equal(crop, full[4:12, 5:15])
    flipped = decoded(get(url(web, ds, "/rendered"), "image/png", viewport="10,8,15,4,-10,8").content)
    assert np.array_equal(flipped, full[4:12, 5:15][:, ::-1])
    # Accept
    for accept, media in {"image/png": "image/png", "image/jpeg": "image/jpeg", "image/*": "image/jpeg",
                          "*/*": "image/jpeg", "image/jpeg;q=0.5, image/png": "image/png",
                          "image/*, image/jpeg;q=0": "image/png", "image/gif": "image/gif"}.items():
        res = get(url(web, ds, "/rendered"), accept)
        assert res.status_code == 200 and res.headers["Content-Type"] == media, accept
        assert Image.open(io.BytesIO(res.content)).format == media.split("/")[1].upper()
    assert get(url(web, ds, "/rendered"), "text/html", accept="image/png").headers["Content-Type"] == "image/png"
    for accept in ("application/dicom", "text/html", "image/jp2", "image/png;q=0"):
        res = get(url(web, ds, "/rendered"), accept)
        assert res.status_code == 406, accept
    # bad parameters: 400 naming the parameter
    for params, named in (({"window": "abc,400,linear"}, "window center"), ({"window": "40"}, "window"),
                          ({"window": "40,0.5,linear"}, "window"), ({"window": "40,400,cubic"}, "window"),
                          ({"viewport": "10"}, "viewport"), ({"viewport": "0,10"}, "viewport width"),
                          ({"viewport": "10,10,100,100,5,5"}, "viewport"), ({"quality": "0"}, "quality"),
                          ({"quality": "high"}, "quality"), ({"colour": "yes"}, "colour"),
                          ({"iccprofile": "srgb"}, "iccprofile")):
        res = get(url(web, ds, "/rendered"), **params)
        assert res.status_code == 400 and named in res.text and named in res.headers["Warning"], params
    # another tenant: as if absent
    assert get(url(web, ds, "/rendered"), key=KEY_B).status_code == 404
    assert get(url(web, ds, "/thumbnail"), key=KEY_B).status_code == 404


def test_thumbnails_and_series_and_study_rendered(service):
    web, catalogue, objects = service
    study_uid, first, second = new_uid(), new_uid(), new_uid()
    # series numbers order the study's series; instance numbers order a series (middle: the 2nd of 3)
    series_one = [image(np.full((32, 64), 10 * n, np.uint8), study_uid, first, n, SeriesNumber=1,
                        WindowCenter="128", WindowWidth="256") for n in (3, 1, 2)]
    series_two = [image(np.full((32, 32), 200, np.uint8), study_uid, second, 1, SeriesNumber=2)]
    report = Dataset()  # a series without images, first by SeriesNumber: thumbnails and rendered pass it by
    report.SOPClassUID, report.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", new_uid()
    report.StudyInstanceUID, report.SeriesInstanceUID, report.SeriesNumber = study_uid, new_uid(), 0
    report.Modality, report.PatientID = "SR", "P1"
    for ds in [report] + series_one + series_two:
        put(catalogue, objects, ds)
    ds = series_one[0]
    thumb = get(url(web, ds, "/thumbnail"), "image/png")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (128, 64)
    assert Image.open(io.BytesIO(get(url(web, ds, "/thumbnail"), viewport="32,32").content)).size == (32, 16)
    series_url = f"{web.url}/studies/{study_uid}/series/{first}"
    for address in (f"{series_url}/thumbnail", f"{web.url}/studies/{study_uid}/thumbnail"):
        res = get(address, "image/png")
        assert res.status_code == 200 and res.headers["Content-Type"] == "image/png"
        pixels = decoded(res.content)
        assert pixels.shape == (64, 128) and int(pixels[32, 64]) == 20  # InstanceNumber 2's value, windowed 1:1
    # series rendered: multipart of every instance's first frame, in InstanceNumber order
    res = get(f"{series_url}/rendered", 'multipart/related; type="image/png"')
    assert res.status_code == 200 and res.headers["Content-Type"].startswith('multipart/related; type="image/png"')
    got = multipart_parts(res)
    assert [m for m, _ in got] == ["image/png"] * 3
    assert [int(decoded(b)[0, 0]) for _, b in got] == [10, 20, 30]
    client = DICOMwebClient(web.url, headers=A)
    body = client.retrieve_series_rendered(study_uid, first, media_types=("image/jpeg",))
    assert body.count(b"\xff\xd8\xff") == 3  # three JPEGs in the multipart body
    study = get(f"{web.url}/studies/{study_uid}/rendered")
    assert study.headers["Content-Type"].startswith('multipart/related; type="image/jpeg"')
    assert [Image.open(io.BytesIO(b)).size for _, b in multipart_parts(study)] == [(64, 32)] * 3 + [(32, 32)]
    assert get(f"{series_url}/rendered", "application/dicom").status_code == 406
    report_series = f"{web.url}/studies/{study_uid}/series/{report.SeriesInstanceUID}"
    for tail in ("/thumbnail", "/rendered"):
        res = get(report_series + tail)
        assert res.status_code == 406 and "no image" in res.text
    assert get(f"{series_url}/rendered", key=KEY_B).status_code == 404
    assert get(f"{web.url}/studies/{study_uid}/thumbnail", key=KEY_B).status_code == 404
    assert get(f"{web.url}/studies/{new_uid()}/rendered").status_code == 404


def test_wado_uri(service):
    web, catalogue, objects = service
    ds, stored = ct()
    raw = put(catalogue, objects, ds)
    uids = {"studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID}
    wado = f"{web.url}/wado"
    res = get(wado, requestType="WADO", contentType="application/dicom", **uids)
    assert res.status_code == 200 and res.headers["Content-Type"].startswith("application/dicom")
    file = pydicom.dcmread(io.BytesIO(res.content))
    assert file.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and data_set_of(file) == raw
    implicit = get(wado, requestType="WADO", contentType="application/dicom", transferSyntax="1.2.840.10008.1.2",
                   **uids)
    assert pydicom.dcmread(io.BytesIO(implicit.content)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert get(wado, requestType="WADO", contentType="application/dicom", transferSyntax=JPEGBaseline8Bit,
               **uids).status_code == 406
    values = stored.astype(np.float64) * 2 - 1024
    jpeg = get(wado, requestType="WADO", **uids)  # no contentType: JPEG for an image
    assert jpeg.status_code == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (48, 32)
    png = get(wado, requestType="WADO", contentType="image/png", windowCenter="300", windowWidth="1500", **uids)
    assert np.array_equal(decoded(png.content), expected_window(values, 300, 1500))
    small = get(wado, requestType="WADO", contentType="image/jpeg", rows="16", imageQuality="50", **uids)
    assert Image.open(io.BytesIO(small.content)).size == (24, 16)
    region = get(wado, requestType="WADO", contentType="image/png", region="0,0,0.5,0.5", **uids)
    assert np.array_equal(decoded(region.content), expected_window(values, 40, 400)[:16, :24])
    # the errors name what is wrong
    for params, named in (({}, "requestType"), ({"requestType": "RENDER"}, "requestType"),
                          ({"requestType": "WADO", "objectUID": None}, "objectUID"),
                          ({"requestType": "WADO", "studyUID": "1.2.*"}, "studyUID"),
                          ({"requestType": "WADO", "windowCenter": "40"}, "windowWidth"),
                          ({"requestType": "WADO", "rows": "-1"}, "rows"),
                          ({"requestType": "WADO", "frameNumber": "two"}, "frame"),
                          ({"requestType": "WADO", "region": "0.5,0,0.2,1"}, "region")):
        query = {k: v for k, v in {**uids, **params}.items() if v is not None}
        res = get(wado, **query)
        assert res.status_code == 400 and named in res.text, params
    assert get(wado, requestType="WADO", contentType="text/html", **uids).status_code == 406
    assert get(wado, requestType="WADO", frameNumber="2", **uids).status_code == 404
    assert get(wado, requestType="WADO", key=KEY_B, **uids).status_code == 404
    assert get(wado, requestType="WADO", **{**uids, "objectUID": new_uid()}).status_code == 404


def test_an_object_above_the_render_limit_is_refused(tmp_path):
    config = _config(tmp_path, render_max_bytes=1000)
    catalogue = open_catalogue("", tmp_path)
    backends = Backends(config)
    try:
        with WebService(config) as web:
            ds, _ = ct()
            put(catalogue, objects=backends.get("local"), ds=ds)
            res = get(url(web, ds, "/rendered"))
            assert res.status_code == 413 and "render_max_bytes" in res.text
            # the file itself is still served
            assert get(url(web, ds), "application/dicom").status_code == 200
    finally:
        backends.close()
        catalogue.close()


# --- the pure renderer ------------------------------------------------------------------------------------------

def test_choose_media():
    assert choose_media("") == "image/jpeg"
    assert choose_media("image/png, image/jpeg") == "image/png"  # equal q: the one written first
    assert choose_media("image/jpeg;q=0.2, image/png;q=0.9") == "image/png"
    assert choose_media("image/*;q=0.5, image/gif") == "image/gif"
    assert choose_media("*/*, image/jpeg;q=0, image/png;q=0") == "image/gif"
    assert choose_media("text/html, application/dicom") is None
    assert choose_media('multipart/related; type="image/png"', multipart=True) == "image/png"
    assert choose_media("multipart/related", multipart=True) == "image/jpeg"
    assert choose_media('multipart/related; type="image/png"') is None  # not for a single image


def test_parameters():
    assert parse_window("40,400") == Window(40, 400, LINEAR)
    assert parse_window("-1.5, 0.5, linear-exact") == Window(-1.5, 0.5, LINEAR_EXACT)
    assert parse_window("0,10,SIGMOID") == Window(0, 10, SIGMOID)
    assert parse_viewport("512,256") == Viewport(512, 256)
    assert parse_viewport("512,256,10,20,-100,50") == Viewport(512, 256, (10, 20, -100, 50))
    for bad in ("40", "40,nan", "40,0,sigmoid", "x,1", "1,2,3,4"):
        with pytest.raises(RenderError) as exc:
            parse_window(bad)
        assert exc.value.status == 400 and "window" in str(exc.value)
    for bad in ("1", "1,2,3", "8193,1", "1,1,0,0,0,5", "a,b"):
        with pytest.raises(RenderError, match="viewport"):
            parse_viewport(bad)
    params = parse_rendered([("window", "1,2"), ("quality", "75")], "image/png")
    assert params == RenderParams("image/png", Window(1, 2), None, 75)
    assert parse_rendered([], "", default_viewport=(128, 128)).viewport == Viewport(128, 128)
    with pytest.raises(RenderError) as exc:
        parse_rendered([], "application/pdf")
    assert exc.value.status == 406
    with pytest.raises(RenderError, match="more than once"):
        parse_rendered([("quality", "1"), ("quality", "2")], "")
    params, frame = parse_wado_uri({"windowCenter": "5", "windowWidth": "10", "columns": "64", "frameNumber": "3"},
                                   "image/png")
    assert (params.window, params.viewport, frame) == (Window(5, 10), Viewport(64, None), 3)
    assert wado_uri_content_type(None, True) == "image/jpeg"
    assert wado_uri_content_type(None, False) == "application/dicom"
    assert wado_uri_content_type("video/mpeg, image/png", True) == "image/png"
    assert wado_uri_content_type("text/html", True) is None
    assert fit(200, 100, Viewport(50, 50)) == (50, 25)
    assert fit(200, 100, Viewport(None, 300)) == (600, 300)
    assert fit(1, 1000, Viewport(100, 100)) == (1, 100)


def test_window_functions_at_their_edges():
    x = np.array([-1000.0, -160.0, -159.5, 39.5, 40.0, 238.5, 239.0, 1000.0])
    linear = apply_window(x, Window(40, 400, LINEAR))
    # PS3.3 C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> min; x > c - 0.5 + (w-1)/2 -> max
    assert linear[0] == 0 and linear[1] == 0 and 0 < linear[2] < 1 and linear[-1] == 255 and linear[-2] == 255
    assert linear[3] == pytest.approx(127.5)
    exact = apply_window(np.array([-160.0, 40.0, 240.0, 241.0]), Window(40, 400, LINEAR_EXACT))
    assert list(exact) == [0, 127.5, 255, 255]
    sigmoid = apply_window(np.array([40.0, 1e6, -1e6]), Window(40, 400, SIGMOID))
    assert sigmoid[0] == pytest.approx(127.5) and sigmoid[1] == pytest.approx(255) and sigmoid[2] == pytest.approx(0)


def test_render_without_io():
    ds, stored = ct(rows=8, cols=12)
    raw = encode(ds)
    body, media = render(raw, ExplicitVRLittleEndian, 1, RenderParams("image/png"))
    assert media == "image/png"
    assert np.array_equal(decoded(body), expected_window(stored.astype(np.float64) * 2 - 1024, 40, 400))
    implicit, _ = render(encode(ds, implicit=True), "1.2.840.10008.1.2", 1, RenderParams("image/png"))
    assert implicit == body
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated, _ = render(squeeze.compress(raw) + squeeze.flush(), DeflatedExplicitVRLittleEndian, 1,
                         RenderParams("image/png"))
    assert deflated == body
    with pytest.raises(RenderError) as exc:
        render(raw, RLELossless, 1, RenderParams())
    assert exc.value.status == 406 and str(exc.value).startswith(f"cannot render {RLELossless}")
    with pytest.raises(RenderError) as exc:
        render(raw, ExplicitVRLittleEndian, 2, RenderParams())
    assert exc.value.status == 404
    no_pixels = Dataset()
    no_pixels.PatientName = "X"
    with pytest.raises(RenderError, match="without pixel data"):
        render(encode(no_pixels), ExplicitVRLittleEndian, 1, RenderParams())
    # a window the data set gives is used only when valid; otherwise min..max
    flat = image(np.array([[0, 1000]], np.uint16), WindowCenter="10", WindowWidth="0")
    png, _ = render(encode(flat), ExplicitVRLittleEndian, 1, RenderParams("image/png"))
    assert decoded(png).tolist() == [[0, 255]]
    assert rendering.THUMBNAIL == (128, 128)


def test_a_corrupt_object_is_not_rendered(service):
    from prometheus_client import REGISTRY

    web, catalogue, objects = service
    ds, _ = ct()
    raw = put(catalogue, objects, ds)
    path = objects.path(content_digest(raw))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the pixels: never rendered as if whole
    path.write_bytes(bytes(data))
    before = REGISTRY.get_sample_value("dicomflow_web_corrupt_objects_total") or 0
    res = get(url(web, ds, "/rendered"))
    assert res.status_code == 503 and "cannot be read" in res.text
    assert REGISTRY.get_sample_value("dicomflow_web_corrupt_objects_total") == before + 1
