"""The recall check: identical engines pass, corrupted ones are marked outside tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from priorclip.benchmarks import recall
from priorclip.benchmarks.runner import BenchOptions, run_bench
from priorclip.serve.engines import Engine, create_engine


def _embeddings(n_img=16, per=3, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    owner = np.repeat(np.arange(n_img), per)
    txt = torch.nn.functional.normalize(img[owner] + 0.3 * torch.randn(len(owner), dim, generator=g), dim=1)
    return img, txt, owner


def test_identical_embeddings_pass():
    img, txt, owner = _embeddings()
    row = recall.compare("same", "fp32", (img, txt), (img.clone(), txt.clone()), owner)
    assert row["within_tolerance"] and not row["failures"]
    assert row["delta"]["mR"] == 0 and row["cosine_image_min"] == pytest.approx(1.0)
    assert row["top10_agreement_i2t"] == row["top10_agreement_t2i"] == 1.0


def test_small_fp16_like_noise_passes_fp16_but_not_fp32():
    img, txt, owner = _embeddings()
    g = torch.Generator().manual_seed(5)

    def noisy(x, eps=0.0374):  # orthogonal nudge: cosine exactly 1/sqrt(1+eps^2) = 0.99930, between the two floors
        u = torch.randn(x.shape, generator=g)
        u = torch.nn.functional.normalize(u - (u * x).sum(1, keepdim=True) * x, dim=1)
        return torch.nn.functional.normalize(x + eps * u, dim=1)

    got = (noisy(img), noisy(txt))
    assert recall.compare("n", "fp16", (img, txt), got, owner)["within_tolerance"]
    assert not recall.compare("n", "fp32", (img, txt), got, owner)["within_tolerance"]


@pytest.mark.parametrize("corruption", ["permute", "perturb", "nan"])
def test_corrupted_embeddings_fail(corruption):
    img, txt, owner = _embeddings()
    if corruption == "permute":  # rows swapped: each row is a valid unit vector, but the wrong one
        got = (img.roll(1, 0), txt)
    elif corruption == "perturb":
        got = (img, torch.nn.functional.normalize(txt + 0.2 * torch.randn_like(txt), dim=1))
    else:
        bad = img.clone()
        bad[3] = float("nan")
        got = (bad, txt)
    row = recall.compare("bad", "fp16", (img, txt), got, owner)
    assert not row["within_tolerance"] and row["failures"]
    assert any("cosine" in f or "non-finite" in f for f in row["failures"])


def test_dmr_is_not_judged_on_a_small_set_and_never_widened():
    """On 16 images a single query flip moves mR by 100/96 pp: ΔmR is reported but not judged (no widened allowance),
    and the verdict rests on the per-item checks."""
    img, txt, owner = _embeddings()
    got = (img.clone(), txt.clone())
    got[1][0] = txt[1]  # one caption wrong by a whole row: ΔmR moves far beyond 0.1, the cosine check catches it
    row = recall.compare("x", "fp16", (img, txt), got, owner)
    assert not row["dmr_judged"] and row["tolerance"]["dmr_max"] is None
    assert any(recall.DMR_NOT_JUDGED in n for n in row["notes"])
    assert not any("ΔmR" in f for f in row["failures"]) and any("text cosine" in f for f in row["failures"])
    assert recall.fmt_dmr(row).startswith("(")
    assert recall.DMR_NOT_JUDGED in recall.dmr_note(["fp16"], 16) and recall.dmr_note(["fp16"], 334) is None


def test_an_export_parity_report_is_reused_only_on_the_same_set():
    class _Set:  # describe() holds the sizes and the class coverage
        def describe(self):
            return {"n_images": 2, "n_captions": 4, "n_classes": 2, "coverage": "2 images over 2 classes"}

    data = recall.PreparedSet(torch.zeros(2, 3, 4, 4), torch.zeros(4, 5, dtype=torch.long), np.array([0, 0, 1, 1]),
                              {}, _Set())
    assert recall.same_set({"dataset": _Set().describe()}, data)
    assert not recall.same_set({"dataset": {**_Set().describe(), "n_captions": 3}}, data)
    assert not recall.same_set(None, data) and not recall.same_set({}, data)
    data.dataset = None  # no set to compare with: never reused
    assert not recall.same_set({"dataset": _Set().describe()}, data)


def test_rank_flips_are_reported_beside_the_cosines():
    img, txt, owner = _embeddings()
    order = torch.arange(50).repeat(len(img), 1)
    flipped = order.clone()
    flipped[[2, 5], :2] = flipped[[2, 5], :2].flip(1)  # two images with their two first ranks swapped
    row = recall.compare("x", "fp16", (img, txt, order), (img, txt, flipped), owner)
    assert row["rank_flips"]["flipped"] == 2 and row["rank_flips"]["n"] == 16
    assert row["rank_flips"]["rate"] == pytest.approx(2 / 16)
    assert recall.fmt_flips(row["rank_flips"]) == "2/16 (12.5 %)"
    assert "2/16 (12.5 %)" in recall.recall_table(row["metrics"], [row])


class _Corrupt:
    """Wraps an engine and rotates every image batch's embeddings by one row (a classic batching bug)."""

    def __init__(self, inner):
        self.inner, self.image_size, self.context_length = inner, inner.image_size, inner.context_length

    def encode_images(self, x):
        out = self.inner.encode_images(x)
        return out.roll(1, 0) if len(out) > 1 else -out

    def encode_texts(self, t):
        return self.inner.encode_texts(t)


def test_run_bench_marks_a_corrupted_engine(tmp_path):
    def factory(backend, model, precision, device, **kw):
        eng = create_engine(backend, model, precision, device, **kw)
        return (
            Engine(_Corrupt(eng), "torch", precision, device, fixed_text_length=False) if precision == "bf16" else eng
        )

    opts = BenchOptions(
        model_name="priorclip-tiny",
        device="cpu",
        engines=[("torch", "fp32"), ("torch", "bf16")],
        batch_sizes=[4],
        warmup=0,
        iters=1,
        recall_images=8,
        generated_set=True,
        e2e=False,
        quick_peak=True,
    )
    doc = run_bench(opts, argv=["priorclip-bench"], log=lambda s: None, engine_factory=factory)
    rows = {r["engine"]: r for r in doc["recall"]["engines"]}
    assert doc["recall"]["dataset"]["n_images"] == 8
    assert rows["torch/fp32"]["within_tolerance"]
    assert not rows["torch/bf16"]["within_tolerance"]
    assert rows["torch/bf16"]["cosine_image_min"] < 0.5
    assert all(e["status"] == "ok" for e in doc["engines"])
