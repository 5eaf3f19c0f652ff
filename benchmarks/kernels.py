"""Kernel benchmark: each fused kernel against eager PyTorch, ``torch.compile`` and its memory floor (spec §8B).

    python -m priorclip.benchmarks.kernels --out DIR [--device cuda] [--batches 1,8,64,256] [--dtypes fp16,fp32]
        [--kernels stem_gate,quantize_fp8,add_layernorm,pae] [--pae-configs all]

For the stem epilogue + belief gate (``priorclip.kernels.belief_gate``) it times, per dtype and batch size:

* ``eager``      the plain-torch reference (about 15 kernels; the spec measured 317 us at B=256 on an H100)
* ``compiled``   ``torch.compile`` of the same reference (CUDA only; mode ``--compile-mode``)
* ``fused bD/wW`` the Triton kernel with the projection in the launch, over a grid of D-chunk sizes and warp counts
* ``fused+proj`` the best fused config with the projection done by one cuBLAS GEMM before it (two launches)
* ``op``         the best config through ``torch.ops.priorclip.stem_gate`` (what the model and compiled graphs call)

and the FP8 activation quantisation (``priorclip.kernels.fp8_quant``) of the fused engine's widest GEMM inputs:
eager (three launches), compiled and the one-pass kernel, with a byte-for-byte check against the reference; and the
residual add + LayerNorm candidate (``priorclip.kernels.add_layernorm``) on both towers' residual streams.

For PIR's Progressive Attention Encoder (``priorclip.kernels.pae``, spec §8B.5-6; ``--kernels pae`` runs only these)
it times VIR's belief filter, each MHSA / CroSA block of VIR (N=40) and LCA (L=47), and the whole VIR and LCA chains:
``eager`` (the model's modules and loops), ``compiled`` (``torch.compile`` of the same function) and ``fused`` (the
kernels), each row with the naive reference's FLOPs and the block's memory floor, and the markdown states issue 16's
targets (each block >= 2x compiled at batch 256; VIR at batch 1 near its weight-streaming floor) as met or missed.

Two times per variant: ``call`` (back-to-back calls from Python: what eager code pays, host launch cost included)
and ``graph`` (replays of a CUDA graph of 20 calls: the device time an engine with CUDA graphs pays). The floor is the
compulsory HBM traffic (patches and prior in, tokens and order out, parameters once) over the copy bandwidth
measured in the same run. Every variant's output is checked against a float64 run of the reference (max error of
the gated tokens, order equality) before it is timed; a variant that disagrees is reported, not hidden.

On CPU (``--device cpu``) the kernels run under ``TRITON_INTERPRET=1``: a dry run of the script, not a measurement.
Results: ``kernels.json`` and ``kernels.md`` in ``--out``, rewritten after every (dtype, batch) point.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import click
import torch
from torch import nn

from priorclip.cliutils import check_output_dir, user_errors, write_text
from priorclip.kernels import belief_gate as bg
from priorclip.kernels.vir_filter import vir_filter_reference  # plain torch: triton is imported only on CUDA
from priorclip.numerics import DTYPES

SCHEMA = "priorclip-kernel-bench/1"
KERNELS = ("stem_gate", "quantize_fp8", "add_layernorm", "pae")  # --kernels choices, in run order
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
                  device: torch.device, iters: int, reps: int = 5) -> list[dict]:
    """Check each variant's output (``check`` -> error fields), then time it per call and as CUDA-graph replays
    (median of ``reps`` windows)."""
    point = []
    for name, fn in variants.items():
        row = {**base, "variant": name}
        try:
            row |= check(fn())
            row["call_us"] = time_call(fn, device, iters, reps)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result, the others go on
            row["error"] = _err_text(e)
        if "error" not in row:
            try:
                row["graph_us"] = time_graph(fn, device, iters, reps)
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


# ---------------------------------------------------------------------------------- PIR's PAE blocks (spec §8B.5-6)

PAE_SHAPE = (512, 8, 50, 47)  # E, heads, Swin tokens into VIR's filter, LCA caption length (a chunk's longest)
KEEP_FRACTION = 0.8  # VIR keeps 40 of its 50 tokens (PIRConfig.filter_size)
INSTRU_NUM, CYCLE_NUM = 2, 3  # VIR's (MHSA, CroSA) rounds, LCA's cycles
TARGET_SPEEDUP, TARGET_BATCH = 2.0, 256  # issue 16: each PAE block >= 2x torch.compile at batch 256
BLOCKS = ("vir_sa", "vir_ca", "lca_sa", "lca_ca", "vir", "lca")  # the points the speed-up target applies to
SWEPT = ("vir_sa", "lca_sa")  # --pae-configs all: pae_linear tile sweeps on the MHSA blocks only


@dataclass(frozen=True)
class PAEShape:
    """The PAE sizes a run uses: width, heads, tokens into VIR's filter and LCA's caption length; FFN is 2E."""

    e: int
    heads: int
    tokens: int
    length: int

    @property
    def keep(self) -> int:
        return max(1, round(self.tokens * KEEP_FRACTION))

    @property
    def ffn(self) -> int:
        return 2 * self.e

    def labels(self) -> dict[str, str]:
        """Point key -> the ``tensor`` column's label."""
        return {"filter": "vir filter", "vir_sa": f"mhsa N={self.keep}", "vir_ca": f"crosa vir N={self.keep}",
                "lca_sa": f"mhsa L={self.length}", "lca_ca": f"crosa lca L={self.length}", "vir": "vir chain",
                "lca": "lca chain"}


