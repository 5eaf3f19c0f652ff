"""Kernel benchmark: each fused kernel against eager PyTorch, ``torch.compile`` and its memory floor (spec §8B).

    python -m priorclip.benchmarks.kernels --out DIR [--device cuda] [--batches 1,8,64,256] [--dtypes fp16,fp32]

For the stem epilogue + belief gate (``priorclip.kernels.belief_gate``) it times, per dtype and batch size:

* ``eager``      the plain-torch reference (about 15 kernels; the spec measured 317 us at B=256 on an H100)
* ``compiled``   ``torch.compile`` of the same reference (CUDA only; mode ``--compile-mode``)
* ``fused bD/wW`` the Triton kernel with the projection in the launch, over a grid of D-chunk sizes and warp counts
* ``fused+proj`` the best fused config with the projection done by one cuBLAS GEMM before it (two launches)
* ``op``         the best config through ``torch.ops.priorclip.stem_gate`` (what the model and compiled graphs call)

and the FP8 activation quantisation (``priorclip.kernels.fp8_quant``) of the fused engine's widest GEMM inputs:
eager (three launches), compiled and the one-pass kernel, with a byte-for-byte check against the reference; and the
residual add + LayerNorm candidate (``priorclip.kernels.add_layernorm``) on both towers' residual streams.

Two times per variant: ``call`` (back-to-back calls from Python: what eager code pays, host launch cost included)
and ``graph`` (replays of a CUDA graph of 20 calls: the device time an engine with CUDA graphs pays). The floor is the
compulsory HBM traffic (patches and prior in, tokens and order out, parameters once) over the copy bandwidth
measured in the same run. Every variant's output is checked against a float64 run of the reference (max error of
the gated tokens, order equality) before it is timed; a variant that disagrees is reported, not hidden.

On CPU (``--device cpu``) the kernels run under ``TRITON_INTERPRET=1``: a dry run of the script, not a measurement.
Results: ``kernels.json`` and ``kernels.md`` in ``--out``, rewritten after every (dtype, batch) point.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import click
import torch

from priorclip.cliutils import check_output_dir, user_errors, write_text
from priorclip.kernels import belief_gate as bg
from priorclip.numerics import DTYPES

SCHEMA = "priorclip-kernel-bench/1"
CONFIGS = [(bd, w) for bd in (64, 128, 256) for w in (2, 4, 8)]  # (BLOCK_D, num_warps) grid of the fused kernel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, iters: int, reps: int = 5) -> float:
    """Median over ``reps`` windows of the mean time per call of ``iters`` back-to-back calls, in microseconds."""
    fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(out)


def time_graph(fn: Callable[[], Any], device: torch.device, iters: int, reps: int = 5,
               per_graph: int = 20) -> float | None:
    """Device time per call from replays of one CUDA graph holding ``per_graph`` calls (None off CUDA)."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    replays = max(1, iters // per_graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / (replays * per_graph))
    return statistics.median(out)


def copy_bandwidth_gbs(device: torch.device, mib: int = 512) -> float:
    """Device copy bandwidth (bytes read + written per second) / 1e9, measured now."""
    n = (mib if device.type == "cuda" else 16) * 2**20 // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    us = time_call(lambda: b.copy_(a), device, iters=20 if device.type == "cuda" else 3)
    return 2 * a.numel() * 4 / (us * 1e-6) / 1e9


def floor_bytes(kw: dict, out_dtype: torch.dtype) -> int:
    """Compulsory traffic of a perfectly fused stem gate: activations in and out once, parameters once."""
    b, n, d = kw["patches"].shape
    t = n + 1
    acts = kw["patches"].numel() * kw["patches"].element_size() + kw["prior"].numel() * kw["prior"].element_size()
    outs = b * (t + 1) * d * torch.empty((), dtype=out_dtype).element_size() + b * t * 8
    params = sum(v.numel() * v.element_size() for k, v in kw.items()
                 if isinstance(v, torch.Tensor) and k not in ("patches", "prior"))
    return acts + outs + params


def _errors(got: tuple, want: tuple) -> dict:
    err = (got[0][:, 1:].double() - want[0][:, 1:].double()).abs().max().item()
    order = None if want[1] is None else bool(torch.equal(got[1].cpu(), want[1].cpu()))
    return {"max_err": err, "order_equal": order}


