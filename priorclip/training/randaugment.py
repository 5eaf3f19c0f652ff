"""RandAugment as in PIR-pytorch's training transform (spec §5B: ``RandomAugment(2, 7)`` after the crop and flip).

What is taken from the reference (``dataset/randaugment.py``), as facts:

* ``n`` ops are drawn uniformly *with replacement* from the op list; each drawn op then runs with probability 0.5.
* Magnitudes are on a 0-10 scale (``MAX_LEVEL``). Brightness and Sharpness use the enhance factor 0.1 + 1.8·M/10
  (1.36 at M = 7: always above 1, so they only brighten and sharpen); ShearX/Y shear by 0.3·M/10 (0.21); TranslateX/Y
  move by 10·M/10 pixels (7 px, absolute, whatever the image size); Rotate turns by 30·M/10 degrees (21). The geometric
  ops get a random sign (a fair coin) and fill the uncovered area with grey (128, 128, 128). Identity, AutoContrast
  (cut-off 0, per channel) and Equalize take no magnitude.
* Geometry: shear and translation in pixel-index coordinates about pixel (0, 0), as OpenCV's ``warpAffine``:
  ShearX moves pixel (x, y) to (x + f·y, y), TranslateX by +d moves content d pixels to the left; positive angles
  turn counter-clockwise; bilinear sampling.

Deliberate differences (the reference runs OpenCV on uint8 arrays; this runs PIL):

* Rotate turns about the true image centre, ((W-1)/2, (H-1)/2) in pixel indices (PIL's convention); the reference
  passes (W/2, H/2) to OpenCV, half a pixel right of and below the centre.
* Sharpness clips the blend to 0-255; the reference casts the unclipped float blend to uint8, so an overshoot past
  255 (or below 0) next to an edge wraps around to a dark (or bright) pixel.
* Bilinear weights are PIL's floating-point ones (OpenCV uses 5-bit fixed-point weights) and pixels whose sample
  falls partly outside the image are blended with the border differently, so values can differ by a grey level or
  two and along the edges. Brightness, AutoContrast and Equalize match the reference's formulas exactly.
* Random draws come from the caller's ``numpy.random.Generator`` instead of NumPy's global state, so a sample's
  augmentation is reproducible from its generator.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
TRANSLATE_PX = 10.0  # translation at the maximum level, in pixels
FILL = (128, 128, 128)
APPLY_P = 0.5
DEFAULT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
               "TranslateY", "Rotate")


def _affine(img: Image.Image, m: tuple[float, float, float, float, float, float]) -> Image.Image:
    """Output pixel (x, y) samples the input at pixel index (a·x + b·y + c, d·x + e·y + f), bilinear, grey outside.

    PIL addresses a pixel by its centre at index + 0.5, so the offsets are shifted to keep OpenCV's index geometry.
    """
    a, b, c, d, e, f = m
    data = (a, b, c + 0.5 * (1 - a - b), d, e, f + 0.5 * (1 - d - e))
    return img.transform(img.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=FILL)


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=FILL)


# op name -> (apply(img, parameter), magnitude -> unsigned parameter or None, takes a random sign)
_OPS: dict[str, tuple[Callable[[Image.Image, float | None], Image.Image], Callable[[float], float] | None, bool]] = {
    "Identity": (lambda img, _: img, None, False),
    "AutoContrast": (lambda img, _: ImageOps.autocontrast(img), None, False),
    "Equalize": (lambda img, _: ImageOps.equalize(img), None, False),
    "Brightness": (lambda img, f: ImageEnhance.Brightness(img).enhance(f), lambda m: 0.1 + 1.8 * m / MAX_LEVEL, False),
    "Sharpness": (lambda img, f: ImageEnhance.Sharpness(img).enhance(f), lambda m: 0.1 + 1.8 * m / MAX_LEVEL, False),
    "ShearX": (lambda img, s: _affine(img, (1, -s, 0, 0, 1, 0)), lambda m: 0.3 * m / MAX_LEVEL, True),
    "ShearY": (lambda img, s: _affine(img, (1, 0, 0, -s, 1, 0)), lambda m: 0.3 * m / MAX_LEVEL, True),
    "TranslateX": (lambda img, d: _affine(img, (1, 0, d, 0, 1, 0)), lambda m: TRANSLATE_PX * m / MAX_LEVEL, True),
    "TranslateY": (lambda img, d: _affine(img, (1, 0, 0, 0, 1, d)), lambda m: TRANSLATE_PX * m / MAX_LEVEL, True),
    "Rotate": (_rotate, lambda m: 30.0 * m / MAX_LEVEL, True),
}
KNOWN_OPS = tuple(_OPS)


def op_parameter(op: str, magnitude: float) -> float | None:
    """The op's unsigned parameter at ``magnitude`` (enhance factor, shear, pixels or degrees); None if it has none."""
    _check_op(op)
    to_param = _OPS[op][1]
    return None if to_param is None else to_param(magnitude)


def apply_op(img: Image.Image, op: str, parameter: float | None = None) -> Image.Image:
    """Apply one op with an explicit (signed) parameter, e.g. ``apply_op(img, "ShearX", -0.21)``."""
    _check_op(op)
    if _OPS[op][1] is not None and parameter is None:
        raise ValueError(f"RandAugment op {op!r} needs a parameter")
    return _OPS[op][0](img, parameter)


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"unknown RandAugment op {op!r} (known: {', '.join(KNOWN_OPS)})")


class RandAugment:
    """``n`` ops drawn with replacement from ``ops``, each applied with probability ``p`` at ``magnitude`` (0-10)."""

    def __init__(self, n: int = 2, magnitude: float = 7, ops: tuple[str, ...] = DEFAULT_OPS, p: float = APPLY_P) -> None:
        if n < 0:
            raise ValueError(f"RandAugment n must be >= 0, got {n}")
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL:g}], got {magnitude}")
        if not 0 <= p <= 1:
            raise ValueError(f"RandAugment p must be in [0, 1], got {p}")
        if not ops:
            raise ValueError("RandAugment needs at least one op")
        for op in ops:
            _check_op(op)
        self.n, self.magnitude, self.ops, self.p = n, magnitude, tuple(ops), p

    def draw(self, rng: np.random.Generator) -> list[tuple[str, float | None]]:
        """The ops this call would apply, in order, with their signed parameters (the kept subset of the n picks)."""
        picked = rng.integers(0, len(self.ops), size=self.n)
        chosen = []
        for i in picked:
            op = self.ops[int(i)]
            if rng.random() >= self.p:
                continue
            param = op_parameter(op, self.magnitude)
            if _OPS[op][2] and rng.random() < 0.5:
                param = -param
            chosen.append((op, param))
        return chosen

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """RGB PIL image -> augmented RGB PIL image of the same size; deterministic for a given ``rng`` state."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"RandAugment expects a PIL image, got {type(img).__name__}")
        if img.mode != "RGB":
            raise ValueError(f"RandAugment expects an RGB image, got mode {img.mode!r}")
        for op, param in self.draw(rng):
            img = apply_op(img, op, param)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, magnitude={self.magnitude}, ops={self.ops}, p={self.p})"
