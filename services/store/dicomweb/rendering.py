"""Rendered images of DICOM frames (PS3.18 8.3.5, 10.4.1.1.4; WADO-URI 9.1.2): parameters, choice, pixels. Pure.

No I/O here: the handlers read the object and call ``render`` on the executor (it is CPU work).

- Parameters (``parse_rendered``, ``parse_wado_uri``) become a plain ``RenderParams``; anything malformed is a
  ``RenderError`` with status 400 whose reason names the parameter.
- The output media type comes from the Accept header (``choose_media``): ``image/jpeg`` (the default),
  ``image/png``, ``image/gif``, with wildcards and q-values; nothing acceptable is 406.
- Pixels: decoded with pydicom (uncompressed syntaxes and JPEG baseline; another syntax is 406 "cannot
  render"), Modality LUT (RescaleSlope/Intercept), then the VOI window: the ``window`` parameter, else the data
  set's first WindowCenter/WindowWidth (with its VOILUTFunction), else the frame's min..max; the window
  functions of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) onto 0..255. MONOCHROME1 is inverted.
  Colour images pass through as RGB (YBR_FULL and YBR_FULL_422 converted, PALETTE COLOR through its LUT).
- Viewport: an optional source region (pixels, or WADO-URI's fractions), then scaled to fit the viewport
  keeping the aspect ratio.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

JPEG, PNG, GIF = "image/jpeg", "image/png", "image/gif"
MEDIA_TYPES = (JPEG, PNG, GIF)  # in the server's order of preference among equals
RENDERABLE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                        ExplicitVRBigEndian, JPEGBaseline8Bit})
LINEAR, LINEAR_EXACT, SIGMOID = "LINEAR", "LINEAR_EXACT", "SIGMOID"
_FUNCTIONS = {"linear": LINEAR, "linear-exact": LINEAR_EXACT, "linear_exact": LINEAR_EXACT, "sigmoid": SIGMOID}
MAX_VIEWPORT = 8192  # pixels a side (at most 192 MiB of RGB): a larger output is refused rather than allocated
DEFAULT_QUALITY = 90
THUMBNAIL = (128, 128)


class RenderError(Exception):
    """A request that cannot be rendered, with the HTTP status to answer (400, 404, 406)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: str = LINEAR


@dataclass(frozen=True)
class Viewport:
    """The output's size (either side None: free) and an optional region of the frame to show."""

    width: int | None
    height: int | None
    source: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh in pixels (negative sw/sh: flipped)
    region: tuple[float, float, float, float] | None = None  # WADO-URI: x1, y1, x2, y2 as fractions of the frame


@dataclass(frozen=True)
class RenderParams:
    """What to render and how: the parsed and checked request."""

    media_type: str = JPEG
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY


# --- Accept ---------------------------------------------------------------------------------------------------

def _ranges(accept: str) -> list[tuple[str, str, float, int]]:
    """(media range, its type parameter, q, position) of each item of an Accept header."""
    out = []
    for pos, item in enumerate(accept.split(",")):
        if not item.strip():
            continue
        media, *rest = (p.strip() for p in item.split(";"))
        params = {}
        for p in rest:
            key, _, value = p.partition("=")
            params[key.strip().lower()] = value.strip().strip('"').lower()
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 0.0
        out.append((media.lower(), params.get("type", ""), q, pos))
    return out


def _matches(media_range: str, media_type: str) -> int:
    """How specifically a media range matches a media type: 3 exact, 2 type/*, 1 */*, 0 not at all."""
    if media_range == media_type:
        return 3
    if media_range.endswith("/*") and media_type.startswith(media_range[:-1]):
        return 2
    return 1 if media_range == "*/*" else 0


def choose_media(accept: str, multipart: bool = False) -> str | None:
    """The image media type to answer in, from an Accept header (absent: JPEG); None when none fits (406).

    Each candidate gets the q of the most specific range that matches it (RFC 9110 12.5.1); the highest q wins,
    then the range written first, then JPEG before PNG before GIF. ``multipart``: a series or study resource,
    whose parts may also be asked for as ``multipart/related; type="image/png"``.
    """
    ranges = _ranges(accept)
    if not ranges:
        return JPEG
    if multipart:
        # multipart/related; type=X stands for X (no type: the default part type, JPEG)
        ranges = [(t or JPEG, "", q, pos) if m == "multipart/related" else (m, t, q, pos)
                  for m, t, q, pos in ranges]
    best: tuple[float, int, int] | None = None
    chosen = None
    for order, candidate in enumerate(MEDIA_TYPES):
        matching = [(_matches(m, candidate), q, pos) for m, _, q, pos in ranges if _matches(m, candidate)]
        if not matching:
            continue
        _, q, pos = max(matching)  # the most specific range decides
        if q <= 0:
            continue
        key = (-q, pos, order)
        if best is None or key < best:
            best, chosen = key, candidate
    return chosen


