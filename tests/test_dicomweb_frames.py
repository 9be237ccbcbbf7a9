"""WADO-RS frames and bulkdata: the pure walker over bytes, and the service with dicomweb-client and requests.

Frames are compared with what pydicom makes of the same data set: ``generate_frames`` for encapsulated
pixel data, slices of the raw pixel bytes (``pack_bits`` of ``pixel_array`` for BitsAllocated 1) for native.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels.utils import pack_bits

from services.store.dicomweb import pixels as P
from services.store.dicomweb.frames import (
    PartType,
    Unsatisfiable,
    bulk_wants_bare,
    choose_frames,
    parse_range,
)
from shared.catalogue.entry import InstanceFacts, entry_from_model
from shared.dicom.json_model import json_model
from shared.storage.objectstore import content_digest
from tests.helpers import dataset_bytes, encode
from tests.test_catalogue import study
from tests.test_dicomweb_wado import KEY_A, KEY_B, service  # noqa: F401 - the fixture

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
JPEG_BASELINE, RLE, J2K = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.91"
OCTET_MULTI = 'multipart/related; type="application/octet-stream"'


# --- data sets -----------------------------------------------------------------------------------------------


def image(rows: int, cols: int, frames: int, bits: int = 8, samples: int = 1, pixels: bytes | None = None
          ) -> Dataset:
    """A synthetic multi-frame image (explicit VR LE when encoded) with random pixels."""
    [ds] = study(1)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = rows, cols, samples, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    if pixels is None:
        n = (rows * cols * samples * bits * frames + 7) // 8
        pixels = np.random.default_rng(rows * cols + frames).integers(0, 256, n, dtype=np.uint8).tobytes()
    ds.PixelData = pixels + b"\0" * (len(pixels) % 2)
    ds["PixelData"].VR = "OB" if bits <= 8 else "OW"
    return ds


def encapsulated(frames: list[bytes], bot: bool, extended: bool = False, fragments_per_frame: int = 1) -> Dataset:
    """A synthetic JPEG baseline multi-frame image with the given frames encapsulated."""
    ds = image(4, 4, len(frames))
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    if extended:
        data, offsets, lengths = encapsulate_extended(frames)
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = offsets, lengths
        ds.PixelData = data
    else:
        ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=bot)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def stored(catalogue, objects, raw: bytes, ts: str, tenant: str = "a") -> dict:
    """Stage an object and its catalogue entry as the store would; returns the instance's UIDs."""
    digest = content_digest(raw)
    objects.put(digest, raw)
    model = json_model(raw, ts)
    facts = InstanceFacts(tenant, ts, digest, len(raw), "default", ("local",), "MOD", "2026", "2026")
    catalogue.record_batch([entry_from_model(model, facts)])
    return {"study": model["0020000D"]["Value"][0], "series": model["0020000E"]["Value"][0],
            "sop": model["00080018"]["Value"][0], "digest": digest}


def stored_file(catalogue, objects, name: str, tenant: str = "a") -> tuple[dict, pydicom.Dataset]:
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    return stored(catalogue, objects, dataset_bytes(Path(path)), ds.file_meta.TransferSyntaxUID, tenant), ds


def instance_url(web, uids: dict) -> str:
    return f"{web.url}/studies/{uids['study']}/series/{uids['series']}/instances/{uids['sop']}"


def client(web, key: str = KEY_A) -> DICOMwebClient:
    return DICOMwebClient(web.url, headers={"X-API-Key": key})


def multipart(res: requests.Response) -> list[tuple[dict, bytes]]:
    """The (headers, body) parts of a multipart/related answer."""
    assert res.status_code == 200, res.text
    boundary = res.headers["Content-Type"].split("boundary=")[1].encode()
    body = res.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, content = part.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        assert content.endswith(b"\r\n")
        out.append((headers, content[:-2]))
    return out


