"""What a request may carry, and the precise status for what it may not.

Every refusal is a :class:`RequestError` with an HTTP status and a short ``kind`` (the error label in the metrics):

- 413 ``too_large``: a body over the byte limit (checked from Content-Length and while streaming, before parsing) or
  an image whose header declares more pixels than the limit (checked before any pixel is decoded: a decompression
  bomb never reaches the decoder);
- 415 ``unsupported_media``: a content type that is not an image (an upload's part, a ``data:`` URI), or a request
  body that is neither JSON nor multipart;
- 422 ``bad_image`` / ``bad_text`` / ``bad_request``: bytes that do not decode as an image, bad base64, an empty
  batch, an empty or over-long caption, a malformed body.

Images are read exactly as ``priorclip embed`` and ``priorclip index build`` read files
(:meth:`priorclip.transforms.EvalTransform.load`, in its two steps so that each is timed: first page of a multi-page
TIFF, 16-bit and float tiles mapped to 8 bit, palette / CMYK / RGBA / grey converted to RGB, thin images handled by
the crop rule). Captions longer than the
model's context are truncated by the model's own tokenizer, as the reference does (CLIP: 77 tokens; PIR: 30 words);
only captions over ``max_text_chars`` characters are refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import torch
from PIL import Image

from priorclip.errors import DataError, ImageTooLarge, PriorCLIPError
from priorclip.transforms import MAX_PIXELS_ENV

# Content types an image part may declare besides image/*: clients often send no type or the generic one.
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


class RequestError(PriorCLIPError):
    """A request the service refuses; ``status`` is the HTTP status, ``kind`` the metrics' error label."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers or {}


def too_large(message: str) -> RequestError:
    return RequestError(413, "too_large", message)


def unsupported_media(message: str) -> RequestError:
    return RequestError(415, "unsupported_media", message)


def bad_request(message: str, kind: str = "bad_request") -> RequestError:
    return RequestError(422, kind, message)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 32 << 20
    max_pixels: int = 100_000_000  # declared in the header; a 10k x 10k tile passes, a bomb does not
    max_items: int = 256  # images or captions per request
    max_text_chars: int = 2000


def check_media_type(content_type: str | None, where: str) -> None:
    """415 unless ``content_type`` may hold an image (image/*, the generic binary types, or none at all)."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in GENERIC_TYPES or ct.startswith("image/"):
        return
    raise unsupported_media(f"{where}: content type {ct!r} is not an image (send image/* bytes)")


def is_data_uri(s: str) -> bool:
    return s[:5].lower() == "data:"


def decode_data_uri(uri: str, where: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI; 415 for a non-image type, 422 for a malformed one."""
    m = _DATA_URI.match(uri)
    if not m:
        raise bad_request(f"{where}: malformed data URI (expected data:image/<type>;base64,<data>)", "bad_image")
    check_media_type(m.group("type"), where)
    if not m.group("b64"):
        raise bad_request(f"{where}: the data URI is not base64-encoded (add ;base64)", "bad_image")
    return decode_base64(uri[m.end():], where)


def decode_base64(s: str, where: str) -> bytes:
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: not valid base64", "bad_image") from None
    if not data:
        raise bad_request(f"{where}: empty image", "bad_image")
    return data


def image_bytes(value: str, where: str) -> bytes:
    """A JSON image field: a data URI or bare base64."""
    if not isinstance(value, str):
        raise bad_request(f"{where}: an image must be a base64 string or a data:image/...;base64, URI")
    return decode_data_uri(value, where) if is_data_uri(value) else decode_base64(value, where)


def decode_image(transform, data: bytes, where: str, max_pixels: int) -> Image.Image:
    """:meth:`EvalTransform.open <priorclip.transforms.EvalTransform.open>` (header pixel limit, draft decoding,
    first page, 8 bit); 413 over the pixel limit, 422 undecodable."""
    if not data:
        raise bad_request(f"{where}: empty image", "bad_image")
    try:
        return transform.open(data, max_pixels=max_pixels)
    except ImageTooLarge as e:
        raise too_large(f"{where}: {_strip_name(e)}") from None
    except DataError as e:
        raise bad_request(f"{where}: {_strip_name(e)}", "bad_image") from None


def preprocess_image(transform, img: Image.Image, where: str) -> torch.Tensor:
    """:meth:`EvalTransform.pixels <priorclip.transforms.EvalTransform.pixels>`: the model's resize and
    normalisation; 422 for a mode PIL cannot convert to RGB."""
    try:
        return transform.pixels(img)
    except DataError as e:
        raise bad_request(f"{where}: {_strip_name(e)}", "bad_image") from None


def _strip_name(e: Exception) -> str:
    # the transforms name a byte source "<bytes>" and PIL its file object; the request's position (where) says more
    msg = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e).replace(" <bytes>", ""))
    return msg.replace(f"{MAX_PIXELS_ENV}=<pixels> (0: no limit)", "the service's --max-pixels")


def check_captions(texts, limits: Limits, where: str = "input") -> list[str]:
    """A non-empty list of non-empty strings within the size limits."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise bad_request(f"{where}: give a caption or a non-empty list of captions")
    if len(texts) > limits.max_items:
        raise too_large(f"{where}: {len(texts)} items in one request, over the limit of {limits.max_items}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise bad_request(f"{where}[{i}]: a caption must be a string, got {type(t).__name__}", "bad_text")
        if not t.strip():
            raise bad_request(f"{where}[{i}]: empty caption", "bad_text")
        if len(t) > limits.max_text_chars:
            raise bad_request(f"{where}[{i}]: caption of {len(t)} characters, over the limit of "
                              f"{limits.max_text_chars}", "bad_text")
    return texts