def stem_gate_variants(kw: dict, out_dtype: torch.dtype, device: torch.device, compile_mode: str | None,
                       configs: list[tuple[int, int]]) -> dict[str, Callable[[], Any]]:
    from priorclip.kernels.belief_gate_triton import stem_gate_op, stem_gate_triton

    v: dict[str, Callable[[], Any]] = {"eager": lambda: bg.stem_gate_reference(**kw, out_dtype=out_dtype)}
    if device.type == "cuda" and compile_mode != "none":
        compiled = torch.compile(bg.stem_gate_reference, **({"mode": compile_mode} if compile_mode else {}))
        v["compiled"] = lambda: compiled(**kw, out_dtype=out_dtype)
    for bd, w in configs:
        v[f"fused b{bd}/w{w}"] = lambda bd=bd, w=w: stem_gate_triton(**kw, out_dtype=out_dtype, block_d=bd, num_warps=w)
    projected = dict(kw, proj_weight=None, proj_bias=None)

    def fused_proj(bd=128, w=4):
        y = torch.nn.functional.linear(kw["prior"], kw["proj_weight"], kw["proj_bias"])
        return stem_gate_triton(**dict(projected, prior=y), out_dtype=out_dtype, block_d=bd, num_warps=w)

    v["fused+proj"] = fused_proj
    args = [kw[k] for k in ("patches", "class_embedding", "positional_embedding", "ln_weight", "ln_bias", "ln_eps",
                            "prior", "proj_weight", "proj_bias")]
    v["op"] = lambda: stem_gate_op(*args, True, out_dtype)
    return v


def _err_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def measure_point(variants: dict[str, Callable[[], Any]], check: Callable[[Any], dict], base: dict,
                  device: torch.device, iters: int) -> list[dict]:
    """Check each variant's output (``check`` -> error fields), then time it per call and as CUDA-graph replays."""
    point = []
    for name, fn in variants.items():
        row = {**base, "variant": name}
        try:
            row |= check(fn())
            row["call_us"] = time_call(fn, device, iters)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result, the others go on
            row["error"] = _err_text(e)
        if "error" not in row:
            try:
                row["graph_us"] = time_graph(fn, device, iters)
            except Exception as e:  # noqa: BLE001 - a variant that cannot be captured keeps its call time
                row["graph_us"], row["graph_error"] = None, _err_text(e)
        point.append(row)
        print(_line(row), flush=True)
    _relate(point)
    return point


def bench_stem_gate(device: torch.device, dtypes: list[str], batches: list[int], shape: tuple[int, int, int],
                    iters: int, compile_mode: str | None, configs: list[tuple[int, int]], bw_gbs: float,
                    rows: list[dict], on_point: Callable[[list[dict]], None]) -> None:
    n, d, p = shape
    for dt_name in dtypes:
        dtype = DTYPES[dt_name]
        for b in batches:
            kw = bg.example_inputs(b, n, d, p, dtype=dtype, device=device, seed=b)
            want = bg.stem_gate_reference(**{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                             for k, v in kw.items()})
            base = {"kernel": "stem_gate", "dtype": dt_name, "batch": b,
                    "floor_us": floor_bytes(kw, dtype) / (bw_gbs * 1e9) * 1e6}
            variants = stem_gate_variants(kw, dtype, device, compile_mode, configs)
            rows += measure_point(variants, lambda out: _errors(out, want), base, device, iters)
            on_point(rows)


# The FP8 GEMM inputs of the fused engine per image: the ViT's MLP input (51 tokens x 768) and the widest 1x1
# convolution input of the prior (layer 1: 56 x 56 positions x 256 channels at 224 px).
FP8_TENSORS = {"vit mlp in": (51, 768), "prior layer1 1x1 in": (56 * 56, 256)}


def bench_quantize_fp8(device: torch.device, batches: list[int], iters: int, compile_mode: str | None,
                       bw_gbs: float, rows: list[dict], on_point: Callable[[list[dict]], None]) -> None:
    from priorclip.kernels.fp8_quant import quantize_fp8_reference
    from priorclip.kernels.fp8_quant_triton import quantize_fp8_triton

    compiled = (torch.compile(quantize_fp8_reference, **({"mode": compile_mode} if compile_mode else {}))
                if device.type == "cuda" and compile_mode != "none" else None)
    scale = torch.tensor([[0.05]], device=device)
    for label, (per_item, k) in FP8_TENSORS.items():
        for b in batches:
            g = torch.Generator().manual_seed(b)
            x = torch.randn(b * per_item, k, generator=g).to(device=device, dtype=torch.bfloat16)
            want = quantize_fp8_reference(x, scale)
            base = {"kernel": "quantize_fp8", "tensor": label, "dtype": "bf16", "batch": b,
                    "floor_us": x.numel() * 3 / (bw_gbs * 1e9) * 1e6}  # bf16 in, e4m3 out

            def check(q: torch.Tensor) -> dict:
                diff = (q.float() - want.float()).abs().max().item() if q.numel() else 0.0
                return {"max_err": diff, "order_equal": None,
                        "bytes_equal": bool(torch.equal(q.view(torch.uint8), want.view(torch.uint8)))}

            variants = {"eager": lambda: quantize_fp8_reference(x, scale)}
            if compiled is not None:
                variants["compiled"] = lambda: compiled(x, scale)
            variants["fused"] = lambda: quantize_fp8_triton(x, scale)
            rows += measure_point(variants, check, base, device, iters)
            on_point(rows)


