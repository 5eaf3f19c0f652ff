"""Timing harness pieces: timing, percentiles, FLOP counts, token batches, the end-to-end rate."""

from __future__ import annotations

import pytest
import torch

from priorclip.benchmarks import harness
from priorclip.profile import profile_config
from priorclip.registry import create_model, get_config
from priorclip.serve.engines import create_engine


def test_time_calls_rotates_the_pool_after_warmup():
    seen = []
    pool = [torch.tensor(i) for i in range(3)]
    ms = harness.time_calls(lambda x: seen.append(int(x)), pool, warmup=2, iters=5, device=torch.device("cpu"))
    assert len(ms) == 5 and all(m >= 0 for m in ms)
    assert seen == [0, 1, 0, 1, 2, 0, 1]  # 2 warm-up calls, then 5 timed calls rotating over the pool


def test_percentiles_are_ordered():
    p = harness.percentiles([float(i) for i in range(1, 101)])
    assert p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] and p["mean_ms"] == pytest.approx(50.5)


def test_flops_per_item_agree_with_profile_and_shrink_with_text_length():
    cfg = get_config("priorclip-tiny")
    prof = profile_config(cfg)
    assert harness.gflop_per_item(cfg, "image") == pytest.approx(prof["gflop_image"])
    assert harness.gflop_per_item(cfg, "text", 77) == pytest.approx(prof["gflop_text"])
    assert harness.gflop_per_item(cfg, "text", 20) < harness.gflop_per_item(cfg, "text", 77)


def test_token_batch_puts_eot_at_the_requested_length():
    t = harness.make_token_batch(4, 20, 77, 49408, seed=0)
    assert t.shape == (4, 77)
    assert (t.argmax(dim=1) == 19).all() and (t[:, 20:] == 0).all() and (t[:, 0] == 49406).all()


def test_measured_cpu_peak_is_positive():
    peaks = harness.measure_peak_tflops("cpu", quick=True)
    assert {"fp32", "fp32_torch"} <= set(peaks) and peaks["fp32"] == max(peaks.values()) > 0


def test_bench_engine_and_e2e_rate_on_tiny():
    torch.manual_seed(0)
    model = create_model("priorclip-tiny")
    eng = create_engine("torch", model, "fp32", "cpu")
    rows = harness.bench_engine(eng, model.cfg, [1, 2], warmup=1, iters=3, text_length=12, peaks={"fp32": 1.0})
    assert [(r.tower, r.batch) for r in rows] == [("image", 1), ("image", 2), ("text", 1), ("text", 2)]
    text = rows[-1]
    assert text.tokens == 12  # eager trims to the caption length, and FLOPs are counted there
    assert text.gflop_per_item == pytest.approx(harness.gflop_per_item(model.cfg, "text", 12))
    for r in rows:
        assert r.items_per_s > 0 and r.tflops > 0 and 0 < r.frac_peak and r.peak_mem_mib > 0
    jpegs = harness.make_jpegs(6, size=80)
    assert len(set(jpegs)) == 6  # distinct images, not one repeated
    rate = harness.e2e_rate(eng, jpegs, batch=4, workers=2)
    assert rate["n_images"] == 6 and rate["images_per_s"] > 0
    assert harness.decode_rate(jpegs, 64, workers=2) > 0
