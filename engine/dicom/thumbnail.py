"""A series thumbnail: one stored instance's pixels as a small PNG, for the console's study page.

Pixels are decoded by pydicom with the decoders the engine depends on (pylibjpeg with its libjpeg,
openjpeg and RLE plugins: JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, besides the
uncompressed and deflated syntaxes). A multi-frame object shows its middle frame. Greyscale images
go through the Modality LUT (Rescale Slope/Intercept), then the header's first Window Center/Width,
or the image's own minimum and maximum when the header has none (a VOI LUT Sequence is not applied);
MONOCHROME1 is inverted so that it looks like MONOCHROME2. Colour images (RGB, YBR converted to RGB)
keep their colours, scaled to 8 bits. The result fits in ``MAX_SIDE`` pixels, aspect kept.

Anything that cannot be shown raises ``ThumbnailError`` with the reason (a syntax without a decoder,
no pixel data, a damaged file); nothing here knows about patients, and nothing is written to disk.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, pixel_array

from engine.dicom.transcode import syntax_label
from engine.errors import RadBridgeError

MAX_SIDE = 256  # the longer side of a thumbnail, in pixels (smaller images are not enlarged)
CACHE_ENTRIES = 256  # thumbnails kept in memory (each a few kilobytes to ~100 kB)


class ThumbnailError(RadBridgeError):
    """The instance cannot be shown as an image; the message says why (no patient data in it)."""


def thumbnail_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The thumbnail's (width, height) for an image of ``width`` x ``height``: the longer side at most
    ``max_side``, the aspect ratio kept, never enlarged."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _to_8bit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8) if high == low else values.astype(np.uint8)
    scaled = (values.astype(np.float64) - low) / (high - low)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class Window:
    """A VOI window asked for (WADO-RS ``window=center,width,function``): LINEAR (PS3.3 C.11.2.1.2.1),
    LINEAR_EXACT or SIGMOID."""

    center: float
    width: float
    function: str = "LINEAR"


def _grey(ds: pydicom.Dataset, frame: np.ndarray, window: Window | None = None) -> np.ndarray:
    values = apply_modality_lut(frame, ds).astype(np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    function = "LINEAR_EXACT"  # the header's window, as thumbnails always had it: c - w/2 to c + w/2
    if window is not None:
        center, width, function = window.center, window.width, window.function.upper()
    if function == "SIGMOID" and center is not None and width is not None and width > 0:
        out = (255.0 / (1.0 + np.exp(-4.0 * (values - center) / width)) + 0.5).astype(np.uint8)
    elif center is not None and width is not None and width >= 1:
        if function == "LINEAR_EXACT":
            low, high = center - width / 2.0, center + width / 2.0
        else:  # LINEAR: PS3.3 C.11.2.1.2.1's c - 0.5 and w - 1
            low, high = center - 0.5 - (width - 1) / 2.0, center - 0.5 + (width - 1) / 2.0
        out = _to_8bit(values, low, high)
    else:
        out = _to_8bit(values, float(values.min()), float(values.max()))
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def _colour(ds: pydicom.Dataset, frame: np.ndarray) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    bits = int(ds.get("BitsStored") or 8)
    return _to_8bit(frame, 0.0, float(2 ** bits - 1))


def render_png(source: BinaryIO, max_side: int = MAX_SIDE) -> bytes:
    """The PNG of ``source``'s image (its middle frame when it has several), at most ``max_side`` a side."""
    return render(source, max_side=max_side)


def render(source: BinaryIO, *, frame: int | None = None, window: Window | None = None,
           max_side: int | None = MAX_SIDE, viewport: tuple[int, int] | None = None,
           image_format: str = "PNG", quality: int = 90) -> bytes:
    """``source``'s image as PNG or JPEG: frame ``frame`` (1-based; None: the middle one), windowed
    with ``window`` (None: the header's first window, or the image's range), fitted in ``viewport``
    (width, height) or ``max_side`` (None: full size), never enlarged."""
    try:
        ds = pydicom.dcmread(source)
    except Exception as exc:  # InvalidDicomError, EOFError, struct errors...: a damaged file is no image
        raise ThumbnailError(f"the stored file cannot be read as DICOM ({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        raise ThumbnailError("the instance has no pixel data (not an image)")
    syntax_name = syntax_label(str(ds.file_meta.get("TransferSyntaxUID", "")))
    frames = int(ds.get("NumberOfFrames") or 1)
    if frame is not None and not 1 <= frame <= frames:
        raise FrameMissing(f"frame {frame} asked for; the instance has {frames}")
    index = (frame - 1 if frame is not None else frames // 2) if frames > 1 else None
    try:
        pixels = pixel_array(ds, index=index)
    except Exception as exc:  # no decoder for the syntax, or pixel data the decoder cannot take
        raise ThumbnailError(f"the pixel data ({syntax_name}) cannot be decoded here: "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples == 1 and pixels.ndim == 2:
        image = Image.fromarray(_grey(ds, pixels, window), mode="L")
    elif samples == 3 and pixels.ndim == 3 and pixels.shape[-1] == 3:
        image = Image.fromarray(_colour(ds, pixels), mode="RGB")
    else:
        raise ThumbnailError(f"pixels of shape {pixels.shape} with {samples} sample(s) per pixel are not an image "
                             "this console can show")
    if viewport is not None:
        scale = min(1.0, viewport[0] / image.width, viewport[1] / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    elif max_side is not None:
        size = thumbnail_size(image.width, image.height, max_side)
    else:
        size = (image.width, image.height)
    if size != (image.width, image.height):
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if image_format == "JPEG":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG", optimize=max_side is not None)
    return out.getvalue()


class FrameMissing(ThumbnailError):
    """The frame asked for is not in the instance."""


class ThumbnailCache:
    """The last ``size`` thumbnails, by a key naming the file's content (SOP Instance UID and the
    file's SHA-256: a coerced or replaced file gets a new one). Thread-safe; in memory only."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str], png: bytes) -> None:
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