def parse_pae_shape(text: str) -> PAEShape:
    v = _ints(text)
    if len(v) != 4 or min(v) < 1:
        raise ValueError(f"--pae-shape needs four positive integers E,HEADS,TOKENS,LENGTH, got {text!r}")
    s = PAEShape(*v)
    dh = s.e // s.heads
    if s.e % s.heads or dh < 16 or dh & (dh - 1) or s.tokens > 256 or s.length > 256:
        raise ValueError(f"--pae-shape {text!r}: the kernels need HEADS dividing E into a power-of-two head width "
                         ">= 16 and at most 256 tokens / caption positions")
    return s


# FLOPs of the NAIVE reference (what the eager modules compute), multiply-add = 2: every linear's GEMM (the mappings
# included: the reference maps all N identical VIR query rows) and the attention's Q Kᵀ and P V (4 N² E per sample).
# Not counted: biases, softmax, LayerNorms, GELU, residual adds, the filter's softmax and ranking (lower order).
# At PIR's sizes per sample: MHSA N=40 171 MFLOP, CroSA N=40 192 MFLOP, VIR 0.726 GFLOP, LCA L=47 1.284 GFLOP (§8B).


def _gemm(rows: int, k: int, n: int) -> int:
    return 2 * rows * k * n


def mhsa_flop(b: int, n: int, e: int, f: int) -> int:
    """q, k, v, merge, FFN (E -> F -> E) on B*N rows, plus the attention core."""
    return _gemm(b * n, e, 3 * e) + _gemm(b * n, e, e) + _gemm(b * n, e, f) + _gemm(b * n, f, e) + 4 * b * n * n * e


def crosa_flop(b: int, n: int, e: int, f: int) -> int:
    """The mapping on the N query rows, then the same GEMMs and attention as MHSA (Lq = Lk = N)."""
    return _gemm(b * n, e, e) + mhsa_flop(b, n, e, f)


def block_params(e: int, f: int) -> int:
    """Parameters one fused MHSA or CroSA block reads: qkv (CroSA: q with the mapping folded in, and kv), merge, FFN
    and its LayerNorm(F), LN1, LN2. The folded mapping is read once as part of q, not twice."""
    return (3 * e * e + 3 * e) + (e * e + e) + (e * f + f) + 2 * f + (f * e + e) + 4 * e


