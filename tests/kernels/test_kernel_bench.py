"""The kernel benchmark's dry run on CPU (Triton interpreter): every variant is checked and reported, bad options
are one-line errors. Its timings mean nothing here; the GPU queue's speed entry runs it for real."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from priorclip.benchmarks.kernels import SCHEMA, main

TINY = ["--device", "cpu", "--batches", "1", "--dtypes", "fp16,fp32", "--shape", "9,40,24", "--iters", "1",
        "--configs", "64:2,128:4"]


def test_dry_run_checks_and_reports_every_variant(tmp_path):
    res = CliRunner().invoke(main, ["--out", str(tmp_path), *TINY], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["schema"] == SCHEMA and doc["dry_run"] is True and doc["copy_bandwidth_gbs"] > 0
    quant = [r for r in doc["rows"] if r["kernel"] == "quantize_fp8"]
    assert {(r["tensor"], r["batch"], r["variant"]) for r in quant} == {
        (t, b, v) for t in ("vit mlp in", "prior layer1 1x1 in") for b in (1,) for v in ("eager", "fused")}
    assert all("error" not in r and r["floor_us"] > 0 for r in quant)
    assert all(r["bytes_equal"] for r in quant if r["variant"] == "eager")  # the reference against itself
    norms = [r for r in doc["rows"] if r["kernel"] == "add_layernorm"]
    assert {(r["tensor"], r["batch"], r["variant"]) for r in norms} == {
        (t, b, v) for t in ("vit stream", "text stream") for b in (1,) for v in ("eager", "fused")}
    assert all("error" not in r and r["max_err"] < 0.05 for r in norms)  # bf16 output against float64
    rows = [r for r in doc["rows"] if r["kernel"] == "stem_gate"]
    variants = {"eager", "fused b64/w2", "fused b128/w4", "fused+proj", "op"}
    assert {(r["dtype"], r["batch"]) for r in rows} == {(d, 1) for d in ("fp16", "fp32")}
    for dt, b in {(r["dtype"], r["batch"]) for r in rows}:
        assert {r["variant"] for r in rows if (r["dtype"], r["batch"]) == (dt, b)} == variants
    for r in rows:
        assert "error" not in r, r
        assert r["order_equal"] is True
        assert r["max_err"] < (1e-5 if r["dtype"] == "fp32" else 2e-3), r
        assert r["call_us"] > 0 and r["graph_us"] is None and r["floor_us"] > 0 and r["x_floor"] > 0
        assert r["speedup_vs_eager"] > 0
    md = (tmp_path / "kernels.md").read_text()
    assert "Dry run" in md and "fused+proj" in md and "prior layer1 1x1 in" in md and "Residual add" in md


def test_floor_bytes_counts_the_compulsory_traffic():
    from priorclip.benchmarks.kernels import floor_bytes
    from priorclip.kernels.belief_gate import example_inputs

    kw = example_inputs(256, 49, 768, 512, dtype=torch.float16)
    got = floor_bytes(kw, torch.float16)
    acts = 256 * (49 * 768 + 512) * 2 + 256 * (51 * 768 * 2 + 50 * 8)  # in: patches, prior; out: tokens, order
    params = (768 + 50 * 768 + 2 * 768 + 768 * 512 + 768) * 2
    assert got == acts + params
    assert 38e6 < got < 42e6  # spec §8B.1: 40.1 MB at B=256 with fp16 output


def test_bad_options_are_one_line_errors(tmp_path):
    for args, msg in ((["--dtypes", "fp8"], "unknown dtype"), (["--shape", "9,40"], "--shape"),
                      (["--configs", "64"], "--configs"), (["--batches", "0"], "--batches")):
        res = CliRunner().invoke(main, ["--out", str(tmp_path), *TINY, *args])
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output, (args, res.output)
    if not torch.cuda.is_available():
        res = CliRunner().invoke(main, ["--out", str(tmp_path), "--device", "cuda"])
        assert res.exit_code != 0 and "no CUDA device" in res.output


def test_missing_triton_is_one_line(tmp_path, monkeypatch):
    from priorclip.kernels import belief_gate as bg

    monkeypatch.setattr(bg, "_TRITON", False)
    res = CliRunner().invoke(main, ["--out", str(tmp_path), *TINY])
    assert res.exit_code != 0 and "triton is not installed" in res.output and "Traceback" not in res.output
