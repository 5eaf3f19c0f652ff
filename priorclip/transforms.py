"""Image loading and the evaluation transform, in PIL + torch (no torchvision).

The eval transform is open_clip's (spec §2A): bicubic resize of the shortest side to S, centre crop S x S, convert
to RGB, scale to [0, 1], normalise with the OpenAI CLIP mean and std. Sizes and crop offsets are computed as
torchvision computes them, so pixels match the reference pipeline.

Every image file is read through :func:`open_image` (or :func:`check_image`, :meth:`EvalTransform.load`): the pixel
limit is checked from the header before anything is decoded, and whatever PIL raises for a hostile or broken file
becomes one :class:`DataError` naming it.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from priorclip.errors import DataError, ImageTooLarge, PriorCLIPError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_PIXELS_ENV = "PRIORCLIP_MAX_PIXELS"
# Largest image (width x height, from the file header) read by default. Remote-sensing tiles of 100+ Mpx are normal
# (one Sentinel-2 band is 10980 x 10980 = 121 Mpx), so PIL's own ~89 Mpx guard is too tight; a 16384 x 16384 tile
# (268 Mpx, ~0.8 GB once decoded as RGB) is the largest accepted. A header declaring more (a 30000 x 30000 PNG is
# 900 Mpx: 2.7 GB of RGB for a file of a few hundred bytes) is refused unless $PRIORCLIP_MAX_PIXELS allows it.
DEFAULT_MAX_PIXELS = 16384 * 16384
# A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) only while its shortest side stays at
# least this many times the size it will be resized to, so the bicubic downscale still sees real pixels.
DRAFT_MARGIN = 2
# ... and only above this many pixels (a 4096 x 4096 tile, 50 MB as RGB): smaller JPEGs, every image of the standard
# benchmarks among them, decode in full, so their pixels stay exactly the reference pipeline's (open_clip decodes in
# full; the reduced decode moves a noisy 1800 px scene by cosine 2e-4 after the transform).
DRAFT_MIN_PIXELS = 4096 * 4096
# What PIL raises for malformed files besides OSError (it is not fuzz-clean: struct, index and key errors escape
# some plugins); each becomes "cannot decode image ...". MemoryError: a file within the limit can still be too big.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError,
                  struct.error, ZeroDivisionError, OverflowError, MemoryError)
_IDENTIFY_ONLY = {"MPEG"}  # PIL reads their header but has no decoder (stub plugins are excluded by type)


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else ``$PRIORCLIP_MAX_PIXELS``, else
    :data:`DEFAULT_MAX_PIXELS`; 0 means no limit."""
    if max_pixels is not None:
        if max_pixels < 0:
            raise ValueError(f"max_pixels must be >= 0 (0: no limit), got {max_pixels}")
        return int(max_pixels)
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = float(raw.replace("_", ""))  # 300000000, 300_000_000 and 3e8 all read
    except ValueError:
        value = -1.0
    if value < 0 or value != int(value):
        raise PriorCLIPError(f"${MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels (0: no limit)")
    return int(value)


_PIL_GUARD_LOCK = threading.Lock()


def _lift_pil_guard(limit: int) -> None:
    """Keep PIL's own decompression-bomb guard from firing below our limit.

    PIL checks ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open`` (a warning above ~89 Mpx, a ``DecompressionBombError``,
    which is not an ``OSError``, above twice that), before our header check can run and whatever the user set. This
    is the one place priorclip changes that global, deliberately: it is lifted, never lowered, to the largest limit
    asked for in this process, and switched off only for limit 0 (the user asked for no limit). It stays on otherwise
    because it also stops sizes that only appear while decoding (GIF frame extents, TIFF tiles) at twice our limit.
    """
    with _PIL_GUARD_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and (limit == 0 or current < limit):
            Image.MAX_IMAGE_PIXELS = None if limit == 0 else limit


