"""RandAugment (PIR-pytorch's RandomAugment(2, 7)): each op against a hand computation on a small image, the magnitude
mapping of the reference, the draw (n picks with replacement, p = 0.5, random signs), determinism and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from priorclip.training.randaugment import DEFAULT_OPS, RandAugment, apply_op, op_parameter

GREY = 128  # the reference's fill for uncovered pixels


def _img(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), "RGB")


def _arr(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int64)


def _ramp(h: int, w: int) -> np.ndarray:
    """R = 10x + 5 (varies along x), G = 10y + 5 (along y), B = 200: every pixel tells where it came from."""
    a = np.zeros((h, w, 3), np.int64)
    a[..., 0] = 10 * np.arange(w)[None, :] + 5
    a[..., 1] = 10 * np.arange(h)[:, None] + 5
    a[..., 2] = 200
    return a


def test_magnitude_mapping_equals_reference_at_m7():
    # PIR-pytorch, MAX_LEVEL 10: enhance 0.7 * 1.8 + 0.1, shear 0.7 * 0.3, translate 0.7 * 10 px, rotate 0.7 * 30 deg
    expected = {"Identity": None, "AutoContrast": None, "Equalize": None, "Brightness": 1.36, "Sharpness": 1.36,
                "ShearX": 0.21, "ShearY": 0.21, "TranslateX": 7.0, "TranslateY": 7.0, "Rotate": 21.0}
    assert set(expected) == set(DEFAULT_OPS)
    for op, value in expected.items():
        got = op_parameter(op, 7)
        assert got == value if value is None else got == pytest.approx(value, abs=1e-12), op
    assert op_parameter("Brightness", 0) == pytest.approx(0.1) and op_parameter("Brightness", 10) == pytest.approx(1.9)
    assert op_parameter("Rotate", 10) == pytest.approx(30.0) and op_parameter("TranslateY", 10) == pytest.approx(10.0)
    assert op_parameter("ShearY", 0) == 0.0


def test_identity():
    a = _ramp(4, 5)
    assert np.array_equal(_arr(apply_op(_img(a), "Identity")), a)


def test_brightness_on_constant_images():
    # out = floor(v * f) clipped to 255 (the reference's uint8 table); f = 1.36
    a = np.empty((3, 4, 3), np.int64)
    a[...] = (10, 100, 200)
    out = _arr(apply_op(_img(a), "Brightness", 1.36))
    assert np.all(out == np.array([13, 136, 255])), out[0, 0]
    assert np.all(_arr(apply_op(_img(a), "Brightness", 0.5)) == np.array([5, 50, 100]))


def _sharpness_by_hand(a: np.ndarray, f: float) -> np.ndarray:
    """Interior: degenerate = round(3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13), out = floor(d + f (v - d)) clipped to 0-255;
    the border keeps its pixels (PIL and the reference alike); float64 throughout."""
    out = a.astype(np.float64).copy()
    h, w = a.shape[:2]
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            win = a[y - 1:y + 2, x - 1:x + 2].astype(np.float64)
            d = np.floor((win.sum(axis=(0, 1)) + 4 * a[y, x]) / 13 + 0.5)
            out[y, x] = np.clip(np.floor(d + f * (a[y, x] - d)), 0, 255)
    return out.astype(np.int64)


def test_sharpness_by_hand():
    a = np.zeros((5, 5, 3), np.int64)
    a[2, 2] = 130
    a[0, 0] = 250  # a border pixel: kept
    out = _arr(apply_op(_img(a), "Sharpness", 1.36))
    expected = np.zeros((5, 5), np.int64)
    expected[2, 2] = 158  # d = 5·130/13 = 50; 50 + 1.36·80 = 158.8
    expected[0, 0] = 250  # neighbours of the centre: d = 10, 10 - 13.6 < 0 -> 0
    assert np.array_equal(out[..., 0], expected)
    # an overshoot is clipped (the reference's unclipped uint8 cast would wrap 96 + 1.36·154 = 305 around to 49)
    a[2, 2] = 250
    assert _arr(apply_op(_img(a), "Sharpness", 1.36))[2, 2, 0] == 255
    rng = np.random.default_rng(0)
    r = rng.integers(0, 256, (7, 9, 3))
    got, want = _arr(apply_op(_img(r), "Sharpness", 1.36)), _sharpness_by_hand(r, 1.36)
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.95  # float32 vs float64 at integer boundaries


def test_autocontrast_per_channel():
    # per channel: lo -> 0, hi -> 255, v -> floor((v - lo) · 255 / (hi - lo)); a constant channel is left alone
    a = np.zeros((2, 3, 3), np.int64)
    a[..., 0] = [[10, 61, 10], [61, 10, 61]]  # scale 5
    a[..., 1] = 77
    a[..., 2] = [[100, 151, 202], [100, 151, 202]]  # scale 2.5: 151 -> 127.5 -> 127
    out = _arr(apply_op(_img(a), "AutoContrast"))
    assert np.array_equal(out[..., 0], [[0, 255, 0], [255, 0, 255]])
    assert np.all(out[..., 1] == 77)
    assert np.array_equal(out[0, :, 2], [0, 127, 255])
    # no cut-off: a single dark and a single bright outlier among 100 pixels still set the range (100 -> 127). The
    # table is v·scale + offset, scale = 255 / (hi - lo), truncated: 200 · 1.275 = 254.99999999999997 -> 254, as in
    # the reference and PIL
    b = np.full((10, 10, 3), 100, np.int64)
    b[0, 0], b[9, 9] = 0, 200
    out = _arr(apply_op(_img(b), "AutoContrast"))
    assert out[0, 0, 0] == 0 and out[9, 9, 0] == int(200 * (255 / 200)) == 254 and np.all(out[1:9] == 127)


def test_equalize_by_hand():
    # PIL's (and the reference's) rule per channel: step = (pixels - count of the last level) // 255;
    # level i -> (step // 2 + pixels below i) // step, clipped to 255
    a = np.zeros((32, 32, 3), np.int64)
    flat = a.reshape(-1, 3)
    flat[:255, 0], flat[255:510, 0], flat[510:, 0] = 10, 100, 200  # step 2: 0, (1 + 255) // 2 = 128, 255
    flat[:512, 1], flat[512:, 1] = 50, 150  # step 2: 0, (1 + 512) // 2 = 256 -> 255
    flat[:, 2] = 77  # one level: unchanged
    out = _arr(apply_op(_img(a), "Equalize")).reshape(-1, 3)
    assert set(out[:255, 0]) == {0} and set(out[255:510, 0]) == {128} and set(out[510:, 0]) == {255}
    assert set(out[:512, 1]) == {0} and set(out[512:, 1]) == {255}
    assert set(out[:, 2]) == {77}


@pytest.mark.parametrize("shear", [0.5, -0.5])
def test_shear_x_moves_rows_by_factor_times_y(shear):
    # OpenCV's geometry: pixel (x, y) moves to (x + s·y, y), so out(x, y) = in(x - s·y, y); grey where that is outside
    h, w = 6, 8
    a = _ramp(h, w)
    out = _arr(apply_op(_img(a), "ShearX", shear))
    for y in range(h):
        for x in range(w):
            src = x - shear * y
            if src <= -1 or src >= w:
                assert np.all(out[y, x] == GREY), (x, y)
            elif 0 <= src <= w - 1:
                lo = math.floor(src)
                t = src - lo
                r = a[y, lo, 0] * (1 - t) + (a[y, min(lo + 1, w - 1), 0] * t if t else 0)
                assert out[y, x, 0] == r and out[y, x, 1] == a[y, 0, 1], (x, y)
    # a marked pixel moves by s·y: (3, 4) -> (3 + 4s, 4)
    b = np.zeros((6, 8, 3), np.int64)
    b[4, 3] = 255
    moved = _arr(apply_op(_img(b), "ShearX", shear))[..., 0]
    assert moved[4, int(3 + 4 * shear)] == 255 and (moved == 255).sum() == 1


def test_shear_y_moves_columns_by_factor_times_x():
    h, w = 8, 6
    a = _ramp(h, w)
    out = _arr(apply_op(_img(a), "ShearY", 0.5))
    for x in range(0, w, 2):  # even columns move by whole pixels
        shift = x // 2
        assert np.array_equal(out[shift:, x, 1], a[:h - shift, x, 1]), x
        assert np.all(out[:shift, x] == GREY)
    assert out[5, 1, 1] == (a[4, 1, 1] + a[5, 1, 1]) // 2  # odd column: half a pixel, bilinear


@pytest.mark.parametrize("op,axis", [("TranslateX", 1), ("TranslateY", 0)])
def test_translate_by_m7_pixels(op, axis):
    a = _ramp(10, 12)
    d = op_parameter(op, 7)  # 7 px
    for sign in (1, -1):
        out = _arr(apply_op(_img(a), op, sign * d))
        want = np.full_like(a, GREY)
        n = a.shape[axis]
        if sign > 0:  # +d: out(x) = in(x + d), content moves left / up
            src = [slice(None)] * 3
            src[axis], dst = slice(7, n), [slice(None)] * 3
            dst[axis] = slice(0, n - 7)
        else:
            src = [slice(None)] * 3
            src[axis], dst = slice(0, n - 7), [slice(None)] * 3
            dst[axis] = slice(7, n)
        want[tuple(dst)] = a[tuple(src)]
        assert np.array_equal(out, want), sign


def test_rotate_about_the_image_centre():
    # counter-clockwise by t on screen (y down): out(x, y) = in(cx + (x-cx)cos t - (y-cy)sin t, cy + (x-cx)sin t
    # + (y-cy)cos t), centre ((W-1)/2, (H-1)/2); 90 degrees on a 6 x 8 image lands on whole pixels
    h, w = 6, 8
    a = _ramp(h, w)
    out = _arr(apply_op(_img(a), "Rotate", 90.0))
    cx, cy = (w - 1) / 2, (h - 1) / 2
    t = math.radians(90)
    for y in range(h):
        for x in range(w):
            sx = round(cx + (x - cx) * math.cos(t) - (y - cy) * math.sin(t), 9)
            sy = round(cy + (x - cx) * math.sin(t) + (y - cy) * math.cos(t), 9)
            if 0 <= sx <= w - 1 and 0 <= sy <= h - 1:
                assert np.array_equal(out[y, x], a[int(sy), int(sx)]), (x, y)
            else:
                assert np.all(out[y, x] == GREY), (x, y)
    # direction: the pixel right of the centre goes above it
    b = np.zeros((7, 7, 3), np.int64)
    b[3, 5] = 255
    assert _arr(apply_op(_img(b), "Rotate", 90.0))[1, 3, 0] == 255
    # 180 degrees about the true centre of an odd x even image is an exact flip of both axes
    c = _ramp(5, 8)
    assert np.array_equal(_arr(apply_op(_img(c), "Rotate", 180.0)), c[::-1, ::-1])
    # the reference's 21 degrees: the centre of an odd image stays, the corners turn out of view (grey)
    d = _ramp(9, 9)
    r = _arr(apply_op(_img(d), "Rotate", op_parameter("Rotate", 7)))
    assert np.array_equal(r[4, 4], d[4, 4])
    for y, x in ((0, 0), (0, 8), (8, 0), (8, 8)):
        assert np.all(r[y, x] == GREY)


def test_rgb_in_rgb_out_same_size_and_deterministic():
    rng0 = np.random.default_rng(1)
    a = rng0.integers(0, 256, (30, 40, 3))
    img = _img(a)
    aug = RandAugment()
    outs = []
    for seed in range(40):
        o1 = aug(img, np.random.default_rng(seed))
        o2 = aug(img, np.random.default_rng(seed))
        assert o1.mode == "RGB" and o1.size == (40, 30)
        assert o1.tobytes() == o2.tobytes(), seed
        outs.append(o1.tobytes())
    assert len(set(outs)) > 10  # different generators, different augmentations
    assert img.tobytes() == _img(a).tobytes()  # the input is not modified


def test_n_picks_with_replacement_applied_in_order():
    aug = RandAugment(n=3, ops=("ShearX", "Rotate"), p=1.0)
    draws = [aug.draw(np.random.default_rng(s)) for s in range(200)]
    assert all(len(d) == 3 for d in draws)
    names = [tuple(op for op, _ in d) for d in draws]
    assert any(len(set(n)) == 1 for n in names) and any(len(set(n)) == 2 for n in names)  # with replacement
    signs = [param > 0 for d in draws for _, param in d]
    assert 0.35 < np.mean(signs) < 0.65  # a fair coin for the sign
    assert all(abs(p) == pytest.approx(0.21 if op == "ShearX" else 21.0) for d in draws for op, p in d)
    # both picks run, one after the other: floor(floor(100 · 1.36) · 1.36) = floor(136 · 1.36) = 184
    const = _img(np.full((4, 4, 3), 100))
    assert np.all(_arr(RandAugment(n=2, ops=("Brightness",), p=1.0)(const, np.random.default_rng(0))) == 184)
    assert RandAugment(n=0)(const, np.random.default_rng(0)).tobytes() == const.tobytes()
    assert RandAugment(p=0.0).draw(np.random.default_rng(0)) == []


def test_each_pick_applied_with_probability_half():
    const = _img(np.full((2, 2, 3), 100))
    aug = RandAugment(n=1, ops=("Brightness",))
    trials = 2000
    applied = sum(int(_arr(aug(const, np.random.default_rng(s)))[0, 0, 0] == 136) for s in range(trials))
    sd = math.sqrt(trials * 0.25)
    assert abs(applied - trials / 2) < 5 * sd, applied
    kept = [len(RandAugment().draw(np.random.default_rng(10_000 + s))) for s in range(trials)]
    assert abs(np.mean(kept) - 1.0) < 5 * math.sqrt(0.5 / trials)  # n = 2 picks x p = 0.5


def test_bad_inputs():
    for kw in ({"n": -1}, {"magnitude": 11}, {"magnitude": -1}, {"p": 1.5}, {"ops": ()}, {"ops": ("Solarize",)}):
        with pytest.raises(ValueError):
            RandAugment(**kw)
    aug = RandAugment()
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="PIL image"):
        aug(np.zeros((4, 4, 3), np.uint8), rng)
    for mode in ("L", "RGBA"):
        with pytest.raises(ValueError, match="RGB image"):
            aug(Image.new(mode, (4, 4)), rng)
    with pytest.raises(ValueError, match="needs a parameter"):
        apply_op(Image.new("RGB", (4, 4)), "Rotate")
    with pytest.raises(ValueError, match="unknown RandAugment op 'Posterize'"):
        op_parameter("Posterize", 7)
