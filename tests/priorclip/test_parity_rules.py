"""The parity verdict: per-precision floors, a ΔmR tolerance that never widens on small sets, and the belief
rank-flip rate that explains below-floor images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from priorclip.parity import TOLERANCES, compare_embeddings, min_images_for_dmr, rank_flips, verdict


def test_min_images_hand_computed():
    # one image->text query changing rank moves mR by 100 / (6 N); `flips` of them must fit in the tolerance
    assert min_images_for_dmr("fp32") == 334  # 1 * 100 / (6 * 0.05) = 333.3
    assert min_images_for_dmr("fp16") == 334  # 2 * 100 / (6 * 0.1)
    assert min_images_for_dmr("bf16") == 100  # 3 * 100 / (6 * 0.5) = 100 exactly
    assert min_images_for_dmr("int8") == 134  # 4 * 100 / 3 = 133.3
    assert TOLERANCES["fp32"].min_cosine == 0.99999
    for p, t in TOLERANCES.items():
        n = min_images_for_dmr(p)
        assert t.flips * 100 / (6 * n) <= t.max_abs_delta_mR < t.flips * 100 / (6 * (n - 1))


def _set(n_img: int, seed: int = 0, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    owner = np.repeat(np.arange(n_img), 2)
    txt = torch.nn.functional.normalize(img[owner] + 0.8 * torch.randn(2 * n_img, dim, generator=g), dim=1)
    return img, txt, owner


def _swap_queries(img, k: int = 8):
    """An engine identical to the reference except that k images' embeddings are rotated among themselves."""
    out = img.clone()
    out[:k] = img[torch.arange(1, k + 1) % k]
    return out


@pytest.mark.parametrize("n", [40, 400])
def test_dmr_never_widens(n):
    img, txt, owner = _set(n)
    c = compare_embeddings(img, txt, _swap_queries(img), txt, owner)
    d = abs(c["recall_delta"]["mR"])
    assert d > 0.05  # the swap moved mR beyond the fp32 tolerance on both sizes
    v = verdict(c, "fp32")
    assert any("image cosine min" in f for f in v["failures"])  # the per-item check catches it regardless
    if n < min_images_for_dmr("fp32"):
        assert v["tolerance"]["dmr_judged"] is False and v["tolerance"]["dmr_max"] is None
        assert any("too few items for a ΔmR verdict" in s for s in v["notes"])
        assert not any("ΔmR" in f for f in v["failures"])
    else:
        assert v["tolerance"]["dmr_max"] == 0.05
        assert any(f.startswith("|ΔmR|") for f in v["failures"])


def test_fp32_floor_is_five_nines():
    img, txt, owner = _set(50, seed=1)
    noisy = img.clone()
    noisy[3] = torch.nn.functional.normalize(img[3] + 0.006 * torch.nn.functional.normalize(
        torch.randn(img.shape[1], generator=torch.Generator().manual_seed(0)), dim=0), dim=0)
    cos = float(torch.nn.functional.cosine_similarity(noisy[3:4], img[3:4]))
    assert 0.9999 < cos < 0.99999
    c = compare_embeddings(img, txt, noisy, txt, owner)
    assert not verdict(c, "fp32")["passed"] and verdict(c, "fp16")["passed"]
    assert c["image"]["n_below"]["0.99999"] == 1


def test_rank_flips_counted_and_tied_to_outliers():
    img, txt, owner = _set(20, seed=2)
    t = 50
    ref_order = torch.stack([torch.randperm(t, generator=torch.Generator().manual_seed(i)) for i in range(20)])
    order = ref_order.clone()
    order[[2, 5, 7]] = order[[2, 5, 7]][:, [1, 0] + list(range(2, t))]  # swap the two top slots of three images
    order[9, 10], order[9, 11] = ref_order[9, 11], ref_order[9, 10]  # a deeper swap
    out = img.clone()
    out[[2, 5]] = torch.nn.functional.normalize(img[[2, 5]] + 0.3 * img[[3, 6]], dim=1)  # two flipped outliers
    out[12] = torch.nn.functional.normalize(img[12] + 0.3 * img[13], dim=0)  # an outlier without a flip
    c = compare_embeddings(img, txt, out, txt, owner, ref_order=ref_order, order=order)
    f = c["belief_order"]
    assert f == {"n": 20, "flipped": 4, "rate": 0.2, "top1_flipped": 3, "first_slot_min": 0}
    assert c["image"]["n_below"]["0.99"] == 3 and c["image"]["n_below_flipped"]["0.99"] == 2
    assert c["image"]["cosine_min_unflipped"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(out[12:13], img[12:13])), abs=1e-6)
    v = verdict(c, "int8")
    assert "2 of them with a flipped belief order" in v["failures"][0]
    assert any("belief order flipped on 4/20 images (20.0 %)" in s for s in v["notes"])
    assert rank_flips(None, order) is None and compare_embeddings(img, txt, img, txt, owner)["belief_order"] is None
    with pytest.raises(ValueError, match="belief orders"):
        rank_flips(ref_order, order[:, :10])


def test_non_finite_and_shape_errors():
    img, txt, owner = _set(10, seed=3)
    bad = img.clone()
    bad[1, 0] = math.nan
    v = verdict(compare_embeddings(img, txt, bad, txt, owner), "int8")
    assert "non-finite embeddings" in v["failures"]
    with pytest.raises(ValueError, match="differ in shape"):
        compare_embeddings(img, txt, img[:5], txt, owner)
