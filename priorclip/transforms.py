"""Image loading and the evaluation transform, in PIL + torch (no torchvision).

The eval transform is open_clip's (spec §2A): bicubic resize of the shortest side to S, centre crop S x S, convert
to RGB, scale to [0, 1], normalise with the OpenAI CLIP mean and std. Sizes and crop offsets are computed as
torchvision computes them, so pixels match the reference pipeline.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from priorclip.errors import DataError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


def open_image(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image (path or bytes); a corrupt or non-image input raises :class:`DataError`."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        img.load()  # decode now, so truncated files fail here and not inside a batch
        return to_8bit(img)
    except FileNotFoundError:
        raise DataError(f"image not found: {name}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


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


def resize_shortest(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)  # torchvision truncates the long side
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        raise DataError(f"image {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] normalised tensor."""
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


class EvalTransform:
    """open_clip's eval preprocessing for a square input of ``image_size``."""

    def __init__(self, image_size: int = 224) -> None:
        self.image_size = image_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = center_crop(resize_shortest(img, self.image_size), self.image_size)
        return to_normalized_tensor(img.convert("RGB"))

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, bicubic shortest-side resize, centre crop, OpenAI mean/std)"