# The residual streams of the two towers per item: ViT 51 tokens x 768, text 32 tokens x 512 (a real-caption batch)
STREAMS = {"vit stream": (51, 768), "text stream": (32, 512)}


def bench_add_layernorm(device: torch.device, batches: list[int], iters: int, compile_mode: str | None,
                        bw_gbs: float, rows: list[dict], on_point: Callable[[list[dict]], None]) -> None:
    from priorclip.kernels.add_layernorm import add_layernorm_reference
    from priorclip.kernels.add_layernorm_triton import add_layernorm_triton

    compiled = (torch.compile(add_layernorm_reference, **({"mode": compile_mode} if compile_mode else {}))
                if device.type == "cuda" and compile_mode != "none" else None)
    for label, (per_item, d) in STREAMS.items():
        for b in batches:
            g = torch.Generator().manual_seed(b)
            x, delta = (torch.randn(b * per_item, d, generator=g).to(device=device, dtype=torch.bfloat16)
                        for _ in range(2))
            w = (1 + 0.1 * torch.randn(d, generator=g)).to(device=device, dtype=torch.bfloat16)
            bias = (0.1 * torch.randn(d, generator=g)).to(device=device, dtype=torch.bfloat16)
            want = torch.nn.functional.layer_norm((x + delta).double(), (d,), w.double(), bias.double(), 1e-5)
            base = {"kernel": "add_layernorm", "tensor": label, "dtype": "bf16", "batch": b,
                    "floor_us": x.numel() * 2 * 4 / (bw_gbs * 1e9) * 1e6}  # x, delta in; s, h out (bf16)

            def check(out: tuple) -> dict:
                return {"max_err": (out[1].double() - want).abs().max().item() if x.numel() else 0.0,
                        "order_equal": None}

            variants = {"eager": lambda: add_layernorm_reference(x, delta, w, bias, 1e-5)}
            if compiled is not None:
                variants["compiled"] = lambda: compiled(x, delta, w, bias, 1e-5)
            variants["fused"] = lambda: add_layernorm_triton(x, delta, w, bias, 1e-5)
            rows += measure_point(variants, check, base, device, iters)
            on_point(rows)


def _best_time(r: dict) -> float | None:
    return r.get("graph_us") or r.get("call_us")


def _relate(point: list[dict]) -> None:
    """Speed-ups against eager and compiled, and the distance from the floor, on the same timing basis."""
    by = {r["variant"]: r for r in point}
    for r in point:
        t = _best_time(r)
        if t is None:
            continue
        r["x_floor"] = t / r["floor_us"]
        for base in ("eager", "compiled"):
            bt = _best_time(by.get(base, {}))
            if bt:
                r[f"speedup_vs_{base}"] = bt / t


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"
    return str(v)


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['dtype']} b{r['batch']} {r['variant']}: ERROR {r['error']}"
    return (f"{r['dtype']} b{r['batch']} {r['variant']}: call {_fmt(r['call_us'])} us, graph {_fmt(r['graph_us'])} us, "
            f"floor {_fmt(r['floor_us'])} us, max err {r['max_err']:.1e}, order equal {r['order_equal']}")