def pae_budget(s: PAEShape, b: int, esize: int) -> dict[str, tuple[int, int]]:
    """Point key -> (naive FLOPs, compulsory bytes: the block's weights once in the dtype, activations in and out).

    VIR's chain reads 2 x 2 blocks (8.4 M parameters, 16.8 MB in half precision: the spec's 9.21 M also counts the
    mappings unfolded and head_img, which the chain does not run); its output is F[:, 0] and the int64 order."""
    e, f, t, k, lc = s.e, s.ffn, s.tokens, s.keep, s.length
    w = block_params(e, f) * esize
    rows = lambda n: b * n * e * esize  # noqa: E731 - a [B, n, E] activation in the dtype
    filt = (2 * b * t * e, rows(t) + b * e * esize + rows(k) + b * t * 8)
    vir_flop = filt[0] + INSTRU_NUM * (mhsa_flop(b, k, e, f) + crosa_flop(b, k, e, f))
    lca_flop = CYCLE_NUM * (mhsa_flop(b, lc, e, f) + crosa_flop(b, lc, e, f))
    return {"filter": filt,
            "vir_sa": (mhsa_flop(b, k, e, f), w + 2 * rows(k)),
            "vir_ca": (crosa_flop(b, k, e, f), w + b * e * esize + 2 * rows(k)),  # in: instr, S; out: [B, N, E]
            "lca_sa": (mhsa_flop(b, lc, e, f), w + 2 * rows(lc)),
            "lca_ca": (crosa_flop(b, lc, e, f), w + 3 * rows(lc)),  # in: T, S; out: [B, L, E]
            "vir": (vir_flop, 2 * INSTRU_NUM * w + rows(t) + 2 * b * e * esize + b * t * 8),
            "lca": (lca_flop, 2 * CYCLE_NUM * w + rows(lc) + b * e * esize)}


def pae_modules(s: PAEShape, seed: int = 0) -> nn.ModuleDict:
    """VIR's and LCA's modules as in ``priorclip.pir.PIR``, randomly initialised in eval: weights ~ 1/sqrt(fan-in),
    biases and LayerNorm affines non-trivial (the defaults 1/0 would hide a swapped or dropped norm)."""
    from priorclip.layers.pae import MHSA, CroSA

    e, h = s.e, s.heads
    m = nn.ModuleDict({
        "img_sa": nn.ModuleList(MHSA(e, h, 0.2) for _ in range(INSTRU_NUM)),
        "img_ca": nn.ModuleList(CroSA(e, h, 0.2) for _ in range(INSTRU_NUM)),
        "mapping_img": nn.ModuleList(nn.Linear(e, e) for _ in range(INSTRU_NUM)),
        "txt_sa": nn.ModuleList(MHSA(e, h, 0.2) for _ in range(CYCLE_NUM)),
        "txt_ca": nn.ModuleList(CroSA(e, h, 0.2) for _ in range(CYCLE_NUM)),
        "mapping_txt": nn.ModuleList(nn.Linear(e, e) for _ in range(CYCLE_NUM))})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return m.eval().requires_grad_(False)


def pae_inputs(s: PAEShape, b: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, Any]:
    """Unit-variance activations. VIR's tokens get belief logits <V_t, c> = a permutation of evenly spaced values 1
    apart (the component along c is set, the rest is noise orthogonal to c): rounding the inputs to bf16 moves a
    logit by less than 0.3 at E=512 (the closest pair at B=256 stays 0.71 apart), so every dtype's order must equal
    the float64 order, and a wrong order is a bug, not a tie. No logit gap reaches softmax underflow (~104)."""
    g = torch.Generator().manual_seed(seed)
    e, t = s.e, s.tokens
    instr = torch.randn(b, e, generator=g, dtype=torch.float64)
    norm = instr.norm(dim=-1, keepdim=True)
    u = instr / norm
    z = torch.randn(b, t, e, generator=g, dtype=torch.float64)
    z = z - (z @ u.unsqueeze(-1)) * u.unsqueeze(1)
    logits = torch.argsort(torch.rand(b, t, generator=g), dim=-1).double() - (t - 1) / 2
    tokens = z + (logits / norm).unsqueeze(-1) * u.unsqueeze(1)
    x = {"tokens": tokens, "instr": instr, "f": torch.randn(b, s.keep, e, generator=g),
         "s": torch.randn(b, s.keep, e, generator=g), "t": torch.randn(b, s.length, e, generator=g),
         "y": torch.randn(b, s.length, e, generator=g)}
    return {k: v.to(device=device, dtype=dtype) for k, v in x.items()} | {"keep": s.keep}