def native_frames(ds: Dataset) -> list[bytes]:
    """The frames of native pixel data, cut from the raw pixel bytes (pack_bits for BitsAllocated 1)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.BitsAllocated == 1:
        arr = ds.pixel_array.reshape(frames, ds.Rows, ds.Columns)
        return [pack_bits(arr[i], pad=False) for i in range(frames)]
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(frames)]


# --- the pure walker, no I/O ---------------------------------------------------------------------------------


class Recorder:
    """Answers a walker's reads from bytes in memory, counting what it asked for."""

    def __init__(self, data: bytes):
        self.data, self.reads = data, []

    def __call__(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset: offset + length]


def test_frame_lists_and_bulk_paths_parse_or_refuse_with_400():
    assert P.parse_frame_list("1,3,5") == [1, 3, 5]
    assert P.parse_frame_list(" 2 , 2") == [2, 2]
    for bad in ("", "0", "1,,2", "a", "-1", "1.5", "1;2", "٣"):
        with pytest.raises(P.RequestError) as exc:
            P.parse_frame_list(bad)
        assert exc.value.status == 400
    assert P.parse_bulk_path("7FE00010") == [0x7FE00010]
    assert P.parse_bulk_path("00880200/0/7fe00010") == [0x00880200, "0", 0x7FE00010]
    for bad in ("7FE0001", "00880200/0", "00880200/x/7FE00010", "zzzzzzzz"):
        with pytest.raises(P.RequestError) as exc:
            P.parse_bulk_path(bad)
        assert exc.value.status == 400
    with pytest.raises(P.RequestError) as exc:
        P.check_frames([1, 4], 3)
    assert exc.value.status == 404 and "frame 4 of 3 frames" in str(exc.value)


def test_extract_bits_brings_a_packed_frame_to_a_byte_boundary():
    data = bytes([0b1010_0000, 0b0000_1111])
    assert P.extract_bits(data, 4, 8) == bytes([0b1111_1010])
    assert P.extract_bits(data, 5, 3) == bytes([0b101])
    assert P.extract_bits(b"\xff\xff", 0, 12) == b"\xff\x0f"


def test_native_layouts_of_multi_frame_rgb_and_bit_packed_images():
    rgb = image(5, 7, 3, samples=3)  # 105 bytes a frame: odd, and the value padded to 316
    raw = encode(rgb)
    layout = P.walk_bytes(P.locate_pixels(EXPLICIT, len(raw)), raw)
    assert isinstance(layout, P.Native) and (layout.frames, layout.length) == (3, 316)
    for i, expected in enumerate(native_frames(rgb), 1):
        rng = layout.frame(i)
        assert raw[rng.offset: rng.offset + rng.length] == expected
    bits = image(10, 10, 3, bits=1)  # 100 bits a frame: frames 2 and 3 start inside a byte
    raw = encode(bits, implicit=True)
    layout = P.walk_bytes(P.locate_pixels(IMPLICIT, len(raw)), raw)
    ranges = [layout.frame(i) for i in (1, 2, 3)]
    assert [(r.shift, r.bits) for r in ranges] == [(0, 100), (4, 100), (0, 100)]
    for rng, expected in zip(ranges, native_frames(bits), strict=True):
        assert P.extract_bits(raw[rng.offset: rng.offset + rng.length], rng.shift, rng.bits) == expected