def _too_big(name: str, pixels: int, limit: int, size: tuple[int, int] | None = None) -> ImageTooLarge:
    dims = f"{size[0]}x{size[1]} = " if size else ""
    return ImageTooLarge(f"image {name} declares {dims}{pixels:,} pixels ({pixels / 1e6:.0f} Mpx) in its header, over the "
                     f"limit of {limit:,} ({limit / 1e6:.0f} Mpx); if it is a real image, raise the limit with "
                     f"{MAX_PIXELS_ENV}=<pixels> (0: no limit)")


def _source_name(source: str | Path | bytes) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def _file(source: str | Path | bytes, name: str):
    """A binary file object for ``source``; a missing or unreadable path raises :class:`DataError`."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    try:
        return open(source, "rb")
    except FileNotFoundError:
        raise DataError(f"image not found: {name}") from None
    except IsADirectoryError:
        raise DataError(f"not an image: {name} is a folder") from None
    except OSError as e:
        raise DataError(f"cannot read image {name}: {e.strerror or e}") from None


def _open_header(fp, name: str, limit: int) -> ImageFile.ImageFile:
    """``Image.open`` (it reads the header only) and the pixel-limit check, before anything is decoded."""
    _lift_pil_guard(limit)
    try:
        # PIL warns above its guard, which is at least our limit: those images are refused just below with a clearer
        # line. The lock makes this warning filter safe among our decoding threads (it is process-wide state).
        with _PIL_GUARD_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:  # over twice the guard: PIL's message has the pixel count
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise (_too_big(name, int(m.group(1)), limit) if m else DataError(f"image {name}: {e}")) from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {name}: {e}") from None
    w, h = img.size
    if limit and w * h > limit:
        raise _too_big(name, w * h, limit, (w, h))
    return img


def _draft(img: ImageFile.ImageFile, target: int) -> None:
    """Let a JPEG over DRAFT_MIN_PIXELS decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps its shortest side
    >= DRAFT_MARGIN x ``target``; other formats and smaller JPEGs are decoded in full (the reference path's pixels)."""
    w, h = img.size
    if w * h <= DRAFT_MIN_PIXELS:
        return
    for s in (8, 4, 2):
        if min(w, h) >= DRAFT_MARGIN * target * s:
            img.draft(None, (w // s, h // s))  # PIL picks scale min(w // (w // s), h // (h // s)) = s
            return


def _decode(img: ImageFile.ImageFile, name: str, draft_size: int | None) -> Image.Image:
    try:
        if draft_size:
            _draft(img, draft_size)
        img.load()  # decode now, so truncated files fail here and not inside a batch
        return to_8bit(img)
    except Image.DecompressionBombError as e:  # a size that appears only while decoding (GIF frame extent)
        raise ImageTooLarge(f"image {name}: {e}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


def open_image(
    source: str | Path | bytes, *, draft_size: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Open and decode an image (path or bytes): its first frame (GIF) or page (multi-page TIFF), 8-bit.

    Args:
        draft_size: the shortest-side size the caller resizes to (the eval transform's S). A JPEG whose shortest side
            is at least 2·DRAFT_MARGIN·S is then decoded at a reduced DCT scale (its shortest side stays >=
            DRAFT_MARGIN·S), so a 100 Mpx tile costs megabytes, not gigabytes. None: full size.
        max_pixels: pixel limit checked from the header before decoding (default: :func:`max_pixels_limit`).

    A missing, corrupt, non-image or over-limit input raises :class:`DataError` naming it.
    """
    name, limit = _source_name(source), max_pixels_limit(max_pixels)
    with _file(source, name) as fp:
        return _decode(_open_header(fp, name, limit), name, draft_size)


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`check_image` read: the header's size and format, and the number of frames or pages."""

    size: tuple[int, int]
    format: str | None
    pages: int  # > 1: a multi-page TIFF or animated image, of which page 0 is the one used


def check_image(source: str | Path | bytes, *, decode: bool = True, draft_size: int | None = None,
                max_pixels: int | None = None) -> ImageInfo:
    """Check an image as :func:`open_image` reads it, without keeping its pixels; raises :class:`DataError`.

    ``decode=False`` reads the header only (identifies the format, checks the pixel limit, counts pages): cheap.
    ``decode=True`` also decodes it as ``open_image(source, draft_size=draft_size)`` would; ``draft_size=1`` decodes
    a large JPEG at 1/8 scale, which still reads all of its data (a cheap check of the whole file).
    """
    name, limit = _source_name(source), max_pixels_limit(max_pixels)
    with _file(source, name) as fp:
        img = _open_header(fp, name, limit)
        try:
            pages = int(getattr(img, "n_frames", 1))
            if pages > 1:
                img.seek(0)
        except _DECODE_ERRORS as e:
            raise DataError(f"cannot decode image {name}: {e}") from None
        info = ImageInfo(img.size, img.format, pages)
        if decode:
            _decode(img, name, draft_size)
        return info


@functools.cache
def image_suffixes() -> frozenset[str]:
    """File suffixes (lower case, with the dot) of every format PIL can decode here: its registered extensions,
    less header-only formats (stub plugins such as HDF5/GRIB, MPEG)."""
    Image.init()

    def decodable(fmt: str) -> bool:
        factory = Image.OPEN[fmt][0] if fmt in Image.OPEN else None
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        return factory is not None and not stub and fmt not in _IDENTIFY_ONLY

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if decodable(fmt))


def to_8bit(img: Image.Image) -> Image.Image:
    """Single-band 16-bit / 32-bit images (common for remote-sensing GeoTIFF/PNG tiles) to 8-bit grey.

    PIL's own conversion clips them at 255 (a 16-bit tile turns white, a [0, 1] float tile black). Integers are mapped
    linearly from their full range (16-bit: v / 257; 32-bit: clipped to 0-255 if the tile fits, else v / 2^24);
    floats are read as [0, 1] reflectance if the tile lies within it, else as 0-255 values.
    """
    if img.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return img
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257.0
    elif img.mode == "I":
        a = a if a.min() >= 0 and a.max() <= 255 else a / 2.0**24
    elif a.size and np.nanmin(a) >= 0 and np.nanmax(a) <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L")


def shortest_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest side to ``size``, as torchvision computes it."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision truncates the long side
    return (size, new_long) if w <= h else (new_long, size)


def resize_shortest(img: Image.Image, size: int) -> Image.Image:
    if min(img.size) == size:
        return img
    return img.resize(shortest_side_size(*img.size, size), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        raise DataError(f"image {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


# resize_center_crop takes the thin-image path when the resized intermediate would be more than this many times the
# S x S crop: beyond an aspect ratio of 4:1, i.e. never for the square-ish tiles of RSICD/AID/UCM.
THIN_FACTOR = 4


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """``center_crop(resize_shortest(img, size), size)``, with memory bounded by the output size.

    A very thin image (4000 x 3 at S = 224) would resize to a 298666 x 224 intermediate (200 MB as RGB) only to keep
    its centre. When the intermediate would exceed THIN_FACTOR·S², only the source window that maps onto the crop is
    resampled (:func:`_resize_window`). Otherwise the reference path runs unchanged (bit-identical to torchvision /
    open_clip).
    """
    w, h = img.size
    if min(w, h) == size:
        return center_crop(img, size)
    new_w, new_h = shortest_side_size(w, h, size)
    if new_w * new_h <= THIN_FACTOR * size * size:
        return center_crop(resize_shortest(img, size), size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # center_crop's offsets
    sx, sy = w / new_w, h / new_h  # resized -> source coordinates
    return _resize_window(img, size, (left * sx, top * sy, (left + size) * sx, (top + size) * sy))


def _resize_window(img: Image.Image, size: int, box: tuple[float, float, float, float]) -> Image.Image:
    """Bicubic resample of the source rectangle ``box`` to ``size`` x ``size``, as the same window of a full resize.

    PIL's ``resize(box=...)`` alone may run its vertical pass first (it picks the cheaper order), and both of its
    passes round and clip to 8 bits, so it can differ from the full resize (horizontal pass first) by 20 levels on
    noisy pixels. The two passes are run here in the full resize's order, each over the pixels its kernel reaches
    (an exact integer crop with a margin), so only PIL's float32 box coordinates can move a value by one level.
    """
    x0, y0, x1, y1 = box

    def reach(a: float, b: float, n: int) -> tuple[int, int]:  # source pixels the kernel touches for outputs in [a, b)
        support = 2.0 * max((b - a) / size, 1.0)  # bicubic support (2) scaled when downsampling, as PIL scales it
        return max(0, math.floor(a - support) - 1), min(n, math.ceil(b + support) + 1)

    (c0, c1), (r0, r1) = reach(x0, x1, img.size[0]), reach(y0, y1, img.size[1])
    part = img.crop((c0, r0, c1, r1))
    part = part.resize((size, r1 - r0), Image.Resampling.BICUBIC, box=(x0 - c0, 0, x1 - c0, r1 - r0))  # horizontal
    return part.resize((size, size), Image.Resampling.BICUBIC, box=(0, y0 - r0, size, y1 - r0))  # vertical


def to_normalized_tensor(img: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] normalised tensor."""
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


RESIZE_CROP = "crop"  # open_clip (PriorCLIP): bicubic shortest side to the size, then the centre square
RESIZE_SQUASH = "squash"  # PIR-pytorch: Resize((size, size)) bicubic of the RGB image, aspect not kept, nothing cut
RESIZES = (RESIZE_CROP, RESIZE_SQUASH)


class EvalTransform:
    """Eval preprocessing to a square input of ``image_size``: open_clip's (``resize="crop"``) or PIR-pytorch's
    (``resize="squash"``); both normalise with the OpenAI mean and std."""

    def __init__(self, image_size: int = 224, resize: str = RESIZE_CROP) -> None:
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.image_size = image_size
        self.resize = resize

    def __call__(self, img: Image.Image) -> torch.Tensor:
        s = self.image_size
        if self.resize == RESIZE_SQUASH:  # the reference converts to RGB first, then resizes
            return to_normalized_tensor(img.convert("RGB").resize((s, s), Image.Resampling.BICUBIC))
        return to_normalized_tensor(resize_center_crop(img, s).convert("RGB"))

    def load(self, source: str | Path | bytes, *, max_pixels: int | None = None) -> torch.Tensor:
        """Read an image file (path or bytes) and preprocess it: the way every eval-time caller reads images.

        Decodes through :func:`open_image` with ``draft_size=image_size`` (a large JPEG decodes at reduced scale);
        anything unreadable raises :class:`DataError` naming the file. The two steps are :meth:`open` and
        :meth:`pixels` (the service times them apart).
        """
        return self.pixels(self.open(source, max_pixels=max_pixels), _source_name(source))

    def open(self, source: str | Path | bytes, *, max_pixels: int | None = None) -> Image.Image:
        """Decode an image as :meth:`load` does (:func:`open_image` at this transform's draft size)."""
        return open_image(source, draft_size=self.image_size, max_pixels=max_pixels)

    def pixels(self, img: Image.Image, name: str = "<bytes>") -> torch.Tensor:
        """The decoded image to normalised pixels; a mode PIL cannot convert to RGB (e.g. a LAB TIFF) is a
        :class:`DataError` naming ``name``."""
        try:
            return self(img)
        except ValueError as e:
            raise DataError(f"cannot convert image {name} to RGB: {e}") from None

    def __repr__(self) -> str:
        how = "bicubic squash to a square" if self.resize == RESIZE_SQUASH else "bicubic shortest-side resize, centre crop"
        return f"EvalTransform(image_size={self.image_size}, {how}, OpenAI mean/std)"