# The references: the model's own modules and loops (priorclip.pir.PIR), ``m`` a pae_modules dict, ``x`` pae_inputs.
def _ref_filter(m: nn.ModuleDict, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return vir_filter_reference(x["tokens"], x["instr"], x["keep"])


def _ref_vir_sa(m: nn.ModuleDict, x: dict) -> torch.Tensor:
    return m["img_sa"][0](x["f"])


def _ref_vir_ca(m: nn.ModuleDict, x: dict) -> torch.Tensor:
    query = x["instr"].unsqueeze(1).expand(-1, x["s"].shape[1], -1)
    return m["img_ca"][0](m["mapping_img"][0](query), x["s"])


def _ref_lca_sa(m: nn.ModuleDict, x: dict) -> torch.Tensor:
    return m["txt_sa"][0](x["t"])


def _ref_lca_ca(m: nn.ModuleDict, x: dict) -> torch.Tensor:
    return m["txt_ca"][0](m["mapping_txt"][0](x["t"]), x["y"])


def _ref_vir(m: nn.ModuleDict, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """PIR._image_features from the projected tokens on, with the plain-torch filter: (F[:, 0], order)."""
    f, order = _ref_filter(m, x)
    query = x["instr"].unsqueeze(1).expand(-1, f.shape[1], -1)
    for sa, ca, mapping in zip(m["img_sa"], m["img_ca"], m["mapping_img"]):
        f = ca(mapping(query), sa(f))
    return f[:, 0], order


def _ref_lca(m: nn.ModuleDict, x: dict) -> torch.Tensor:
    """PIR.encode_text's cycles (no padding mask, as the checkpoints): T3[:, 0]."""
    t = x["t"]
    for sa, ca, mapping in zip(m["txt_sa"], m["txt_ca"], m["mapping_txt"]):
        t = ca(mapping(t), sa(t))
    return t[:, 0]


REFERENCES: dict[str, Callable[[nn.ModuleDict, dict], Any]] = {
    "filter": _ref_filter, "vir_sa": _ref_vir_sa, "vir_ca": _ref_vir_ca, "lca_sa": _ref_lca_sa,
    "lca_ca": _ref_lca_ca, "vir": _ref_vir, "lca": _ref_lca}


def pae_weights(m: nn.ModuleDict, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The kernels' prepared weights (mappings folded into the CroSA queries in float64, rounded once)."""
    from priorclip.kernels import pae

    return {"vir_sa": pae.BlockWeights.of(m["img_sa"][0], device, dtype),
            "vir_ca": pae.BlockWeights.of(m["img_ca"][0], device, dtype, m["mapping_img"][0]),
            "lca_sa": pae.BlockWeights.of(m["txt_sa"][0], device, dtype),
            "lca_ca": pae.BlockWeights.of(m["txt_ca"][0], device, dtype, m["mapping_txt"][0]),
            "vir": pae.ChainWeights.of(m["img_sa"], m["img_ca"], m["mapping_img"], device, dtype),
            "lca": pae.ChainWeights.of(m["txt_sa"], m["txt_ca"], m["mapping_txt"], device, dtype)}


def pae_fused(key: str, w: dict, x: dict, ops: Any) -> Callable[[], Any]:
    """The fused variant of a point through ``ops`` (a ``kernels.pae.PAEOps``)."""
    from priorclip.kernels import pae

    fns = {"filter": lambda: ops.vir_filter(x["tokens"], x["instr"], x["keep"]),
           "vir_sa": lambda: pae.mhsa(x["f"], w["vir_sa"], ops=ops),
           "vir_ca": lambda: pae.crosa_single_query(x["instr"], x["s"], w["vir_ca"], ops=ops),
           "lca_sa": lambda: pae.mhsa(x["t"], w["lca_sa"], ops=ops),
           "lca_ca": lambda: pae.crosa(x["t"], x["y"], w["lca_ca"], ops=ops),
           "vir": lambda: pae.vir(x["tokens"], x["instr"], w["vir"], x["keep"], ops),
           "lca": lambda: pae.lca(x["t"], w["lca"], ops=ops)}
    return fns[key]


def _counting(ops: Any) -> tuple[Any, list[int]]:
    """``ops`` with each call counted: one call is one kernel launch on the fused path."""
    n = [0]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            n[0] += 1
            return fn(*args, **kwargs)
        return counted

    return type(ops)(*(wrap(f) for f in ops)), n


def aten_ops(fn: Callable[[], Any]) -> int:
    """Non-view ATen ops one call runs: about the kernels eager PyTorch launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return c.n


def _tile_text(cfg: dict) -> str:
    return (f"{cfg['block_m']}x{cfg.get('block_n', 'N')}x{cfg['block_k']} w{cfg['num_warps']} "
            f"s{cfg['num_stages']}")


def config_ops(ops: Any, i: int) -> tuple[Any, str]:
    """``ops`` whose linear is the Triton launcher with the i-th sweep tile (``CONFIGS[i]`` for plain GEMMs,
    ``LN_CONFIGS[i]`` with LayerNorm; the default tile where the list is shorter), and the tiles as text."""
    from priorclip.kernels.pae_linear_triton import CONFIGS as GEMM_TILES
    from priorclip.kernels.pae_linear_triton import LN_CONFIGS, candidate_configs, pae_linear_triton

    def linear(x, weight, bias=None, residual=None, rep=1, ln_weight=None, ln_bias=None, ln_eps=1e-5, gelu=False):
        tiles = candidate_configs(weight.shape[0], ln_weight is not None)
        return pae_linear_triton(x, weight, bias, residual, rep, ln_weight, ln_bias, ln_eps, gelu,
                                 config=tiles[i] if i < len(tiles) else None)

    text = " / ".join(f"{kind} {_tile_text(tiles[i]) if i < len(tiles) else 'default'}"
                      for kind, tiles in (("gemm", GEMM_TILES), ("ln", LN_CONFIGS)))
    return ops._replace(linear=linear), text


def n_sweep_configs() -> int:
    from priorclip.kernels.pae_linear_triton import CONFIGS as GEMM_TILES
    from priorclip.kernels.pae_linear_triton import LN_CONFIGS

    return max(len(GEMM_TILES), len(LN_CONFIGS))


def _pae_check(want: Any) -> Callable[[Any], dict]:
    """Max error of the block output (the filter: the kept rows) against float64, and for the filter and the VIR chain
    whether the belief order equals float64's."""
    w_out, w_order = want if isinstance(want, tuple) else (want, None)

    def check(out: Any) -> dict:
        got, order = out if isinstance(out, tuple) else (out, None)
        err = (got.double() - w_out).abs().max().item() if got.numel() else 0.0
        return {"max_err": err, "order_equal": None if w_order is None else bool(torch.equal(order.cpu(),
                                                                                          w_order.cpu()))}
    return check


def launch_us(device: torch.device) -> float:
    """The cost of one tiny kernel measured now: CUDA-graph time per kernel (call time off CUDA)."""
    t = torch.zeros(1, device=device)
    fn = lambda: t.add_(1)  # noqa: E731
    return time_graph(fn, device, 200) or time_call(fn, device, 20 if device.type == "cuda" else 3)


def bench_pae(device: torch.device, dtypes: list[str], batches: list[int], iters: int, compile_mode: str | None,
              bw_gbs: float, rows: list[dict], on_point: Callable[[list[dict]], None], shape: PAEShape,
              sweep: bool = False) -> None:
    """PIR's PAE points (filter, four blocks, two chains) at each dtype and batch: eager, compiled, fused."""
    from priorclip.kernels.pae import DISPATCH, triton_ops
    from priorclip.kernels.vir_filter_triton import vir_filter_triton

    # CUDA: the dispatchers, as the model runs them (Triton through the priorclip ops); CPU: the launchers under
    # the interpreter (the dispatchers would run the references there). The filter point times the launcher itself.
    ops = DISPATCH if device.type == "cuda" else triton_ops()
    compiling = device.type == "cuda" and compile_mode != "none"
    if compiling:  # one static graph per (point, dtype, batch): more entries than dynamo's default limit of 8
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    reps = 5 if device.type == "cuda" else 1  # the interpreter is slow and its times mean nothing
    labels = shape.labels()
    master = pae_modules(shape)
    with torch.no_grad():
        for dt_name in dtypes:
            dtype = DTYPES[dt_name]
            m = copy.deepcopy(master).to(device=device, dtype=dtype)
            m64 = copy.deepcopy(m).double()  # float64 of the very weights the variants use
            w = pae_weights(m, device, dtype)
            compiled = {k: torch.compile(REFERENCES[k], dynamic=False, **({"mode": compile_mode} if compile_mode
                                                                             else {}))
                        for k in REFERENCES} if compiling else {}
            for b in batches:
                x = pae_inputs(shape, b, dtype, device, seed=b)
                x64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
                budget = pae_budget(shape, b, torch.empty((), dtype=dtype).element_size())
                for key, ref in REFERENCES.items():
                    flop, nbytes = budget[key]
                    base = {"kernel": "pae", "tensor": labels[key], "block": key, "dtype": dt_name, "batch": b,
                            "flop": flop, "bytes": nbytes, "floor_us": nbytes / (bw_gbs * 1e9) * 1e6}
                    variants: dict[str, Callable[[], Any]] = {"eager": lambda ref=ref: ref(m, x)}
                    if key in compiled:
                        variants["compiled"] = lambda key=key: compiled[key](m, x)
                    point_ops = ops._replace(vir_filter=vir_filter_triton) if key == "filter" else ops
                    variants["fused"] = pae_fused(key, w, x, point_ops)
                    tiles = {}
                    if sweep and key in SWEPT:
                        for i in range(n_sweep_configs()):
                            cfg_ops, tiles[f"fused cfg{i}"] = config_ops(ops, i)
                            variants[f"fused cfg{i}"] = pae_fused(key, w, x, cfg_ops)
                    point = measure_point(variants, _pae_check(ref(m64, x64)), base, device, iters, reps)
                    for r in point:
                        if r["variant"] in tiles:
                            r["config"] = tiles[r["variant"]]
                        if "error" in r:
                            continue
                        if r["variant"] == "eager":
                            r["launches"] = aten_ops(variants["eager"])
                        elif r["variant"] == "fused":
                            counted, n = _counting(point_ops)
                            pae_fused(key, w, x, counted)()
                            r["launches"] = n[0]
                    rows += point
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
    head = f"{r['tensor']} " if r.get("tensor") else ""
    if "error" in r:
        return f"{head}{r['dtype']} b{r['batch']} {r['variant']}: ERROR {r['error']}"
    return (f"{head}{r['dtype']} b{r['batch']} {r['variant']}: call {_fmt(r['call_us'])} us, "
            f"graph {_fmt(r['graph_us'])} us, "
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


def pae_rows(rows: list[dict]) -> list[list[str]]:
    """Per (block, dtype, batch): work, floor, eager / compiled / fused (and the best swept tile), the ratios."""
    out = []
    pae = [r for r in rows if r["kernel"] == "pae"]
    for key in dict.fromkeys((r["tensor"], r["dtype"], r["batch"]) for r in pae):
        point = [r for r in pae if (r["tensor"], r["dtype"], r["batch"]) == key]
        by = {r["variant"]: r for r in point}
        t = lambda v: _fmt(_best_time(by.get(v, {})))  # noqa: E731
        f = by.get("fused", {})
        swept = [r for r in point if r["variant"].startswith("fused cfg") and "error" not in r
                 and r["order_equal"] is not False]
        best = min(swept, key=_best_time, default=None)
        ft = _best_time(f)
        ok = bool(f) and "error" not in f
        cells = [key[0], key[1], str(key[2]), _fmt(point[0]["flop"] / 1e9, 3), _fmt(point[0]["floor_us"]),
                 t("eager"), t("compiled"), t("fused"),
                 f"{_fmt(_best_time(best))} ({best['variant'].removeprefix('fused ')})" if best else "-",
                 _fmt(point[0]["flop"] / (ft * 1e-6) / 1e12, 2) if ok and ft else "-",
                 _fmt(f.get("x_floor"), 2), _fmt(f.get("speedup_vs_eager"), 2), _fmt(f.get("speedup_vs_compiled"), 2),
                 f"{by.get('eager', {}).get('launches', '-')} / {f.get('launches', '-')}",
                 (f"{f['max_err']:.1e}" if ok else f"ERROR: {f.get('error', 'not run')}"), _fmt(f.get("order_equal"))]
        out.append(cells)
    return out


def pae_targets(rows: list[dict], launch: float | None, dry_run: bool) -> list[str]:
    """Issue 16's targets, each as met or missed (by how much), from the rows: every PAE block and chain >= 2x
    torch.compile at batch 256; VIR's chain at batch 1 within its memory floor (weight streaming) + one measured
    launch per fused kernel."""
    pae = [r for r in rows if r["kernel"] == "pae"]
    if not pae:
        return []
    tag = " (dry run: not a measurement)" if dry_run else ""
    by = {(r["block"], r["dtype"], r["batch"], r["variant"]): r for r in pae}
    labels = {r["block"]: r["tensor"] for r in pae}
    dtypes = list(dict.fromkeys(r["dtype"] for r in pae))
    out = []
    for block in (b for b in BLOCKS if b in labels):
        for dt in dtypes:
            head = f"- {labels[block]}, {dt}, B={TARGET_BATCH}: fused >= {TARGET_SPEEDUP:g}x compiled: "
            f, c = by.get((block, dt, TARGET_BATCH, "fused")), by.get((block, dt, TARGET_BATCH, "compiled"))
            if f is None:
                status = f"not run (batch {TARGET_BATCH} not in --batches)"
            elif "error" in f:
                status = f"fused failed ({f['error']})"
            elif c is None or "error" in c:
                status = "no compiled baseline (CUDA only; --compile-mode none skips it)"
            else:
                ft, ct = _best_time(f), _best_time(c)
                x = ct / ft
                timing = f"{x:.2f}x ({_fmt(ft)} us fused vs {_fmt(ct)} us compiled)"
                status = (f"met, {timing}" if x >= TARGET_SPEEDUP else
                          f"missed by {TARGET_SPEEDUP - x:.2f}x, {timing}; needs <= {_fmt(ct / TARGET_SPEEDUP)} us")
            out.append(head + status + tag)
    if "vir" in labels:
        for dt in dtypes:
            head = f"- vir chain, {dt}, B=1: fused within its weight-streaming floor + its launches: "
            f, e = by.get(("vir", dt, 1, "fused")), by.get(("vir", dt, 1, "eager"), {})
            if f is None:
                status = "not run (batch 1 not in --batches)"
            elif "error" in f:
                status = f"fused failed ({f['error']})"
            else:
                ft, bound = _best_time(f), f["floor_us"] + f["launches"] * (launch or 0.0)
                how = "met" if ft <= bound else f"missed by {ft - bound:.1f} us ({ft / bound:.2f}x the bound)"
                status = (f"{how}: {_fmt(ft)} us vs floor {_fmt(f['floor_us'])} us ({f['bytes'] / 1e6:.1f} MB) + "
                          f"{f['launches']} launches x {_fmt(launch, 2)} us = {_fmt(bound)} us; eager "
                          f"{_fmt(_best_time(e))} us over {e.get('launches', '-')} ATen ops")
            out.append(head + status + tag)
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
    stem = summary_rows(doc["rows"])
    if stem:
        out += ["Stem epilogue + belief gate, microseconds per call (CUDA-graph device time where measured):", "",
                "| dtype | B | floor | eager | compiled | best fused (BLOCK_D/warps) | x floor | vs compiled | "
                "fused+proj | op call |", "| --- | --- | " + "---: | " * 8]
        out += ["| " + " | ".join(c) + " |" for c in stem]
    for kernel, title, check in (("quantize_fp8", "FP8 activation quantisation (bf16 in, e4m3 out)", "bytes equal"),
                                 ("add_layernorm", "Residual add + LayerNorm (bf16)", "max err")):
        table = elementwise_rows(doc["rows"], kernel)
        if table:
            out += ["", f"{title}, microseconds per call:", "",
                    f"| tensor | B | floor | eager | compiled | fused | x floor | vs eager | {check} |",
                    "| --- | --- | " + "---: | " * 7]
            out += ["| " + " | ".join(c) + " |" for c in table]
    pae = pae_rows(doc["rows"])
    if pae:
        shape = doc.get("pae_shape", {})
        out += ["", f"PIR PAE blocks (spec §8B.5-6; E={shape.get('e')}, {shape.get('heads')} heads, VIR "
                f"{shape.get('tokens')} -> {shape.get('keep')} tokens, LCA L={shape.get('length')}), microseconds per "
                "call. GFLOP: the naive reference's; floor: weights once + activations in and out at the copy "
                "bandwidth; ops: eager's ATen ops / fused launches; max err and order: fused against float64:", "",
                "| block | dtype | B | GFLOP | floor | eager | compiled | fused | best tile | fused TFLOP/s | "
                "x floor | vs eager | vs compiled | ops | max err | order |", "| --- | --- | --- | " + "---: | " * 13]
        out += ["| " + " | ".join(c) + " |" for c in pae]
        tiles = {r["variant"].removeprefix("fused "): r["config"] for r in doc["rows"] if r.get("config")}
        if tiles:
            out += ["", "pae_linear tiles swept (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages; N: the whole row): "
                    + "; ".join(f"{k} = {v}" for k, v in tiles.items())]
        out += ["", "Targets (issue 16)" + (" - dry run: not a measurement" if doc.get("dry_run") else "") + ":", ""]
        out += pae_targets(doc["rows"], doc.get("launch_us"), bool(doc.get("dry_run")))
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
            "measured copy bandwidth. Errors against a float64 run of the reference: the gated tokens (stem gate), "
            "the block's output (PAE; the filter: its kept rows, the VIR chain: F[:, 0]); order: the belief order."]
    graph_errors = [f"{r['kernel']} {r.get('tensor') or ''} {r['dtype']} b{r['batch']} {r['variant']}: "
                    f"{r['graph_error']}" for r in doc["rows"] if r.get("graph_error")]
    if graph_errors:
        out += ["", "Not captured in a CUDA graph (call time only): " + "; ".join(graph_errors)]
    out = [ln for i, ln in enumerate(out) if ln or i == 0 or out[i - 1]]  # one blank line between sections
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
@click.option("--kernels", "kernel_list", default="all", show_default=True,
              help=f"Kernels to time, comma-separated among {', '.join(KERNELS)}, or 'all'.")
@click.option("--pae-shape", default=",".join(map(str, PAE_SHAPE)), show_default=True,
              help="PAE sizes E,HEADS,TOKENS,LENGTH (VIR keeps 80% of TOKENS; LENGTH is LCA's caption length); "
                   "small ones make a CPU dry run fast.")
@click.option("--pae-configs", default="default", show_default=True, type=click.Choice(["default", "all"]),
              help="'all' adds pae_linear tile-sweep variants (fused cfg<i>) to the two MHSA blocks.")
@user_errors
def main(out_dir: str, device: str, batches: str, dtypes: str, shape: str, iters: int, compile_mode: str,
         configs: str, no_fp8: bool, kernel_list: str, pae_shape: str, pae_configs: str) -> None:
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
        names = list(KERNELS) if kernel_list.strip() == "all" else [k.strip() for k in kernel_list.split(",")
                                                                     if k.strip()]
        bad = [k for k in names if k not in KERNELS]
        if bad or not names:
            raise ValueError(f"--kernels: unknown kernel(s) {bad or [kernel_list]}; use 'all' or some of "
                             f"{', '.join(KERNELS)}")
        run = {k for k in names if not (no_fp8 and k == "quantize_fp8")}
        pae_sh = parse_pae_shape(pae_shape)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    from priorclip.benchmarks.report import environment

    out = check_output_dir(out_dir, option="--out")  # created by the first write, just below
    bw = copy_bandwidth_gbs(dev)
    doc = {"schema": SCHEMA, "environment": environment(dev), "copy_bandwidth_gbs": bw, "dry_run": dev.type != "cuda",
           "kernels": [k for k in KERNELS if k in run],
           "shape": {"patches": sh[0], "width": sh[1], "prior_features": sh[2]}, "rows": []}
    if "pae" in run:
        doc["pae_shape"] = {"e": pae_sh.e, "heads": pae_sh.heads, "tokens": pae_sh.tokens, "keep": pae_sh.keep,
                            "length": pae_sh.length, "instru_num": INSTRU_NUM, "cycle_num": CYCLE_NUM}
        doc["launch_us"] = launch_us(dev)  # one tiny kernel: the VIR batch-1 target's launch allowance

    def write(rows: list[dict]) -> None:
        doc["rows"] = rows
        write_text(out / "kernels.json", json.dumps(doc, indent=1) + "\n")  # atomic: a timeout keeps the last rows
        write_text(out / "kernels.md", markdown(doc))

    write([])
    rows: list[dict] = []
    mode = None if compile_mode == "default" else compile_mode
    if "stem_gate" in run:
        bench_stem_gate(dev, dts, bs, sh, iters, mode, cfgs, bw, rows, write)
    if "quantize_fp8" in run:
        bench_quantize_fp8(dev, bs, iters, mode, bw, rows, write)
    if "add_layernorm" in run:
        bench_add_layernorm(dev, bs, iters, mode, bw, rows, write)
    if "pae" in run:
        bench_pae(dev, dts, bs, iters, mode, bw, rows, write, pae_sh, sweep=pae_configs == "all")
    print(f"wrote {out / 'kernels.md'}")


if __name__ == "__main__":
    main()