def test_the_walk_skips_large_values_without_reading_them():
    ds = image(16, 16, 2)
    ds.add_new(0x00091010, "LO", "ACME")
    ds.add_new(0x00091011, "OB", b"\x01" * (8 * 1024 * 1024))  # 8 MiB of private bulk before the pixels
    raw = encode(ds)
    rec = Recorder(raw)
    layout = P.drive(P.locate_pixels(EXPLICIT, len(raw)), rec)
    assert layout.frames == 2 and raw[layout.frame(2).offset:][:256] == ds.PixelData[256:512]
    assert sum(n for _, n in rec.reads) <= 2 * P.READ_AHEAD and len(rec.reads) == 2
    bulk = P.drive(P.locate_bulk(EXPLICIT, len(raw), "00091011"), Recorder(raw))
    assert (bulk.length, raw[bulk.offset: bulk.offset + 4]) == (8 * 1024 * 1024, b"\x01" * 4)


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "JPEG2000.dcm", "693_J2KI.dcm"])
def test_encapsulated_frames_of_pydicoms_files_match_generate_frames(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    raw = dataset_bytes(Path(path))
    layout = P.walk_bytes(P.locate_pixels(ds.file_meta.TransferSyntaxUID, len(raw)), raw)
    assert isinstance(layout, P.Encapsulated)
    expected = list(generate_frames(ds.PixelData, number_of_frames=layout.frames))
    assert layout.frames == int(ds.get("NumberOfFrames", 1) or 1) == len(expected)
    for i, frame in enumerate(expected, 1):
        fragments = P.walk_bytes(P.frame_fragments(layout, i, len(raw)), raw)
        assert b"".join(raw[f.offset: f.offset + f.length] for f in fragments) == frame


@pytest.mark.parametrize("how", ["bot", "extended", "one fragment a frame"])
def test_encapsulated_frames_by_each_table(how):
    frames = [bytes([i]) * (100 + 37 * i) for i in range(4)]  # odd lengths: padded fragments
    ds = encapsulated(frames, bot=how == "bot", extended=how == "extended")
    raw = encode(ds)
    layout = P.walk_bytes(P.locate_pixels(JPEG_BASELINE, len(raw)), raw)
    assert bool(layout.offsets) == (how == "bot") and bool(layout.extended) == (how == "extended")
    expected = list(generate_frames(ds.PixelData, number_of_frames=4))
    for i in (4, 1, 3):
        fragments = P.walk_bytes(P.frame_fragments(layout, i, len(raw)), raw)
        assert b"".join(raw[f.offset: f.offset + f.length] for f in fragments) == expected[i - 1]


def test_frames_that_cannot_be_told_apart_are_refused_and_broken_data_is_a_layout_error():
    ds = encapsulated([b"\xff\xd8" + b"a" * 100 + b"\xff\xd9"] * 3, bot=False, fragments_per_frame=2)
    raw = encode(ds)
    with pytest.raises(P.RequestError) as exc:
        P.walk_bytes(P.locate_pixels(JPEG_BASELINE, len(raw)), raw)
    assert exc.value.status == 501 and "6 fragments for 3 frames" in str(exc.value)
    [plain] = study(1)
    del plain.PixelData
    raw = encode(plain)
    with pytest.raises(P.RequestError) as exc:
        P.walk_bytes(P.locate_pixels(EXPLICIT, len(raw)), raw)
    assert exc.value.status == 404
    raw = encode(image(8, 8, 2))
    with pytest.raises(P.LayoutError):  # an object shorter than its elements claim
        P.walk_bytes(P.locate_pixels(EXPLICIT, len(raw)), raw[:100])
    with pytest.raises(P.LayoutError, match="past the end"):
        P.walk_bytes(P.locate_pixels(EXPLICIT, len(raw) - 8), raw[:-8])


@pytest.mark.parametrize("implicit", [False, True])
def test_nested_bulk_paths_are_walked_as_json_model_makes_them(implicit):
    ds = image(4, 4, 1)
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.SamplesPerPixel = 2, 2, 8, 1
    icon.PixelData = b"ICON"
    icon["PixelData"].VR = "OB"
    other = Dataset()
    other.add_new(0x00091010, "LO", "ACME")
    other.add_new(0x00091011, "OB", b"PRIV")
    ds.IconImageSequence = [other, icon]
    ts = IMPLICIT if implicit else EXPLICIT
    raw = encode(ds, implicit=implicit)
    uris = []

    def collect(obj):
        for value in obj.values():
            if "BulkDataURI" in value:
                uris.append(value["BulkDataURI"])
            for item in value.get("Value", []) if value.get("vr") == "SQ" else []:
                collect(item)
    collect(json_model(raw, ts))
    assert "bulkdata/00880200/1/7FE00010" in uris
    values = {}
    for uri in uris:
        bulk = P.walk_bytes(P.locate_bulk(ts, len(raw), uri.removeprefix("bulkdata/")), raw)
        values[uri] = raw[bulk.offset: bulk.offset + bulk.length]
    assert values["bulkdata/00880200/1/7FE00010"] == b"ICON"
    assert values["bulkdata/00880200/0/00091011"] == b"PRIV"
    assert values["bulkdata/7FE00010"] == ds.PixelData
    for missing in ("00880200/2/7FE00010", "00100010", "00880200/0/7FE00010", "00080018/0/7FE00010"):
        with pytest.raises(P.RequestError) as exc:
            P.walk_bytes(P.locate_bulk(ts, len(raw), missing), raw)
        assert exc.value.status == 404, missing


def test_frames_and_bulkdata_accept_negotiation_is_pure():
    assert choose_frames("", EXPLICIT) == PartType("application/octet-stream", EXPLICIT)
    assert choose_frames('multipart/related; type="*/*"', IMPLICIT) == PartType("application/octet-stream", EXPLICIT)
    assert choose_frames("*/*", JPEG_BASELINE) == PartType("image/jpeg", JPEG_BASELINE)
    assert choose_frames(OCTET_MULTI, JPEG_BASELINE) is None  # no decompression here
    assert choose_frames(OCTET_MULTI + "; transfer-syntax=*", JPEG_BASELINE) == PartType(
        "application/octet-stream", JPEG_BASELINE)
    assert choose_frames('multipart/related; type="image/jpeg"', JPEG_BASELINE) == PartType("image/jpeg",
                                                                                           JPEG_BASELINE)
    assert choose_frames('multipart/related; type="image/jp2"', JPEG_BASELINE) is None
    assert choose_frames(f'multipart/related; type="image/jp2"; transfer-syntax={J2K}', J2K).media_type == \
        "image/jp2"
    assert choose_frames('multipart/related; type="image/*"', RLE) == PartType("image/dicom-rle", RLE)
    assert choose_frames('multipart/related; type="image/jpeg"', EXPLICIT) is None
    assert choose_frames("application/octet-stream", EXPLICIT) is None  # frames are multipart only
    assert choose_frames('multipart/related; type="image/jpeg", ' + OCTET_MULTI + "; q=0.5", EXPLICIT) == \
        PartType("application/octet-stream", EXPLICIT)
    assert bulk_wants_bare("") is False and bulk_wants_bare("*/*") is False
    assert bulk_wants_bare(OCTET_MULTI) is False and bulk_wants_bare("application/octet-stream") is True
    assert bulk_wants_bare("image/png") is None


def test_range_headers_parse_as_rfc_9110_says():
    assert parse_range("", 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=10-", 100) == (10, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-500", 100) == (0, 99)
    for ignored in ("items=0-1", "bytes=5-1", "bytes=0-1,4-5", "bytes=x-"):
        assert parse_range(ignored, 100) is None
    for bad in ("bytes=100-", "bytes=-0", "bytes=200-300"):
        with pytest.raises(Unsatisfiable):
            parse_range(bad, 100)


# --- the service ---------------------------------------------------------------------------------------------


def test_native_frames_with_dicomweb_client(service):  # noqa: F811
    web, catalogue, objects = service
    ct, ct_ds = stored_file(catalogue, objects, "CT_small.dcm")
    mr, mr_ds = stored_file(catalogue, objects, "MR_small_implicit.dcm")
    eight = image(6, 9, 5)
    rgb = image(5, 7, 3, samples=3)
    bits = image(10, 10, 3, bits=1)
    c = client(web)
    for uids, ds in [(ct, ct_ds), (mr, mr_ds)]:
        assert c.retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], [1]) == native_frames(ds)
    for ds in (eight, rgb, bits):
        uids = stored(catalogue, objects, encode(ds), EXPLICIT)
        expected = native_frames(ds)
        got = c.retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], [3, 1])
        assert got == [expected[2], expected[0]]
        assert c.retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], [2],
                                          media_types=("application/octet-stream",)) == [expected[1]]
    # the parts' headers: the transfer syntax and where each frame lives
    uids = stored(catalogue, objects, encode(eight), EXPLICIT)
    res = requests.get(instance_url(web, uids) + "/frames/5,2", headers={"X-API-Key": KEY_A}, timeout=10)
    assert res.headers["Content-Type"].startswith(OCTET_MULTI)
    got = multipart(res)
    assert [body for _, body in got] == [native_frames(eight)[4], native_frames(eight)[1]]
    assert got[0][0]["Content-Type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
    assert got[0][0]["Content-Location"].endswith(f"/instances/{uids['sop']}/frames/5")
    assert got[1][0]["Content-Length"] == str(54)


def test_frame_errors_name_their_status(service):  # noqa: F811
    web, catalogue, objects = service
    uids = stored(catalogue, objects, encode(image(4, 4, 3)), EXPLICIT)
    url, h = instance_url(web, uids), {"X-API-Key": KEY_A}
    out = requests.get(url + "/frames/2,4", headers=h, timeout=10)
    assert out.status_code == 404 and "frame 4 of 3 frames" in out.text
    for bad in ("0", "1,x", "1,,2", "-2"):
        res = requests.get(url + f"/frames/{bad}", headers=h, timeout=10)
        assert res.status_code == 400, bad
    res = requests.get(url + "/frames/1", headers={**h, "Accept": 'multipart/related; type="image/jpeg"'}, timeout=10)
    assert res.status_code == 406 and "application/octet-stream" in res.text
    assert requests.get(url + "/frames/1", headers={"X-API-Key": KEY_B}, timeout=10).status_code == 404
    theirs = stored(catalogue, objects, encode(image(4, 4, 1)), EXPLICIT, tenant="b")
    res = requests.get(instance_url(web, theirs) + "/frames/1", headers=h, timeout=10)
    assert res.status_code == 404
    assert requests.get(instance_url(web, theirs) + "/frames/1", headers={"X-API-Key": KEY_B},
                        timeout=10).status_code == 200
    [plain] = study(1)
    del plain.PixelData
    none = stored(catalogue, objects, encode(plain), EXPLICIT)
    res = requests.get(instance_url(web, none) + "/frames/1", headers=h, timeout=10)
    assert res.status_code == 404 and "no pixel data" in res.text


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm",
                                  "SC_rgb_rle_2frame.dcm"])