def summary_rows(rows: list[dict]) -> list[list[str]]:
    """Per (dtype, batch): the baselines, the best fused config and how far it is from the floor."""
    out = []
    rows = [r for r in rows if r["kernel"] == "stem_gate"]
    for key in dict.fromkeys((r["dtype"], r["batch"]) for r in rows):
        point = [r for r in rows if (r["dtype"], r["batch"]) == key and "error" not in r]
        by = {r["variant"]: r for r in point}
        fused = [r for r in point if r["variant"].startswith("fused b") and r["order_equal"] is not False]
        best = min(fused, key=_best_time, default=None)
        floor = point[0]["floor_us"] if point else None
        cells = [key[0], str(key[1]), _fmt(floor), _fmt(_best_time(by.get("eager", {}))),
                 _fmt(_best_time(by.get("compiled", {})))]
        if best is None:
            cells += ["-"] * 5
        else:
            cells += [f"{_fmt(_best_time(best))} ({best['variant'].removeprefix('fused ')})",
                      _fmt(best.get("x_floor"), 2), _fmt(best.get("speedup_vs_compiled"), 2),
                      _fmt(_best_time(by.get("fused+proj", {}))), _fmt(by.get("op", {}).get("call_us"))]
        out.append(cells)
    return out


def elementwise_rows(rows: list[dict], kernel: str) -> list[list[str]]:
    """Per (tensor, batch) of a one-pass kernel: floor, eager, compiled, fused and how close fused is to the floor."""
    out = []
    for r in rows:
        if r["kernel"] != kernel or r["variant"] != "fused":
            continue
        by = {x["variant"]: x for x in rows if x["kernel"] == r["kernel"] and x.get("tensor") == r["tensor"]
              and x["batch"] == r["batch"]}
        t = lambda v: _fmt(_best_time(by.get(v, {})))  # noqa: E731
        ok = "error" not in r
        out.append([r["tensor"], str(r["batch"]), _fmt(r["floor_us"]), t("eager"), t("compiled"), t("fused"),
                    _fmt(r.get("x_floor"), 2) if ok else "-", _fmt(r.get("speedup_vs_eager"), 2) if ok else "-",
                    (_fmt(r.get("bytes_equal")) if "bytes_equal" in r else f"{r['max_err']:.1e}") if ok
                    else f"ERROR: {r['error']}"])
    return out


def markdown(doc: dict) -> str:
    env = doc["environment"]
    out = [f"# Kernel benchmark: {env['device_name']} ({env['device']}), {env['date_utc']}", "",
           f"Revision {env['git_revision']}; torch {env['versions'].get('torch')}, "
           f"triton {env['versions'].get('triton')}, "
           f"CUDA {env.get('cuda')}. Copy bandwidth measured in this run: {doc['copy_bandwidth_gbs']:.0f} GB/s.", ""]
    if doc.get("dry_run"):
        out += ["**Dry run** (Triton interpreter on CPU): the times below measure nothing about a GPU, and the "
                "interpreter's e4m3 cast is not the hardware's (it truncates across binades), so the FP8 rows' "
                "errors are the interpreter's.", ""]
    out += ["Stem epilogue + belief gate, microseconds per call (CUDA-graph device time where measured):", "",
            "| dtype | B | floor | eager | compiled | best fused (BLOCK_D/warps) | x floor | vs compiled | "
            "fused+proj | op call |", "| --- | --- | " + "---: | " * 8]
    out += ["| " + " | ".join(c) + " |" for c in summary_rows(doc["rows"])]
    for kernel, title, check in (("quantize_fp8", "FP8 activation quantisation (bf16 in, e4m3 out)", "bytes equal"),
                                 ("add_layernorm", "Residual add + LayerNorm (bf16)", "max err")):
        table = elementwise_rows(doc["rows"], kernel)
        if table:
            out += ["", f"{title}, microseconds per call:", "",
                    f"| tensor | B | floor | eager | compiled | fused | x floor | vs eager | {check} |",
                    "| --- | --- | " + "---: | " * 7]
            out += ["| " + " | ".join(c) + " |" for c in table]
    out += ["", f"Command: `{env['command']}`", "", "## All variants", ""]
    head = ["kernel", "dtype", "B", "variant", "graph us", "call us", "x floor", "vs eager", "vs compiled", "max err",
            "order"]
    out += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 4 + ["---:"] * 7) + " |"]
    for r in doc["rows"]:
        kernel = r["kernel"] + (f" ({r['tensor']})" if r.get("tensor") else "")
        if "error" in r:
            out.append(f"| {kernel} | {r['dtype']} | {r['batch']} | {r['variant']} | ERROR: {r['error']} |" + " |" * 6)
            continue
        out.append("| " + " | ".join([kernel, r["dtype"], str(r["batch"]), r["variant"], _fmt(r.get("graph_us")),
                                      _fmt(r.get("call_us")), _fmt(r.get("x_floor"), 2),
                                      _fmt(r.get("speedup_vs_eager"), 2), _fmt(r.get("speedup_vs_compiled"), 2),
                                      f"{r['max_err']:.1e}", _fmt(r["order_equal"])]) + " |")
    out += ["", "`graph`: device time per call from CUDA-graph replays; `call`: back-to-back Python calls (host "
            "launch cost included). `x floor`: graph time (call time off CUDA) over the compulsory HBM traffic at the "
            "measured copy bandwidth. Errors: gated tokens against a float64 run of the reference."]
    graph_errors = [f"{r['dtype']} b{r['batch']} {r['variant']}: {r['graph_error']}" for r in doc["rows"]
                    if r.get("graph_error")]
    if graph_errors:
        out += ["", "Not captured in a CUDA graph (call time only): " + "; ".join(graph_errors)]
    return "\n".join(out) + "\n"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for kernels.json/.md.")
