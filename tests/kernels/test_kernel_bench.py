"""The kernel benchmark's dry run on CPU (Triton interpreter): every variant is checked and reported, bad options
are one-line errors. Its timings mean nothing here; the GPU queue's speed entry runs it for real."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from priorclip.benchmarks.kernels import SCHEMA, main

TINY = ["--device", "cpu", "--batches", "1", "--dtypes", "fp16,fp32", "--shape", "9,40,24", "--iters", "1",
        "--configs", "64:2,128:4", "--kernels", "stem_gate,quantize_fp8,add_layernorm"]
# PIR's PAE at E=32, 2 heads of 16, VIR 10 -> 8 tokens, LCA L=7: every point and variant, interpreted
PAE_TINY = ["--device", "cpu", "--kernels", "pae", "--batches", "1", "--dtypes", "fp32", "--iters", "1",
            "--pae-shape", "32,2,10,7"]


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
                      (["--configs", "64"], "--configs"), (["--batches", "0"], "--batches"),
                      (["--kernels", "pae,flash"], "--kernels: unknown kernel(s) ['flash']"),
                      (["--kernels", ","], "--kernels"), (["--pae-shape", "32,2,10"], "--pae-shape"),
                      (["--pae-shape", "48,2,10,7"], "power-of-two head width"),
                      (["--pae-configs", "some"], "--pae-configs")):
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


def test_pae_dry_run_checks_every_block_and_states_the_targets(tmp_path, monkeypatch):
    from priorclip.benchmarks import kernels as bench
    from priorclip.kernels.pae_linear_triton import CONFIGS, LN_CONFIGS

    assert bench.n_sweep_configs() == max(len(CONFIGS), len(LN_CONFIGS))
    monkeypatch.setattr(bench, "n_sweep_configs", lambda: 2)  # the first two tiles: the interpreter is slow
    res = CliRunner().invoke(main, ["--out", str(tmp_path), *PAE_TINY, "--pae-configs", "all"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["kernels"] == ["pae"] and doc["pae_shape"]["keep"] == 8 and doc["launch_us"] > 0
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == {"pae"}
    sweep = {"fused cfg0", "fused cfg1"}
    labels = ("vir filter", "mhsa N=8", "crosa vir N=8", "mhsa L=7", "crosa lca L=7", "vir chain", "lca chain")
    want = {(t, v) for t in labels for v in ("eager", "fused")} | {(t, v) for t in ("mhsa N=8", "mhsa L=7")
                                                                   for v in sweep}
    assert {(r["tensor"], r["variant"]) for r in rows} == want  # no compiled variant off CUDA
    for r in rows:
        assert "error" not in r, r
        assert r["dtype"] == "fp32" and r["batch"] == 1
        assert r["max_err"] < 1e-5, r  # float32 against float64 (the filter's kept rows are exact copies)
        assert r["order_equal"] is (True if r["tensor"] in ("vir filter", "vir chain") else None), r
        assert r["floor_us"] > 0 and r["flop"] > 0 and r["bytes"] > 0 and r["call_us"] > 0 and r["graph_us"] is None
        assert r["variant"] not in sweep or r["config"].startswith("gemm ")
    for t in labels:  # fewer launches fused than ops eager
        by = {r["variant"]: r for r in rows if r["tensor"] == t}
        assert 0 < by["fused"]["launches"] < by["eager"]["launches"], t
    md = (tmp_path / "kernels.md").read_text()
    assert "PIR PAE blocks" in md and "Stem epilogue" not in md
    targets = md.split("Targets (issue 16) - dry run: not a measurement:")[1].split("Command:")[0]
    lines = [ln for ln in targets.splitlines() if ln.startswith("- ")]
    assert len(lines) == 6 + 1  # four blocks and two chains at batch 256, VIR's chain at batch 1
    assert all(ln.endswith("(dry run: not a measurement)") for ln in lines)
    assert sum("not run (batch 256 not in --batches)" in ln for ln in lines) == 6
    assert "vir chain, fp32, B=1" in targets and " launches x " in targets


def _row(block, dtype, batch, variant, us, **kw):
    return {"kernel": "pae", "block": block, "tensor": block, "dtype": dtype, "batch": batch, "variant": variant,
            "graph_us": us, "call_us": us * 3, "max_err": 0.0, "order_equal": None, **kw}


def test_pae_targets_are_met_or_missed_by_how_much():
    from priorclip.benchmarks.kernels import pae_targets

    rows = [_row("vir_sa", "bf16", 256, "compiled", 300.0), _row("vir_sa", "bf16", 256, "fused", 100.0),
            _row("lca_sa", "bf16", 256, "compiled", 150.0), _row("lca_sa", "bf16", 256, "fused", 100.0),
            _row("vir", "bf16", 1, "eager", 900.0, launches=150),
            _row("vir", "bf16", 1, "fused", 20.0, launches=23, floor_us=6.0, bytes=17e6),
            _row("vir", "bf16", 256, "fused", 500.0)]
    lines = pae_targets(rows, launch=0.5, dry_run=False)
    text = "\n".join(lines)
    assert "- vir_sa, bf16, B=256: fused >= 2x compiled: met, 3.00x (100.0 us fused vs 300.0 us compiled)" in text
    assert "- lca_sa, bf16, B=256: fused >= 2x compiled: missed by 0.50x, 1.50x" in text and "needs <= 75.0 us" in text
    assert "- vir, bf16, B=256: fused >= 2x compiled: no compiled baseline" in text
    # 6 us floor + 23 launches x 0.5 us = 17.5 us: 20 us misses it by 2.5 us
    assert "missed by 2.5 us (1.14x the bound): 20.0 us vs floor 6.0 us (17.0 MB) + 23 launches" in text
    assert "eager 900.0 us over 150 ATen ops" in text and "dry run" not in text
    fast = [dict(r, graph_us=10.0) if (r["block"], r["batch"], r["variant"]) == ("vir", 1, "fused") else r
            for r in rows]
    assert "B=1: fused within its weight-streaming floor + its launches: met: 10.0 us" in "\n".join(
        pae_targets(fast, launch=0.5, dry_run=True))


def test_pae_flop_and_bytes_follow_the_spec():
    from torch import nn

    from priorclip.benchmarks.kernels import PAEShape, block_params, pae_budget
    from priorclip.layers.pae import MHSA, CroSA

    e, f = 512, 1024
    one = pae_budget(PAEShape(512, 8, 50, 47), 1, 2)
    flop = {k: v[0] for k, v in one.items()}
    # spec §8B.5-6, per sample: MHSA 171 M, naive CroSA 192 M, VIR 0.726 G, LCA 1.284 G at L=47 (26.74 M L + 12288 L²)
    for key, spec in (("vir_sa", 171e6), ("vir_ca", 192e6), ("vir", 0.726e9), ("lca", 1.284e9)):
        assert abs(flop[key] / spec - 1) < 0.005, (key, flop[key])
    assert flop["filter"] == 2 * 50 * 512 and flop["lca"] == 102 * e * e * 47 + 24 * 47 * 47 * e
    assert pae_budget(PAEShape(512, 8, 50, 20), 256, 2)["lca"][0] == 256 * pae_budget(
        PAEShape(512, 8, 50, 20), 1, 2)["lca"][0]
    # a fused block reads a module's parameters; a CroSA's mapping is folded into its query projection
    n_params = sum(p.numel() for p in MHSA(e, 8, 0.0).parameters())
    assert block_params(e, f) == n_params == sum(p.numel() for p in CroSA(e, 8, 0.0).parameters())
    assert n_params + sum(p.numel() for p in nn.Linear(e, e).parameters()) == 2_367_488  # CroSA + its mapping
    # VIR at batch 1: 4 blocks (16.8 MB in half precision: the floor the target compares against) + the activations
    assert one["vir"][1] == 4 * n_params * 2 + 50 * 512 * 2 + 2 * 512 * 2 + 50 * 8
    assert one["filter"][1] == 50 * 512 * 2 + 512 * 2 + 40 * 512 * 2 + 50 * 8  # spec: 51 KB read, 41 KB written