def test_encapsulated_frames_as_stored(service, name):  # noqa: F811
    web, catalogue, objects = service
    uids, ds = stored_file(catalogue, objects, name)
    ts = ds.file_meta.TransferSyntaxUID
    n = int(ds.get("NumberOfFrames", 1) or 1)
    expected = list(generate_frames(ds.PixelData, number_of_frames=n))
    numbers = [n, 1] if n > 1 else [1]
    c = client(web)
    got = c.retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], numbers)
    assert got == [expected[i - 1] for i in numbers]
    media = {JPEG_BASELINE: "image/jpeg", RLE: "image/dicom-rle", J2K: "image/jp2"}[ts]
    res = requests.get(instance_url(web, uids) + f"/frames/{numbers[0]}", headers={"X-API-Key": KEY_A}, timeout=10)
    assert res.headers["Content-Type"].startswith(f'multipart/related; type="{media}"')
    [(headers, body)] = multipart(res)
    assert headers["Content-Type"] == f"{media}; transfer-syntax={ts}" and body == expected[numbers[0] - 1]
    if media != "image/dicom-rle":  # dicomweb-client names the media types it knows of
        assert c.retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], [1],
                                          media_types=((media, ts),)) == [expected[0]]
    raw = requests.get(instance_url(web, uids) + "/frames/1",
                       headers={"X-API-Key": KEY_A, "Accept": OCTET_MULTI + "; transfer-syntax=*"}, timeout=10)
    [(headers, body)] = multipart(raw)
    assert headers["Content-Type"] == f"application/octet-stream; transfer-syntax={ts}" and body == expected[0]
    refused = requests.get(instance_url(web, uids) + "/frames/1",
                           headers={"X-API-Key": KEY_A, "Accept": OCTET_MULTI}, timeout=10)
    assert refused.status_code == 406 and "transfer-syntax=*" in refused.text


