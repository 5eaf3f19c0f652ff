"""The loss against a float64 re-derivation of spec §4A written with explicit loops, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from priorclip.training.loss import ClipAffLoss, affiliation_labels, class_centres, class_of


def ref_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, names: list[str], groups: list[int] | None = None):
    """float64, one term at a time. ``groups``: local-batch sizes (processes); classes and centres are per group."""
    n = img.shape[0]
    groups = groups or [n]
    starts = [sum(groups[:g]) for g in range(len(groups))]

    def ce_diag(rows, cols):  # mean over i of -log softmax_j(s <rows_i, cols_j>)[i]
        terms = []
        for i in range(n):
            lg = torch.stack([scale * torch.dot(rows[i], cols[j]) for j in range(n)])
            terms.append(torch.logsumexp(lg, 0) - lg[i])
        return torch.stack(terms).mean()

    lc = 0.5 * (ce_diag(img, txt) + ce_diag(txt, img))
    ic, tc = [], []
    for g, (s0, size) in enumerate(zip(starts, groups)):
        local = names[s0 : s0 + size]
        base = [nm.rsplit("/", 1)[-1] for nm in local]
        prefix = [b.split("_", 1)[0] if "_" in b else "!" + b for b in base]
        for i in range(size):
            members = [s0 + j for j in range(size) if prefix[j] == prefix[i]]
            ic.append(torch.stack([img[j] for j in members]).sum(0) / len(members))
            tc.append(torch.stack([txt[j] for j in members]).sum(0) / len(members))
    la = 0.5 * (ce_diag(img, torch.stack(tc)) + ce_diag(txt, torch.stack(ic)))
    return lc, la


NAME_SETS = {
    "mixed": ["airport_1.jpg", "beach_3.jpg", "airport_7.jpg", "00012.jpg", "beach_3.jpg", "park_1.jpg", "airport_2.jpg"],
    "all-singletons": ["a_1.jpg", "b_1.jpg", "c_1.jpg", "d_1.jpg"],
    "one-class": ["farm_1.jpg", "farm_2.jpg", "farm_3.jpg", "farm_4.jpg", "farm_5.jpg"],
    "no-underscore-repeats": ["00001.jpg", "00002.jpg", "00001.jpg", "sub/dir/port_9.png", "port_1.png"],
}


def _feats(n: int, e: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64) + 0.5 * img, dim=-1)
    return img.to(dtype), txt.to(dtype)


def test_labels_follow_first_appearance_and_prefix():
    names = ["b_2.jpg", "a_1.jpg", "b_9.jpg", "00001.jpg", "00002.jpg", "00001.jpg", "x/y/a_5.tif", "b"]
    assert affiliation_labels(names).tolist() == [0, 1, 0, 2, 3, 2, 1, 4]
    assert class_of("airport_12.jpg") == "airport"
    assert class_of("dir_with_underscore/beach_3.jpg") == "beach"  # the base name is what counts


@pytest.mark.parametrize("case", list(NAME_SETS))
@pytest.mark.parametrize("scale", [1 / 0.07, 100.0, 1.0])
def test_loss_matches_float64_derivation(case, scale):
    names = NAME_SETS[case]
    img32, txt32 = _feats(len(names), 16, seed=len(names))
    img32.requires_grad_(True)
    txt32.requires_grad_(True)
    s32 = torch.tensor(scale, requires_grad=True)
    out = ClipAffLoss(affiliation=True)(img32, txt32, s32, affiliation_labels(names))
    total = out["contrastive"] + out["affiliation"]
    total.backward()

    img64, txt64 = img32.detach().double().requires_grad_(True), txt32.detach().double().requires_grad_(True)
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    lc, la = ref_loss(img64, txt64, s64, names)
    (lc + la).backward()
    tol = dict(rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(out["contrastive"].double(), lc.detach(), **tol)
    torch.testing.assert_close(out["affiliation"].double(), la.detach(), **tol)
    torch.testing.assert_close(img32.grad.double(), img64.grad, **tol)
    torch.testing.assert_close(txt32.grad.double(), txt64.grad, **tol)
    torch.testing.assert_close(s32.grad.double(), s64.grad, **tol)


def test_singletons_make_affiliation_equal_contrastive():
    names = NAME_SETS["all-singletons"]
    img, txt = _feats(4, 8, 0)
    out = ClipAffLoss()(img, txt, torch.tensor(10.0), affiliation_labels(names))
    torch.testing.assert_close(out["affiliation"], out["contrastive"])


def test_one_class_sits_at_the_floor_log_n():
    """Same-class rows share one centre, so the affiliation loss is exactly mean log n_i there (spec §4A)."""
    names = NAME_SETS["one-class"]
    img, txt = _feats(5, 8, 1)
    out = ClipAffLoss()(img, txt, torch.tensor(50.0), affiliation_labels(names))
    torch.testing.assert_close(out["affiliation"], torch.tensor(math.log(5.0)), rtol=1e-5, atol=1e-5)


def test_centres_are_plain_means_not_renormalised():
    img, _ = _feats(3, 4, 2)
    c = class_centres(img, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(c[0], (img[0] + img[1]) / 2)
    torch.testing.assert_close(c[2], img[2])
    assert c[0].norm() < 1.0


def test_switch_off_and_missing_labels():
    img, txt = _feats(3, 4, 3)
    assert set(ClipAffLoss(affiliation=False)(img, txt, torch.tensor(1.0))) == {"contrastive"}
    with pytest.raises(ValueError, match="labels"):
        ClipAffLoss()(img, txt, torch.tensor(1.0))


def test_loss_is_float32_under_autocast():
    img, txt = _feats(4, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ClipAffLoss()(img.bfloat16(), txt.bfloat16(), torch.tensor(100.0), affiliation_labels(NAME_SETS["all-singletons"]))
    assert out["contrastive"].dtype == torch.float32
