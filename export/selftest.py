"""The load-time self-test's probes and their fp32 reference embeddings, written into every export.

A service that loads an engine embeds a few fixed probes through its own full path (bytes in: decode, transform,
tokenise, engine) and compares them with what the fp32 torch reference made of the same probes at export time
(:mod:`priorclip.serve.selftest`). A wrong execution provider, a stale or corrupted engine file or a broken
preprocessing path then fails loudly at start instead of ranking subtly wrong.

The probes are made by code, not downloaded: six procedurally drawn remote-sensing-like scenes of different sizes and
aspect ratios in every PNG mode a user meets (RGB, palette, 8-bit grey, RGBA, 16-bit grey), encoded as PNG (lossless,
so every machine decodes the same pixels), and six remote-sensing captions of different lengths. The export stores the
PNG bytes themselves beside the embeddings, so what a service embeds is byte for byte what the reference embedded.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SELFTEST_FILE = "selftest.npz"
SELFTEST_FORMAT = "priorclip-selftest/1"
REFERENCE = "fp32 torch, cpu"

# Different lengths (1 to 27 words) so that PIR's token-length grouping is exercised; one with capitals and
# punctuation for its caption cleaning. All stay within PIR's 30 words / 46 word pieces, so no service truncates or
# refuses them.
PROBE_CAPTIONS = (
    "a lake surrounded by green trees",
    "many buildings and green trees are around a playground with a red running track",
    "two straight roads cross each other near some farmland",
    "The dense residential area has rows of houses with red roofs; several cars are parked along the street.",
    "desert",
    "an airport with three planes parked beside the terminal building and a long runway running from the top left "
    "to the bottom right of the image",
)


def _noise(h: int, w: int, salt: int) -> np.ndarray:
    """Integer-hash noise in [0, 1), [h, w]: the same values on every machine and numpy version (no RNG stream)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.uint64)
    v = (x * np.uint64(374761393) + y * np.uint64(668265263) + np.uint64(salt) * np.uint64(1442695041))
    v &= np.uint64(0xFFFFFFFF)
    v = ((v ^ (v >> np.uint64(13))) * np.uint64(1274126177)) & np.uint64(0xFFFFFFFF)
    return (v >> np.uint64(24)).astype(np.float64) / 256.0


def _textured(w: int, h: int, base: tuple[int, int, int], salt: int, amp: float = 24.0) -> Image.Image:
    n = _noise(h, w, salt)[..., None] - 0.5
    return Image.fromarray(np.clip(np.array(base, np.float64) + amp * n, 0, 255).round().astype(np.uint8))


def _lake() -> Image.Image:  # RGB, square
    img = _textured(96, 96, (60, 110, 70), 1)
    ImageDraw.Draw(img).ellipse([18, 26, 80, 74], fill=(30, 60, 140))
    return img