def test_encapsulated_frames_by_extended_offset_table_and_refused_when_unknown(service):  # noqa: F811
    web, catalogue, objects = service
    frames = [bytes([i]) * (300 + i) for i in range(5)]
    ds = encapsulated(frames, bot=False, extended=True)
    uids = stored(catalogue, objects, encode(ds), JPEG_BASELINE)
    got = client(web).retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], [5, 2])
    assert got == [list(generate_frames(ds.PixelData, number_of_frames=5))[i] for i in (4, 1)]
    split = encapsulated([b"x" * 64] * 2, bot=False, fragments_per_frame=2)
    uids = stored(catalogue, objects, encode(split), JPEG_BASELINE)
    res = requests.get(instance_url(web, uids) + "/frames/1", headers={"X-API-Key": KEY_A}, timeout=10)
    assert res.status_code == 501 and "4 fragments for 2 frames" in res.text


def test_bulkdata_from_the_metadata_uris(service):  # noqa: F811
    web, catalogue, objects = service
    ds = image(8, 8, 2)
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.SamplesPerPixel = 2, 2, 8, 1
    icon.PixelData = b"ICON"
    icon["PixelData"].VR = "OB"
    ds.IconImageSequence = [icon]
    uids = stored(catalogue, objects, encode(ds), EXPLICIT)
    c = client(web)
    meta = c.retrieve_instance_metadata(uids["study"], uids["series"], uids["sop"])
    pixels_uri = meta["7FE00010"]["BulkDataURI"]
    icon_uri = meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon_uri.endswith("/bulkdata/00880200/0/7FE00010")
    assert c.retrieve_bulkdata(pixels_uri) == [ds.PixelData]
    assert c.retrieve_bulkdata(icon_uri) == [b"ICON"]
    assert c.retrieve_bulkdata(pixels_uri, media_types=("application/octet-stream",)) == [ds.PixelData]
    h = {"X-API-Key": KEY_A}
    bare = requests.get(pixels_uri, headers={**h, "Accept": "application/octet-stream"}, timeout=10)
    assert bare.status_code == 200 and bare.content == ds.PixelData
    assert bare.headers["Content-Type"] == "application/octet-stream" and bare.headers["Accept-Ranges"] == "bytes"
    assert requests.get(instance_url(web, uids) + "/bulkdata/00100010", headers=h, timeout=10).status_code == 404
    assert requests.get(instance_url(web, uids) + "/bulkdata/0010001", headers=h, timeout=10).status_code == 400
    assert requests.get(pixels_uri, headers={"X-API-Key": KEY_B}, timeout=10).status_code == 404
    assert requests.get(pixels_uri, headers={**h, "Accept": "image/png"}, timeout=10).status_code == 406


