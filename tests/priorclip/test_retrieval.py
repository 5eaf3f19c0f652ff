"""Retrieval metrics against a brute-force loop written here, hand-computed chance levels, and degenerate encoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from priorclip.retrieval import METRIC_KEYS, chance_metrics, recall_metrics


def brute_force(img: np.ndarray, txt: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    scores = txt.astype(np.float64) @ img.astype(np.float64).T  # [N_txt, N_img]
    out = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(len(img)):
            order = sorted(range(len(txt)), key=lambda j: (-scores[j, i], j))[:k]
            hits += any(owner[j] == i for j in order)
        out[f"i2t_R@{k}"] = 100.0 * hits / len(img)
    for k in (1, 5, 10):
        hits = 0
        for j in range(len(txt)):
            order = sorted(range(len(img)), key=lambda i: (-scores[j, i], i))[:k]
            hits += owner[j] in order
        out[f"t2i_R@{k}"] = 100.0 * hits / len(txt)
    out["mR"] = sum(out[m] for m in METRIC_KEYS[:-1]) / 6
    return out


def test_matches_brute_force_with_uneven_captions():
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(23), rng.integers(1, 7, 23))
    img = rng.normal(size=(23, 16))
    txt = img[owner] * 0.5 + rng.normal(size=(len(owner), 16))  # correlated, so recall is neither 0 nor 100
    got = recall_metrics(torch.tensor(img, dtype=torch.float64).float(), torch.tensor(txt).float(), owner, chunk=7)
    want = brute_force(img.astype(np.float32), txt.astype(np.float32), owner)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    assert 0 < got["mR"] < 100


def test_perfect_and_constant_encoders():
    owner = np.repeat(np.arange(20), 5)
    img = np.eye(20, 32)
    assert recall_metrics(img, img[owner], owner)["mR"] == pytest.approx(100.0)
    const = recall_metrics(np.ones((20, 8)), np.ones((100, 8)), owner)  # every score ties
    assert const["t2i_R@1"] == pytest.approx(5.0)  # only captions of image 0 rank their image first
    assert const["mR"] < 60


def test_chance_hand_computed():
    ch = chance_metrics(np.array([0, 0, 1, 1]), 2)
    assert ch["t2i_R@1"] == pytest.approx(50.0)
    assert ch["i2t_R@1"] == pytest.approx(100 * (1 - math.comb(2, 1) / math.comb(4, 1)))  # 50
    assert ch["t2i_R@5"] == pytest.approx(100.0) and ch["i2t_R@5"] == pytest.approx(100.0)
    big = chance_metrics(np.repeat(np.arange(1027), 5), 1027)
    assert big["t2i_R@10"] == pytest.approx(100 * 10 / 1027)
    assert 0.5 < big["mR"] < 0.6


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        recall_metrics(np.ones((3, 4)), np.ones((3, 5)), np.arange(3))
    with pytest.raises(ValueError):
        recall_metrics(np.ones((3, 4)), np.ones((3, 4)), np.arange(2))