# --- parameters -------------------------------------------------------------------------------------------------

def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RenderError(400, f"{name}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RenderError(400, f"{name}: {text!r} is not a finite number")
    return value


def _integer(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise RenderError(400, f"{name}: {text!r} is not an integer") from None
    if not low <= value <= high:
        raise RenderError(400, f"{name}: {value} is outside {low}..{high}")
    return value


def _window(name: str, center: float, width: float, function: str) -> Window:
    if function == LINEAR and width < 1:
        raise RenderError(400, f"{name}: a linear window's width must be at least 1 (got {width:g})")
    if width <= 0:
        raise RenderError(400, f"{name}: the window's width must be above 0 (got {width:g})")
    return Window(center, width, function)


def parse_window(text: str) -> Window:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4), function linear (default), linear-exact, sigmoid."""
    items = [t.strip() for t in text.split(",")]
    if len(items) not in (2, 3):
        raise RenderError(400, f"window: {text!r} is not center,width,function")
    function = LINEAR
    if len(items) == 3:
        if items[2].lower() not in _FUNCTIONS:
            raise RenderError(400, f"window: function {items[2]!r} is not linear, linear-exact or sigmoid")
        function = _FUNCTIONS[items[2].lower()]
    return _window("window", _number("window center", items[0]), _number("window width", items[1]), function)


def parse_viewport(text: str) -> Viewport:
    """``viewport=vw,vh`` or ``viewport=vw,vh,sx,sy,sw,sh`` (PS3.18 8.3.5.1.3)."""
    items = [t.strip() for t in text.split(",")]
    if len(items) not in (2, 6):
        raise RenderError(400, f"viewport: {text!r} is not vw,vh or vw,vh,sx,sy,sw,sh")
    vw = _integer("viewport width", items[0], 1, MAX_VIEWPORT)
    vh = _integer("viewport height", items[1], 1, MAX_VIEWPORT)
    source = None
    if len(items) == 6:
        sx = _integer("viewport sx", items[2], 0, 2**31)
        sy = _integer("viewport sy", items[3], 0, 2**31)
        sw = _integer("viewport sw", items[4], -(2**31), 2**31)
        sh = _integer("viewport sh", items[5], -(2**31), 2**31)
        if sw == 0 or sh == 0:
            raise RenderError(400, "viewport: the source region's sw and sh must not be 0")
        source = (sx, sy, sw, sh)
    return Viewport(vw, vh, source)


def _single(query: list[tuple[str, str]], allowed: set[str]) -> dict[str, str]:
    """The query as a dict, each name at most once and among ``allowed`` (400 otherwise)."""
    out: dict[str, str] = {}
    for key, value in query:
        if key not in allowed:
            raise RenderError(400, f"{key}: not a parameter of this resource (known: {', '.join(sorted(allowed))})")
        if key in out:
            raise RenderError(400, f"{key}: given more than once")
        out[key] = value
    return out


RENDERED_PARAMS = {"window", "viewport", "quality", "accept", "annotation", "charset", "iccprofile"}


def parse_rendered(query: list[tuple[str, str]], accept: str, *, multipart: bool = False,
                   default_viewport: tuple[int, int] | None = None) -> RenderParams:
    """The parameters of a WADO-RS rendered or thumbnail request (PS3.18 8.3.5.1), checked.

    The ``accept`` query parameter, when given, stands for the Accept header (PS3.18 8.3.3.1). ``annotation``
    is accepted and not drawn (burning in patient or technique text is not done); ``iccprofile`` may only be
    ``no``. ``default_viewport``: a thumbnail's size when no viewport is given.
    """
    q = _single(query, RENDERED_PARAMS)
    media = choose_media(q.get("accept", accept), multipart)
    if media is None:
        raise RenderError(406, f"cannot answer {q.get('accept', accept)!r}: rendered images are "
                               f"{', '.join(MEDIA_TYPES)}")
    for value in (q["annotation"].split(",") if "annotation" in q else []):
        if value.strip().lower() not in ("patient", "technique"):
            raise RenderError(400, f"annotation: {value!r} is not patient or technique")
    if q.get("iccprofile", "no").lower() != "no":
        raise RenderError(400, f"iccprofile: only 'no' is supported (got {q['iccprofile']!r})")
    window = parse_window(q["window"]) if "window" in q else None
    viewport = parse_viewport(q["viewport"]) if "viewport" in q else None
    if viewport is None and default_viewport is not None:
        viewport = Viewport(*default_viewport)
    quality = _integer("quality", q["quality"], 1, 100) if "quality" in q else DEFAULT_QUALITY
    return RenderParams(media, window, viewport, quality)


def parse_frame(text: str) -> int:
    """A 1-based frame number of a path or parameter (400 when not a positive integer)."""
    return _integer("frame number", text, 1, 2**31 - 1)


WADO_URI_CONTENT = (*MEDIA_TYPES, "application/dicom")


def wado_uri_content_type(value: str | None, is_image: bool) -> str | None:
    """The media type a WADO-URI request answers in (PS3.18 9.1.2.1.3): the first of ``contentType``'s list
    that is served; absent: JPEG for an image, the DICOM file otherwise. None: none of the list is served."""
    if value is None or not value.strip():
        return JPEG if is_image else "application/dicom"
    for item in value.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("image/*", "*/*"):
            return JPEG if is_image else "application/dicom"
        if media in WADO_URI_CONTENT:
            return media
    return None


def parse_wado_uri(q: dict[str, str], media_type: str) -> tuple[RenderParams, int]:
    """The rendering parameters and the 1-based frame of a WADO-URI image request (PS3.18 9.1.2.1): windowCenter
    with windowWidth, rows, columns, region (x1,y1,x2,y2 fractions), frameNumber, imageQuality."""
    window = None
    if ("windowCenter" in q) != ("windowWidth" in q):
        raise RenderError(400, "windowCenter and windowWidth: give both or neither")
    if "windowCenter" in q:
        window = _window("windowWidth", _number("windowCenter", q["windowCenter"]),
                         _number("windowWidth", q["windowWidth"]), LINEAR)
    rows = _integer("rows", q["rows"], 1, MAX_VIEWPORT) if "rows" in q else None
    columns = _integer("columns", q["columns"], 1, MAX_VIEWPORT) if "columns" in q else None
    region = None
    if "region" in q:
        items = q["region"].split(",")
        if len(items) != 4:
            raise RenderError(400, f"region: {q['region']!r} is not x1,y1,x2,y2")
        x1, y1, x2, y2 = (_number("region", t) for t in items)
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise RenderError(400, f"region: {q['region']!r} must be fractions with 0 <= x1 < x2 <= 1, "
                                   f"0 <= y1 < y2 <= 1")
        region = (x1, y1, x2, y2)
    viewport = Viewport(columns, rows, region=region) if rows or columns or region else None
    quality = _integer("imageQuality", q["imageQuality"], 1, 100) if "imageQuality" in q else DEFAULT_QUALITY
    frame = parse_frame(q["frameNumber"]) if "frameNumber" in q else 1
    return RenderParams(media_type, window, viewport, quality), frame


# --- pixels ---------------------------------------------------------------------------------------------------

def read(dataset_bytes: bytes, transfer_syntax: str) -> Dataset:
    """The data set (no file meta) decoded by pydicom, with the file meta its pixel decoders look at."""
    if transfer_syntax not in RENDERABLE:
        raise RenderError(406, f"cannot render {transfer_syntax}: rendered from the uncompressed syntaxes and "
                               f"JPEG baseline ({JPEGBaseline8Bit}) only")
    data = dataset_bytes
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    ds = read_dataset(io.BytesIO(data), is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
                      is_little_endian=transfer_syntax != ExplicitVRBigEndian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.set_original_encoding(transfer_syntax == ImplicitVRLittleEndian, transfer_syntax != ExplicitVRBigEndian)
    return ds


def frame_count(ds: Dataset) -> int:
    """Number of frames of an image data set."""
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _first(value) -> float | None:
    """The first value of a possibly multi-valued DS element (None when absent or not a number)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Modality values onto 0..255 through a VOI window (PS3.3 C.11.2.1.2.1 and C.11.2.1.3.1), as floats."""
    x = values.astype(np.float64)
    c, w = window.center, window.width
    if window.function == SIGMOID:
        # the exponent clipped: far from the centre exp overflows, and the answer is 0 or 255 anyway
        return 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700.0, 700.0)))
    if window.function == LINEAR_EXACT:
        y = ((x - c) / w + 0.5) * 255.0
        return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, y))
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0 if w > 1 else np.zeros_like(x)
    return np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 255.0, y))


def window_of(ds: Dataset, values: np.ndarray, asked: Window | None) -> Window:
    """The window to apply: the one asked for, else the data set's first, else the frame's min..max."""
    if asked is not None:
        return asked
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "") or LINEAR).upper()
    if center is not None and width is not None and function in (LINEAR, LINEAR_EXACT, SIGMOID):
        if width >= 1 or (function != LINEAR and width > 0):
            return Window(center, width, function)
    low, high = float(values.min()), float(values.max())
    return Window((low + high) / 2, max(high - low, 1e-6), LINEAR_EXACT)


def pixels(ds: Dataset, frame: int, window: Window | None) -> np.ndarray:
    """Frame ``frame`` (1-based) as 8-bit grey (rows, columns) or RGB (rows, columns, 3)."""
    if "PixelData" not in ds:
        raise RenderError(406, "cannot render an instance without pixel data")
    count = frame_count(ds)
    if not 1 <= frame <= count:
        raise RenderError(404, f"no frame {frame}: the instance has {count}")
    try:
        arr, meta = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=frame - 1, as_rgb=True)
    except (ValueError, RuntimeError, NotImplementedError, KeyError, AttributeError) as exc:
        raise RenderError(406, f"cannot decode the pixel data: {exc}") from exc
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if arr.ndim == 3:
        if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422"):
            raise RenderError(406, f"cannot render photometric interpretation {photometric}")
        if arr.dtype != np.uint8:  # more than 8 bits a sample: keep the top 8 of those stored
            shift = max(int(meta.get("bits_stored", 16)) - 8, 0)
            arr = np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RenderError(406, f"cannot render photometric interpretation {photometric}")
    slope = _first(ds.get("RescaleSlope"))
    intercept = _first(ds.get("RescaleIntercept"))
    values = arr.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    grey = np.clip(np.rint(apply_window(values, window_of(ds, values, window))), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        grey = 255 - grey  # minimum is white
    return grey


def _crop(img: np.ndarray, viewport: Viewport) -> np.ndarray:
    rows, cols = img.shape[:2]
    if viewport.region is not None:
        x1, y1, x2, y2 = viewport.region
        c0, c1 = int(math.floor(x1 * cols)), max(int(math.ceil(x2 * cols)), int(math.floor(x1 * cols)) + 1)
        r0, r1 = int(math.floor(y1 * rows)), max(int(math.ceil(y2 * rows)), int(math.floor(y1 * rows)) + 1)
        return img[r0:min(r1, rows), c0:min(c1, cols)]
    if viewport.source is None:
        return img
    sx, sy, sw, sh = viewport.source
    c0, c1 = (sx, sx + sw) if sw > 0 else (sx + sw, sx)
    r0, r1 = (sy, sy + sh) if sh > 0 else (sy + sh, sy)
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, cols), min(r1, rows)
    if c0 >= c1 or r0 >= r1:
        raise RenderError(400, f"viewport: the source region {sx},{sy},{sw},{sh} lies outside the "
                               f"{cols}x{rows} frame")
    out = img[r0:r1, c0:c1]
    if sw < 0:
        out = out[:, ::-1]
    if sh < 0:
        out = out[::-1]
    return np.ascontiguousarray(out)


def fit(width: int, height: int, viewport: Viewport) -> tuple[int, int]:
    """The output size of a ``width`` x ``height`` image scaled to fit the viewport, aspect kept."""
    scales = [s for s in ((viewport.width / width) if viewport.width else None,
                          (viewport.height / height) if viewport.height else None) if s is not None]
    if not scales:
        return width, height
    scale = min(scales)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode(img: np.ndarray, params: RenderParams) -> bytes:
    """An 8-bit grey or RGB array as JPEG, PNG or GIF, scaled to the viewport."""
    if params.viewport is not None:
        img = _crop(img, params.viewport)
    image = Image.fromarray(img)  # uint8 (rows, cols): L; (rows, cols, 3): RGB
    if params.viewport is not None:
        size = fit(image.width, image.height, params.viewport)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if params.media_type == PNG:
        image.save(out, "PNG")
    elif params.media_type == GIF:
        image.save(out, "GIF")
    else:
        image.save(out, "JPEG", quality=params.quality)
    return out.getvalue()


def render(dataset_bytes: bytes, transfer_syntax: str, frame: int, params: RenderParams) -> tuple[bytes, str]:
    """Frame ``frame`` (1-based) of an instance's data set bytes rendered as ``params`` say: (image, media type).

    CPU work: call it on a worker thread. Raises ``RenderError`` (406: cannot render the syntax or the pixels;
    404: no such frame).
    """
    ds = read(dataset_bytes, transfer_syntax)
    return encode(pixels(ds, frame, params.window), params), params.media_type