@click.option("--device", default="cuda", show_default=True, help="cuda, or cpu for a dry run under the interpreter.")
@click.option("--batches", default="1,8,64,256", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--dtypes", default="fp16,bf16,fp32", show_default=True, help="Input dtypes: fp32, fp16, bf16.")
@click.option("--shape", default="49,768,512", show_default=True, help="N patches, D width, P prior features.")
@click.option("--iters", default=200, show_default=True, help="Calls per timing window (5 windows, median).")
@click.option("--compile-mode", default="default", show_default=True,
              help="torch.compile mode for the compiled baseline ('default', 'max-autotune-no-cudagraphs', ...; "
                   "'none' skips it).")
@click.option("--configs", default="all", show_default=True,
              help="Fused-kernel (BLOCK_D, warps) configs: 'all' (the 3x3 grid) or e.g. '128:4,256:8'.")
@click.option("--no-fp8", is_flag=True, help="Skip the FP8 activation-quantisation kernel.")
@user_errors
def main(out_dir: str, device: str, batches: str, dtypes: str, shape: str, iters: int, compile_mode: str,
         configs: str, no_fp8: bool) -> None:
    """Time the fused kernels against eager PyTorch, torch.compile and the memory floor."""
    dev = torch.device(device)
    if not bg._triton_importable():
        raise click.ClickException("triton is not installed: pip install triton (this benchmark times Triton kernels)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(
            "no CUDA device: run on a GPU, or pass --device cpu for a dry run under the Triton interpreter")
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
        if os.environ["TRITON_INTERPRET"] != "1":
            raise click.ClickException("--device cpu needs TRITON_INTERPRET=1 (the Triton interpreter)")
    try:
        dts = [d.strip() for d in dtypes.split(",") if d.strip()]
        bad = [d for d in dts if d not in DTYPES]
        if bad or not dts:
            raise ValueError(f"unknown dtype(s) {bad}; use {', '.join(DTYPES)}")
        bs, sh = _ints(batches), tuple(_ints(shape))
        if not bs or min(bs) < 1 or len(sh) != 3 or min(sh) < 1:
            raise ValueError("--batches needs positive sizes and --shape three positive integers N,D,P")
        cfgs = CONFIGS if configs == "all" else [tuple(_ints(c.replace(":", ","))) for c in configs.split(",")]
        if any(len(c) != 2 for c in cfgs):
            raise ValueError(f"--configs must be 'all' or BLOCK_D:WARPS pairs, got {configs!r}")
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    from priorclip.benchmarks.report import environment

    out = check_output_dir(out_dir, option="--out")  # created by the first write, just below
    bw = copy_bandwidth_gbs(dev)
    doc = {"schema": SCHEMA, "environment": environment(dev), "copy_bandwidth_gbs": bw, "dry_run": dev.type != "cuda",
           "shape": {"patches": sh[0], "width": sh[1], "prior_features": sh[2]}, "rows": []}

    def write(rows: list[dict]) -> None:
        doc["rows"] = rows
        write_text(out / "kernels.json", json.dumps(doc, indent=1) + "\n")  # atomic: a timeout keeps the last rows
        write_text(out / "kernels.md", markdown(doc))

    write([])
    rows: list[dict] = []
    mode = None if compile_mode == "default" else compile_mode
    bench_stem_gate(dev, dts, bs, sh, iters, mode, cfgs, bw, rows, write)
    if not no_fp8:
        bench_quantize_fp8(dev, bs, iters, mode, bw, rows, write)
    bench_add_layernorm(dev, bs, iters, mode, bw, rows, write)
    print(f"wrote {out / 'kernels.md'}")


if __name__ == "__main__":
    main()