def test_bulkdata_ranges(service):  # noqa: F811
    web, catalogue, objects = service
    ds = image(10, 10, 1)
    uids = stored(catalogue, objects, encode(ds), EXPLICIT)
    url = instance_url(web, uids) + "/bulkdata/7FE00010"
    h = {"X-API-Key": KEY_A, "Accept": "application/octet-stream"}
    for spec, first, last in (("2-9", 2, 9), ("90-", 90, 99), ("-5", 95, 99), ("95-1000", 95, 99)):
        res = requests.get(url, headers={**h, "Range": f"bytes={spec}"}, timeout=10)
        assert res.status_code == 206, spec
        assert res.headers["Content-Range"] == f"bytes {first}-{last}/100"
        assert res.content == ds.PixelData[first: last + 1]
    res = requests.get(url, headers={**h, "Range": "bytes=100-"}, timeout=10)
    assert res.status_code == 416 and res.headers["Content-Range"] == "bytes */100"
    whole = requests.get(url, headers={**h, "Range": "bytes=0-1,5-6"}, timeout=10)  # several: ignored
    assert whole.status_code == 200 and whole.content == ds.PixelData


def test_encapsulated_pixel_data_bulkdata_is_its_frames(service):  # noqa: F811
    web, catalogue, objects = service
    uids, ds = stored_file(catalogue, objects, "SC_rgb_rle_2frame.dcm")
    meta = client(web).retrieve_instance_metadata(uids["study"], uids["series"], uids["sop"])
    res = requests.get(meta["7FE00010"]["BulkDataURI"], headers={"X-API-Key": KEY_A}, timeout=10)
    assert [body for _, body in multipart(res)] == list(generate_frames(ds.PixelData, number_of_frames=2))