def _farmland() -> Image.Image:  # RGB, wide (16:9), larger than a full model's 224 px input
    img = _textured(320, 180, (120, 140, 60), 2)
    d = ImageDraw.Draw(img)
    for i in range(0, 320, 24):
        d.rectangle([i, 0, i + 11, 179], fill=(90 + (i // 24 % 3) * 30, 120, 50))
    return img


def _crossing() -> Image.Image:  # palette, tall and thin
    img = _textured(72, 180, (120, 120, 110), 3)
    d = ImageDraw.Draw(img)
    d.rectangle([31, 0, 41, 179], fill=(70, 70, 70))
    d.rectangle([0, 85, 71, 95], fill=(70, 70, 70))
    return img.quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def _residential() -> Image.Image:  # 8-bit grey
    img = _textured(128, 128, (150, 140, 130), 4).convert("L")
    d = ImageDraw.Draw(img)
    for i in range(4):
        for j in range(4):
            d.rectangle([6 + 32 * i, 6 + 32 * j, 24 + 32 * i, 24 + 32 * j], fill=70 + 20 * ((i + j) % 3))
    return img


def _forest() -> Image.Image:  # RGBA with uneven alpha (the transform drops it)
    img = _textured(120, 100, (30, 80, 40), 5)
    d = ImageDraw.Draw(img)
    for k in range(12):
        x, y = 10 + (k * 37) % 100, 8 + (k * 23) % 84
        d.ellipse([x - 7, y - 7, x + 7, y + 7], fill=(20, 60 + 3 * k, 25))
    alpha = (255 * (0.4 + 0.6 * _noise(100, 120, 6))).astype(np.uint8)
    img.putalpha(Image.fromarray(alpha))
    return img


def _dunes() -> Image.Image:  # 16-bit grey, as many remote-sensing tiles are
    y, x = np.mgrid[0:150, 0:200].astype(np.float64)
    v = 0.55 + 0.3 * np.sin(x / 11.0 + 0.4 * np.sin(y / 17.0)) + 0.1 * (_noise(150, 200, 7) - 0.5)
    return Image.fromarray(np.clip(v * 65535, 0, 65535).round().astype(np.uint16))


_PROBE_IMAGES = (_lake, _farmland, _crossing, _residential, _forest, _dunes)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def probe_inputs() -> tuple[list[bytes], list[str]]:
    """The self-test's probe images (PNG bytes: RGB 96x96 and 320x180, palette 72x180, grey 128x128, RGBA 120x100,
    16-bit grey 200x150) and captions, the same on every call."""
    return [_png(make()) for make in _PROBE_IMAGES], list(PROBE_CAPTIONS)


def _cpu_fp32(model):
    """The model on CPU in fp32 and eval mode; a copy only when it is elsewhere (the caller's model never moves)."""
    p = next(model.parameters(), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        model = copy.deepcopy(model).float().cpu()
    return model.eval()


def reference_embeddings(model, images: list[bytes], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ([n, E], [m, E] float32) of ``images`` (encoded bytes) and ``captions`` by the fp32 torch reference
    on the CPU, through the path a service takes: ``open_image`` -> the model's eval transform -> the image encoder;
    the model's tokenizer -> the text encoder.

    Every probe is embedded on its own (a batch of one): the closed-domain PIR attends to its [PAD] tokens, so a
    caption's embedding depends on what it is padded to, and a service runs each caption unpadded (it groups PIR
    captions by token length). For PriorCLIP the EOT pooling makes batching exact anyway.
    """
    from priorclip.encoder import TorchEncoder
    from priorclip.numerics import fp32_matmuls
    from priorclip.preprocess import preprocess_for
    from priorclip.transforms import open_image

    enc = TorchEncoder(_cpu_fp32(model), "cpu")
    pre = preprocess_for(enc.config)
    size = pre.transform.image_size
    with fp32_matmuls():
        img = [enc.encode_images(pre.transform(open_image(b, draft_size=size))[None]) for b in images]
        txt = [enc.encode_texts(pre.tokenizer([c])) for c in captions]
    dim = int(enc.config.embed_dim)
    as_np = lambda rows: (torch.cat(rows).numpy() if rows else np.zeros((0, dim))).astype(np.float32)  # noqa: E731
    return as_np(img), as_np(txt)


def write_selftest(model, out_dir: str | Path) -> dict:
    """Write ``OUT/selftest.npz`` (the probes' PNG bytes, captions and fp32 reference embeddings) atomically; returns
    the manifest entry (file, sha256, counts, reference)."""
    from priorclip.checkpoint import file_sha256
    from priorclip.cliutils import write_npz

    images, captions = probe_inputs()
    image_emb, text_emb = reference_embeddings(model, images, captions)
    path = write_npz(Path(out_dir) / SELFTEST_FILE, format=np.array(SELFTEST_FORMAT),
                     image_bytes=np.frombuffer(b"".join(images), np.uint8),
                     image_lengths=np.array([len(b) for b in images], np.int64),
                     captions=np.array(captions), image_emb=image_emb, text_emb=text_emb)
    return {"file": SELFTEST_FILE, "sha256": file_sha256(path), "n_images": len(images), "n_captions": len(captions),
            "reference": REFERENCE}