def test_a_short_or_missing_object_is_a_5xx_never_a_short_answer(service, caplog):  # noqa: F811
    web, catalogue, objects = service
    ds = image(64, 64, 4)
    raw = encode(ds)
    uids = stored(catalogue, objects, raw, EXPLICIT)
    url, h = instance_url(web, uids), {"X-API-Key": KEY_A}
    path = objects.path(uids["digest"])
    path.write_bytes(raw[:-5000])  # the object lost its last frames
    res = requests.get(url + "/frames/1", headers=h, timeout=10)
    assert res.status_code == 503
    res = requests.get(url + "/bulkdata/7FE00010", headers={**h, "Accept": "application/octet-stream"}, timeout=10)
    assert res.status_code == 503
    path.unlink()
    assert requests.get(url + "/frames/1", headers=h, timeout=10).status_code == 503
    assert any("the catalogue says" in r.message for r in caplog.records)
    assert any("in none of" in r.message for r in caplog.records)


def test_a_frame_past_the_end_of_the_pixel_data_is_a_500(service):  # noqa: F811
    web, catalogue, objects = service
    ds = image(8, 8, 3)
    ds.NumberOfFrames = 4  # says 4, holds 3
    uids = stored(catalogue, objects, encode(ds), EXPLICIT)
    res = requests.get(instance_url(web, uids) + "/frames/1,4", headers={"X-API-Key": KEY_A}, timeout=10)
    assert res.status_code == 500 and "past the end of the pixel data" in res.text


def test_a_2_gib_instance_is_served_by_range_never_read_whole(service):  # noqa: F811
    """8192 frames of 512 x 512 bytes in a sparse object file: frames and a bulk range come back in well
    under a second each, which reading 2 GiB could not do, and only the frames asked for are sent."""
    import time

    web, catalogue, objects = service
    ds = image(512, 512, 8192, pixels=b"")
    del ds.PixelData
    frame = 512 * 512
    total_pixels = 8192 * frame  # 2 GiB
    head = encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, total_pixels)
    digest = content_digest(head)  # the object's name only: frames and bulkdata do not hash it (see frames.py)
    objects.put(digest, head)
    path = objects.path(digest)
    with open(path, "r+b") as f:
        f.truncate(len(head) + total_pixels)
        f.seek(len(head) + 8191 * frame)
        f.write(b"last" * 64)
    facts = InstanceFacts("a", EXPLICIT, digest, len(head) + total_pixels, "default", ("local",), "MOD", "2026",
                          "2026")
    catalogue.record_batch([entry_from_model(json_model(head, EXPLICIT, total=len(head) + total_pixels), facts)])
    uids = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID}
    started = time.monotonic()
    got = client(web).retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], [8192, 1])
    took = time.monotonic() - started
    assert [len(f) for f in got] == [frame, frame]
    assert got[0][:256] == b"last" * 64 and got[0][256:] == bytes(frame - 256) and got[1] == bytes(frame)
    res = requests.get(instance_url(web, uids) + "/bulkdata/7FE00010",
                       headers={"X-API-Key": KEY_A, "Accept": "application/octet-stream",
                                "Range": f"bytes={8191 * frame}-{8191 * frame + 7}"}, timeout=10)
    assert res.status_code == 206 and res.content == b"lastlast"
    assert res.headers["Content-Range"] == f"bytes {8191 * frame}-{8191 * frame + 7}/{total_pixels}"
    assert took < 5, took


def test_a_fault_found_mid_answer_aborts_it_and_is_logged(service, caplog):  # noqa: F811
    """A Basic Offset Table pointing into a fragment is found only when that frame is reached: the answer has
    begun, so the connection is cut before the closing boundary, which a client sees as an error."""
    web, catalogue, objects = service
    raw = bytearray(encode(encapsulated([b"\xff\xd8" + bytes([i]) * 400 + b"\xff\xd9" for i in range(3)], bot=True)))
    layout = P.walk_bytes(P.locate_pixels(JPEG_BASELINE, len(raw)), bytes(raw))
    struct.pack_into("<L", raw, layout.offset + 8 + 8, layout.offsets[2] - 6)  # frame 3 "starts" inside frame 2
    uids = stored(catalogue, objects, bytes(raw), JPEG_BASELINE)
    url = instance_url(web, uids)
    first = multipart(requests.get(url + "/frames/1", headers={"X-API-Key": KEY_A}, timeout=10))
    assert first[0][1].startswith(b"\xff\xd8\x00")
    got = bytearray()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        res = requests.get(url + "/frames/1,2", headers={"X-API-Key": KEY_A}, timeout=10, stream=True)
        assert res.status_code == 200
        for chunk in res.iter_content(65536):
            got += chunk
    assert first[0][1] in got  # frame 1 went out whole, then the answer was cut
    assert any("ended early" in r.message and "a fragment crosses" in r.message for r in caplog.records)


def test_source_reads_are_checked_for_their_length(service):  # noqa: F811
    from services.store.dicomweb.frames import Source
    from services.store.dicomweb.retrieve import Unavailable
    from shared.config import load_config
    from shared.storage.objectstore import Backends

    web, catalogue, objects = service
    raw = encode(image(32, 32, 2))
    uids = stored(catalogue, objects, raw, EXPLICIT)
    [row] = catalogue.instances("a", uids["study"], uids["series"], uids["sop"])
    backends = Backends(load_config(None, environ={}, overrides={"data_dir": str(web.config.data_dir)}))
    try:
        source = Source(backends, row)
        assert source.read_exact(len(raw) - 10, 10) == raw[-10:]
        objects.path(uids["digest"]).write_bytes(raw[:-100])  # the object shrinks under an open request
        with pytest.raises(Unavailable, match="short read"):
            source.read_exact(len(raw) - 200, 200)
    finally:
        backends.close()


def test_frames_of_a_deflated_data_set(service):  # noqa: F811
    import zlib

    web, catalogue, objects = service
    ds = image(6, 6, 3)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = deflater.compress(encode(ds)) + deflater.flush()
    uids = stored(catalogue, objects, raw, "1.2.840.10008.1.2.1.99")
    got = client(web).retrieve_instance_frames(uids["study"], uids["series"], uids["sop"], [2, 3])
    assert got == native_frames(ds)[1:]
