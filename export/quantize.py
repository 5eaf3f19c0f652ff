"""INT8 with explicit Q/DQ nodes from our own calibration (min-max, percentile, entropy), in one of two layouts.

What is quantised: every Conv, MatMul and Gemm whose weight is a constant (the "GEMM-like" layers; attention's
activation-activation MatMuls, softmax and the gate stay in float). Weights are symmetric int8 **per output
channel** (Conv axis 0; MatMul ``[K,N]`` axis 1; Gemm axis 0 with ``transB=1``), stored as int8 initializers read
through ``DequantizeLinear``. Where the activations go through ``QuantizeLinear -> DequantizeLinear`` depends on the
runtime that will fuse them (``target``, :data:`TARGETS`), because a Q/DQ graph is only as fast as the integer
kernels its runtime builds from it:

* ``tensorrt``: activations are symmetric **int8** per tensor (zero point 0, the only form TensorRT's explicit
  quantisation accepts), Q/DQ on the inputs of the quantised layers only; TensorRT fuses DQ -> Conv/MatMul and
  requantises on its own. The graph is then converted to fp16 (:func:`priorclip.export.fp16.convert_fp16`, with its
  fp32 islands: LayerNorm, Softmax, reductions, the belief gate) at opset 19, whose Q/DQ take fp16 scales, so a
  strongly typed engine runs int8 GEMMs and fp16 everywhere else instead of fp32 everywhere but the GEMMs.
* ``ort-cpu``: activations are asymmetric **uint8** (zero point chosen from the calibrated range; 0 after a ReLU).
  ONNX Runtime's CPU graph optimiser rewrites only complete ``DQ -> op -> Q`` groups into integer kernels, and on
  x86 only for uint8 activations (int8 ones need ``session.qdqisint8allowed=1``, which defaults to 0 there): so in
  the convolutional part (Conv, AveragePool, residual Add on 4-D tensors) every such op's inputs are quantised, which
  puts a Q on each conv's output too (after its ReLU, which the Q's zero point makes redundant), and conv/Gemm biases
  become int32 ``DequantizeLinear``; ORT then builds ``QLinearConv``/``QLinearAdd``/``QLinearAveragePool`` chains.
  MatMuls keep a float output (``DQ, DQ -> MatMul``, fused to ``MatMulIntegerToFloat``), Gemms to ``QGemm``.
  :func:`ort_kernel_counts` counts what ORT actually built. See :data:`DEFAULT_TARGET` for the measurement.

Both layouts are standard ONNX (``QuantizeLinear``/``DequantizeLinear`` only; the contrib kernels above are what ORT
makes of them at session start, never written to the file).

Calibration runs the fp32 ONNX graph in ONNX Runtime with the tensors to quantise added as outputs, **streaming**:
each run returns only a group of those tensors for a sub-batch of images, sized so the returned activations stay
under ``memory_budget`` bytes (:data:`CALIB_MEMORY_BUDGET`), and is reduced to running min/max (and |x| histograms)
before the next. Methods differ only in the clipping threshold ``amax`` on |x|:

  - ``minmax``: the largest |x| seen over the calibration set;
  - ``percentile``: the 99.99th percentile of |x| (2048-bin histogram);
  - ``entropy``: TensorRT's KL-divergence threshold over the same histogram (128 quantised bins, thresholds from
    bin 128 to 2048, the last minimum wins), as in TensorRT's legacy entropy calibrator and pytorch-quantization.

``keep_fp`` names layers that stay unquantised: fnmatch patterns over the model's module paths (see
:func:`~.graph.node_scope`; a plain path also covers everything under it) or over weight names (``visual.proj``,
``text_projection``, the bare parameters that are not in a submodule); :data:`DEFAULT_KEEP_FP` records the
measurement behind the default (with random weights recall is chance, so cosine and top-10 agreement decided).
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .amax import HIST_BINS, METHODS, PERCENTILE, TensorStats, abs_hist, choose_amax
from .graph import node_scope

TARGETS = ("ort-cpu", "tensorrt")
# Which layout an export gets when its caller names none: the runtime that will run it.
TARGET_FOR_FORMAT = {"onnx": "ort-cpu", "trt": "tensorrt"}
# NOTE (benchmarks/results/export-int8-layouts-cpu-2026-11-27.md: default model, image encoder at batch 8, 2-core AMD
# EPYC with AVX512-VNNI, ONNX Runtime 1.32, counted on the graph ORT runs after optimisation): the study's variant
# named there "legacy: int8 Q/DQ on layer inputs, fp32 graph" (the tensorrt Q/DQ layout left on the fp32 graph:
# int8 activations, Q/DQ on layer inputs only, float conv biases; close to the earlier single layout but not that
# code, as its scales are fp16-rounded and it has one DQ per use) got 50 MatMulIntegerToFloat + 1 QGemm but not one
# integer convolution (int8 activations are refused on x86 unless session.qdqisint8allowed=1, and a conv without a
# Q on its output is never fused): all 56 convs, the prior's 56 % of the FLOPs, ran in fp32 behind a dequantise of
# their weights, 1.09x ORT fp32 (10.86 vs 9.97 img/s; torch eager 8.09). ort-cpu: 55 QLinearConv, 15 QLinearAdd,
# 8 QLinearAveragePool, 49 MatMulIntegerToFloat: 26.27 img/s, 3.24x torch eager.
DEFAULT_TARGET = "ort-cpu"


def target_for_provider(provider: str) -> str:
    """The layout for the ONNX Runtime provider that will run the graph: the CPU provider's integer fusions
    (QLinearConv, MatMulIntegerToFloat) need ``ort-cpu``; CUDA has no such kernels, so it gets the symmetric
    Q/DQ-on-fp16 layout (the one TensorRT consumes), which runs wholly on the GPU."""
    return "ort-cpu" if provider == "CPUExecutionProvider" else "tensorrt"


# Bytes of calibration activations one ONNX Runtime run may return (the group of tensors x the sub-batch). NOTE
# (export-int8-layouts-cpu-2026-11-27.md, default model's image graph, 64 calibration images, peak RSS of the
# process, 0.73 GiB once the graph is loaded): every tensor of a 32-image batch in one run, as before issue 12,
# peaked at 6.66 GiB; with this budget, 2.99 GiB in 70 s; with 64 MiB, 3.05 GiB in 216 s (more groups, more
# passes): the rest is the session (about twice the weights) and one sub-batch's forward pass, and none of it grows
# with the number of images. (Measured before decoded inputs were cached, see collect_stats: the cache adds at most
# the budget again and saves re-decoding the images on every pass.)
CALIB_MEMORY_BUDGET = 256 * 2**20
CALIB_SUB_BATCH = 8  # images per calibration run when a group's activations allow it
# Layers left in float by default: the ViT patch embed and the prior's tail (attention pool, projection to y).
# NOTE 1 (benchmarks/results/export-int8-keepfp-cpu-2026-11-23.md, 64 test images): keeping the patch embed
# (``visual.conv1``, a 3072-long dot product over raw pixels, ~1 % of the image FLOPs) raised the image cosine mean
# from 0.99771 to 0.99909 and top-10 i2t agreement from 0.897 to 0.925.
# NOTE 2 (benchmarks/results/export-int8-layouts-cpu-2026-11-27.md, ort-cpu layout, entropy calibration on 256
# class-spread train images, 256 class-spread test images; random weights, whose 50 beliefs per image differ by ~1e-6
# so any error in the gate's input y reorders them): with the whole prior int8, y's relative error is 4.4e-3 (median),
# 79 % of the images' belief order flips and 10 of 256 fall below the 0.99 floor (min 0.9856): FAIL. Most of y's
# error comes from the attention pool's and vision_proj_res' per-tensor activations, not from the convs: with those
# two in fp32 (a small share of the image FLOPs) it is 4.4e-4, 17 % flip, cosine min 0.9924, none below 0.99,
# ΔmR +0.14: PASS at 26.3 img/s (3.24x torch eager; 28.8 with them int8). But on the whole test split (1,027 images,
# export-int8-layouts-cpu-full-test-split-*.md) one image (a flipped top-1 belief) falls to 0.988: with random
# weights even random noise of relative size 1e-3 on y flips 36 % of the images and put 1 of 256 below 0.99 (study's
# gate-sensitivity table), so no int8 prior is safe from this tail. Re-run the study with a trained checkpoint.
DEFAULT_KEEP_FP: tuple[str, ...] = ("visual.conv1", "res_visual.attnpool*", "vision_proj_res")
# PIR: nothing kept by default. NOTE (measurement, 2026-12-01: pir-tiny random init, torch seed 0, ort-cpu layout,
# entropy calibration on 32 generated images (seed 2), 32 other generated test images): every variant fails the int8
# floor on 1-3 images, each one whose set of 40 kept tokens changed (all 32 belief orders change: random weights give
# near-tied beliefs) - image cosine min 0.894 with nothing kept, 0.895 keeping vision_proj + conv_proj, 0.882 with the
# Swin patch embed, 0.899 with the whole prior (conv_encoder, conv_proj); text 0.99987 in all. No keep set short of
# the whole Swin and prior is supported by this, so none is the default. Re-measure with a trained checkpoint.
PIR_KEEP_FP: tuple[str, ...] = ()


def default_keep_fp(family: str) -> tuple[str, ...]:
    """The layers an int8 export leaves in float by default for a model family (``cfg.family``)."""
    from priorclip.config import FAMILY_PIR

    return PIR_KEEP_FP if family == FAMILY_PIR else DEFAULT_KEEP_FP
# The gate's inputs exact: the prior (its output y) and the ViT stem (x) in float, everything else int8: no belief
# order flips (cosine min 0.999298 on the 256 images above) but 13.85 img/s, 1.71x torch eager; an option, not a
# default.
GATE_INPUTS_FP: tuple[str, ...] = ("res_visual*", "vision_proj_res", "visual.conv1")

# Ops ORT's CPU provider runs on integers after its QDQ fusions (the contrib ones only exist after optimisation).
INTEGER_OPS = ("QLinearConv", "NhwcQLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
               "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
               "QLinearWhere", "QAttention", "MatMulNBits", "DynamicQuantizeLinear")
FLOAT_GEMM_OPS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")
_FP16_MIN_NORMAL = 2.0**-14


@dataclass
class Target:
    node: onnx.NodeProto
    activation: str
    weight: str
    axis: int


@dataclass
class QParams:
    """Per-tensor activation quantisation: ``q = saturate(round(x / scale) + zero_point)``."""

    scale: float
    zero_point: int
    dtype: int  # TensorProto.INT8 or TensorProto.UINT8


@dataclass
class Plan:
    """Where Q/DQ go: the weight GEMMs, and for each activation tensor the (node, input index) pairs that read it
    through ``DequantizeLinear(QuantizeLinear(tensor))``."""

    target: str
    gemms: list[Target]
    kept: list[str]
    act_uses: dict[str, list[tuple[onnx.NodeProto, int]]]
    integer_ops: list[str]  # op types (besides the GEMMs) that get quantised inputs, for the calibration table
    keep_fp_matched: set[str]  # the keep_fp patterns that kept at least one layer (or pool/add) of this graph in float
    info: dict | None = None  # tensor_info(model) when planning needed it, reused by calibration

    @property
    def tensors(self) -> list[str]:
        return sorted(self.act_uses)


def _matching(scope: str, patterns: Iterable[str]) -> set[str]:
    """The patterns that cover ``scope``: fnmatch, the exact path, or a parent path."""
    return {p for p in patterns if fnmatch.fnmatchcase(scope, p) or scope == p or scope.startswith(p + ".")}


def find_targets(model: onnx.ModelProto, keep_fp: Iterable[str] = ()
                 ) -> tuple[list[Target], list[str], set[str]]:
    """Layers to quantise, the scopes of the ones ``keep_fp`` leaves in float, and the ``keep_fp`` patterns that
    matched at least one of those layers (a pattern matching none is most likely a typo: the caller says so)."""
    keep_fp = tuple(keep_fp)
    inits = {i.name: i for i in model.graph.initializer}
    targets, kept, matched = [], [], set()
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        if w.data_type != TensorProto.FLOAT:
            continue
        scope = node_scope(n)
        wname = n.input[1].removeprefix("model.")
        hits = _matching(scope, keep_fp) | _matching(wname, keep_fp)
        if hits:
            kept.append(scope)
            matched |= hits
            continue
        if n.op_type == "Conv":
            axis = 0
        elif n.op_type == "MatMul":
            if len(w.dims) != 2:
                continue
            axis = 1
        else:
            attrs = {a.name: a.i for a in n.attribute}
            if attrs.get("transA", 0):
                continue
            axis = 0 if attrs.get("transB", 0) else 1
        targets.append(Target(n, n.input[0], n.input[1], axis))
    return targets, kept, matched


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the data of large initializers (dims and types kept): enough for shape inference."""
    m = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(m, f, getattr(model, f))
    m.opset_import.extend(model.opset_import)
    g = m.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) > 64:
            t = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
            g.initializer.append(t)
        else:
            g.initializer.append(init)
    return m


def tensor_info(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
                ) -> dict[str, tuple[int, list[int | None]]]:
    """(element type, shape; None for unknown dims) of every tensor, with the inputs' batch axis fixed at 1 (sizes
    per item) and, for the inputs named in ``input_shapes``, every axis fixed (e.g. the text length of a calibration
    batch)."""
    m = _light_copy(model)
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        fixed = (input_shapes or {}).get(vi.name)
        if fixed is not None and len(fixed) == len(dims):
            for d, v in zip(dims, fixed):
                d.Clear()
                d.dim_value = int(v)
        elif len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # pragma: no cover - fall back to whatever the exporter recorded
        pass
    out: dict[str, tuple[int, list[int | None]]] = {}
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") \
            else None
        out[vi.name] = (tt.elem_type, dims)
    for init in model.graph.initializer:
        out[init.name] = (init.data_type, list(init.dims))
    return out


def plan_quantization(model: onnx.ModelProto, keep_fp: Iterable[str] = (), target: str = DEFAULT_TARGET) -> Plan:
    """Decide the Q/DQ layout of ``model`` for ``target`` (see the module docstring; :func:`quantize_int8` checks
    ``target``)."""
    keep_fp = tuple(keep_fp)
    gemms, kept, matched = find_targets(model, keep_fp)
    act_uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    integer_ops: set[str] = set()
    # Integer chains (below) start at a quantised conv: without one (the text graph) only the GEMM inputs get Q/DQ,
    # and shape inference is left to calibration, which needs it at the batch's item shape anyway.
    if target == "tensorrt" or not any(t.node.op_type == "Conv" for t in gemms):
        for t in gemms:
            act_uses.setdefault(t.activation, []).append((t.node, 0))
        return Plan(target, gemms, kept, act_uses, [], matched)
    info = tensor_info(model)
    inits = {i.name for i in model.graph.initializer}

    def rank4_float(name: str) -> bool:
        et, dims = info.get(name, (0, None))
        return et == TensorProto.FLOAT and dims is not None and len(dims) == 4

    ops: list[tuple[onnx.NodeProto, list[int]]] = [(t.node, [0]) for t in gemms]
    # The convolutional part as integer chains: pooling and residual adds join when everything they read comes from
    # a quantised conv or another member (through at most one ReLU), so a kept (float) layer keeps its neighbours in
    # float too; found by a fixpoint in graph order.
    producer = {o: n for n in model.graph.node for o in n.output}
    members = {id(t.node) for t in gemms if t.node.op_type == "Conv"}

    def from_member(name: str) -> bool:
        p = producer.get(name)
        if p is not None and p.op_type == "Relu":
            p = producer.get(p.input[0])
        return p is not None and id(p) in members

    candidates = []
    for n in model.graph.node:
        if n.op_type == "AveragePool" and rank4_float(n.input[0]):
            idxs = [0]
        elif (n.op_type == "Add" and len(n.input) == 2 and not any(i in inits for i in n.input)
              and all(rank4_float(i) for i in n.input)):
            idxs = [0, 1]
        else:
            continue
        hits = _matching(node_scope(n), keep_fp)
        if hits:  # kept in float: a pattern that only names a pool or an add still did something
            matched |= hits
            continue
        candidates.append((n, idxs))
    changed = True
    while changed:
        changed = False
        for n, idxs in candidates:
            if id(n) not in members and all(from_member(n.input[k]) for k in idxs):
                members.add(id(n))
                changed = True
    for n, idxs in candidates:
        if id(n) in members:
            ops.append((n, idxs))
            integer_ops.add(n.op_type)
    for node, idxs in ops:
        for k in idxs:
            act_uses.setdefault(node.input[k], []).append((node, k))
    return Plan(target, gemms, kept, act_uses, sorted(integer_ops), matched, info)


# ----------------------------------------------------------------------------------------------------------------
# Calibration


def _session(model: onnx.ModelProto, extra_outputs: list[str]):
    """A CPU session over ``model`` with ``extra_outputs`` added, without a second in-memory copy of the weights.

    ``InferenceSession(model.SerializeToString())`` holds the serialised bytes besides the model and the session's
    own copy; written to a temporary file with external data and opened by path, it does not. The outputs are added
    to the caller's model only while it is written, and its weights are read back before returning.
    """
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No arena: ORT's arena keeps every buffer it ever grew to (the returned activations included) for the
    # session's life, so it would grow with each group's returned tensors.
    opts.enable_cpu_mem_arena = False
    outs = model.graph.output
    n_before = len(outs)
    have = {o.name for o in outs}
    for name in dict.fromkeys(extra_outputs):
        if name not in have:
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix="priorclip-calib-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "calibration.onnx"
        try:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="calibration.onnx.data", size_threshold=1024)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        finally:
            del outs[n_before:]
            # save_model moved the weights out to the file: read them back into the caller's model.
            onnx.load_external_data_for_model(model, tmp)
    return sess


def calibration_groups(sizes: dict[str, int], budget: int, sub_batch: int = CALIB_SUB_BATCH
                       ) -> list[tuple[list[str], int]]:
    """Split tensors (bytes per image each) into groups run together, each with its sub-batch, so that one run
    returns at most ``budget`` bytes: ``sum(sizes of the group) * sub_batch <= budget`` (a tensor larger than the
    budget for one image runs alone at sub-batch 1, the least possible). Order is kept (graph order = locality)."""
    if budget < 1 or sub_batch < 1:
        raise ValueError("memory budget and sub-batch must be positive")
    groups: list[tuple[list[str], int]] = []
    cur: list[str] = []
    cur_bytes = 0
    per_image = budget // sub_batch
    for name, size in sizes.items():
        if size > per_image:
            if cur:
                groups.append((cur, sub_batch))
                cur, cur_bytes = [], 0
            groups.append(([name], max(1, min(sub_batch, budget // max(size, 1)))))
            continue
        if cur and cur_bytes + size > per_image:
            groups.append((cur, sub_batch))
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += size
    if cur:
        groups.append((cur, sub_batch))
    return groups


def collect_stats(model: onnx.ModelProto, tensors: list[str], batches: Callable[[], Iterator[np.ndarray]],
                  method: str, progress: Callable[[str], None] | None = None,
                  memory_budget: int = CALIB_MEMORY_BUDGET, sub_batch: int = CALIB_SUB_BATCH,
                  info: dict | None = None) -> dict[str, TensorStats]:
    """Run the fp32 graph over the calibration batches and gather min/max (and |x| histograms when needed).

    Streaming, with bounded memory: tensors are split into groups (:func:`calibration_groups`) and each group's
    sizes at one image (from shape inference) times its sub-batch stay under ``memory_budget`` bytes; each run
    returns only that group and is reduced to running statistics at once. Every group costs one pass over the
    calibration set (two with histograms), so a larger budget is faster.

    Memory bound, independent of the number of calibration images: the caller's model + the session (about twice
    the weights; no ORT arena) + the forward pass of one sub-batch + about ``memory_budget`` of returned tensors +
    the decoded inputs: all of them, kept for the later passes, when together they take at most ``memory_budget``
    bytes, else one batch from ``batches`` at a time (decoded again on every pass). Measured on the default model's
    image graph (0.5 GB of weights, 64 images) before inputs were cached: 2.99 GiB peak RSS of the process with the
    default budget, against 6.66 GiB returning every tensor of a 32-image batch in one run
    (:data:`CALIB_MEMORY_BUDGET`).

    Sizes are planned at the item shape of the first batch; a later batch with larger items (a longer text batch)
    runs in proportionally smaller sub-batches, so the bound holds for inputs whose activations grow linearly.
    ``info`` (:attr:`Plan.info`) is reused when it already has the graph input at that item shape (the image
    graph's fixed size); the planner leaves it None where it needs no shapes (the text graph, the tensorrt layout),
    so shape inference runs once per graph.
    """
    it = iter(batches())
    first = next(it, None)
    if first is None or not len(first):
        raise ValueError("no calibration data: the batches are empty")
    in_name = model.graph.input[0].name
    fixed = [1, *first.shape[1:]]
    unit = int(np.prod(fixed))
    if info is None or info.get(in_name, (0, None))[1] != fixed:  # none, or the input had a free axis
        info = tensor_info(model, input_shapes={in_name: tuple(fixed)})
    known = [int(np.prod(d)) * 4 for _, d in (info.get(t, (0, None)) for t in tensors) if d and None not in d]
    fallback = max(known) if known else memory_budget  # unknown shape: assume the largest known (conservative)
    sizes = {}
    for t in tensors:
        _, d = info.get(t, (0, None))
        sizes[t] = int(np.prod(d)) * 4 if d and None not in d else fallback
    groups = calibration_groups(sizes, memory_budget, sub_batch)
    fresh: Iterator[np.ndarray] | None = itertools.chain([first], it)  # the first pass goes on from the shape's batch
    del first
    cached: list[np.ndarray] = []
    state = "fill"  # -> "cached" (replay `cached`) or "decode" (too large to keep: decode on every pass)

    def inputs() -> Iterator[np.ndarray]:
        nonlocal fresh, state
        if state == "cached":
            yield from cached
            return
        if state == "decode":
            yield from batches()
            return
        src, fresh = (fresh if fresh is not None else batches()), None
        cached.clear()
        held, keep = 0, True
        for b in src:
            if keep:
                held += b.nbytes
                keep = held <= memory_budget
                if keep:
                    cached.append(b)
                else:
                    cached.clear()
            yield b
        state = "cached" if keep else "decode"  # not reached when a pass stops early: the next one fills again

    sess = _session(model, tensors)
    stats = {t: TensorStats() for t in tensors}

    def runs(names: list[str], sb: int):
        for batch in inputs():
            grow = math.ceil(int(np.prod(batch.shape[1:])) / unit)
            step = max(1, sb // grow)
            for s in range(0, batch.shape[0], step):
                yield sess.run(names, {in_name: batch[s : s + step]})

    want_hist = method in ("percentile", "entropy")
    for gi, (names, sb) in enumerate(groups):
        for outs in runs(names, sb):
            for t, a in zip(names, outs):
                s = stats[t]
                lo, hi = float(a.min()), float(a.max())
                s.amin, s.amax = min(s.amin, lo), max(s.amax, hi)
                s.absmax = max(s.absmax, abs(lo), abs(hi))
                del a
            del outs
        if want_hist:
            for t in names:
                stats[t].hist = np.zeros(HIST_BINS, dtype=np.float64)
            for outs in runs(names, sb):
                for t, a in zip(names, outs):
                    s = stats[t]
                    s.hist += abs_hist(a, s.absmax if s.absmax > 0 else 1.0)
                del outs
        if progress:
            progress(f"calibration group {gi + 1}/{len(groups)} ({len(names)} tensors, sub-batch {sb}) done")
    return stats


def _fp16_exact(scale: np.ndarray | float) -> np.ndarray:
    """Scales rounded UP to the nearest fp16 value that is a normal number, so an fp16 graph holds them exactly
    (never clips more than the fp32 scale would)."""
    s = np.maximum(np.asarray(scale, dtype=np.float32), np.float32(_FP16_MIN_NORMAL))
    h = np.atleast_1d(s.astype(np.float16))
    up = h.astype(np.float32) < np.atleast_1d(s)
    h[up] = np.nextafter(h[up], np.float16(np.inf))
    return h.astype(np.float32).reshape(s.shape)


def activation_qparams(s: TensorStats, amax: float, target: str, activation_type: str | None = None) -> QParams:
    """Activation quantisation for ``target`` from the calibrated statistics and the method's |x| threshold.

    ``activation_type="int8"`` gives the ``ort-cpu`` layout symmetric int8 activations instead of uint8. NOTE
    (export-int8-layouts-cpu-int8-activations-*.md, 2-core AMD EPYC with AVX512-VNNI, ORT 1.32): even with
    ``session.qdqisint8allowed=1`` ORT then fused only 20 of the 55 convs (a ReLU before an int8 Q with zero point 0
    is not redundant, and residual adds stay float) and ran 3.6 img/s against 21.2 with uint8; kept for that study.
    """
    if target == "tensorrt":
        return QParams(float(_fp16_exact(amax / 127.0)), 0, TensorProto.INT8)
    if activation_type == "int8":
        return QParams(float(np.float32(amax / 127.0)), 0, TensorProto.INT8)
    if activation_type not in (None, "uint8"):
        raise ValueError(f"unknown activation type {activation_type!r}; choose uint8 or int8")
    # uint8, asymmetric: the range seen, each side clipped at the threshold, always containing 0 (so zero padding
    # and ReLU's zeros are exact and a ReLU before the Q is redundant: zero point 0 when nothing is negative).
    lo = min(max(s.amin, -amax), 0.0)
    hi = max(min(s.amax, amax), 0.0)
    if hi - lo <= 0:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return QParams(float(np.float32(scale)), zp, TensorProto.UINT8)


def quantize_weight(w: np.ndarray, axis: int, fp16_scales: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: (int8 weights, float32 scales along ``axis``); ``fp16_scales`` rounds the scales
    to fp16-exact values first (and quantises with those), for the fp16 TensorRT graph."""
    if not 0 <= axis < w.ndim:
        raise ValueError(f"axis {axis} out of range for a {w.ndim}-D weight")
    red = tuple(d for d in range(w.ndim) if d != axis)
    amax = np.abs(w).max(axis=red)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    if fp16_scales:
        scale = _fp16_exact(scale)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


# ----------------------------------------------------------------------------------------------------------------
# Graph rewrite


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_").replace(".", "_")


def insert_qdq(model: onnx.ModelProto, plan: Plan, qparams: dict[str, QParams]) -> onnx.ModelProto:
    """Rewrite ``model`` in place following ``plan``: one Q per activation tensor and one DQ per use (ORT fuses a
    DQ only into its single consumer), one DQ per weight use over shared int8 initializers, and for ``ort-cpu``
    int32 biases of Conv/Gemm (scale = activation scale x weight scale, zero point 0)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    pos = {id(n): k for k, n in enumerate(g.node)}
    new_inits: list[onnx.TensorProto] = []
    pre_q: dict[int, list[onnx.NodeProto]] = {}
    pre_dq: dict[int, list[onnx.NodeProto]] = {}
    fp16_scales = plan.target == "tensorrt"
    used_names: set[str] = set()

    def unique(base: str) -> str:
        name, k = base, 1
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        return name

    def scalar(value, dtype, name: str) -> str:
        new_inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    zp_np = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
    act_dq: list[tuple[onnx.NodeProto, int, str]] = []  # (node, input index, DQ output feeding it)
    for tensor, uses in plan.act_uses.items():
        qp = qparams[tensor]
        base = _safe(tensor)
        zn = scalar(qp.zero_point, zp_np[qp.dtype], unique(f"{base}_zp"))
        # Separate scale initializers for Q and each DQ, so a mixed fp16/fp32 graph can give each its own dtype.
        qn = unique(f"{base}_q")
        first = min(uses, key=lambda u: pos[id(u[0])])[0]
        pre_q.setdefault(id(first), []).append(helper.make_node(
            "QuantizeLinear", [tensor, scalar(qp.scale, np.float32, unique(f"{base}_scale")), zn], [qn],
            name=unique(f"{base}_QuantizeLinear")))
        for node, k in uses:
            dn = unique(f"{base}_dq")
            pre_dq.setdefault(id(node), []).append(helper.make_node(
                "DequantizeLinear", [qn, scalar(qp.scale, np.float32, unique(f"{base}_dq_scale")), zn], [dn],
                name=unique(f"{base}_DequantizeLinear")))
            act_dq.append((node, k, dn))
    w_cache: dict[tuple[str, int], tuple[str, np.ndarray, str]] = {}
    for t in plan.gemms:
        key = (t.weight, t.axis)
        if key not in w_cache:
            w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
            q, scale = quantize_weight(w, t.axis, fp16_scales)
            base = _safe(t.weight)
            qname, zname = unique(f"{base}_int8"), unique(f"{base}_w_zp")
            new_inits += [numpy_helper.from_array(q, qname),
                          numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zname)]
            w_cache[key] = (qname, scale, zname)
        qname, scale, zname = w_cache[key]
        base = _safe(t.weight)
        sname = unique(f"{base}_w_scale")
        new_inits.append(numpy_helper.from_array(scale, sname))
        dn = unique(f"{base}_w_dq")
        pre_dq.setdefault(id(t.node), []).append(helper.make_node(
            "DequantizeLinear", [qname, sname, zname], [dn], axis=t.axis, name=unique(f"{base}_w_DequantizeLinear")))
        t.node.input[1] = dn
        if plan.target == "ort-cpu" and t.node.op_type in ("Conv", "Gemm") and len(t.node.input) > 2:
            dq_bias = _int32_bias(t, inits, qparams[t.activation].scale, scale, new_inits, unique)
            if dq_bias is not None:
                pre_dq[id(t.node)].append(dq_bias)
                t.node.input[2] = dq_bias.output[0]
    for node, k, dn in act_dq:
        node.input[k] = dn
    nodes = []
    for n in g.node:
        nodes.extend(pre_q.get(id(n), []))
        nodes.extend(pre_dq.get(id(n), []))
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    # Drop float weights nobody reads any more.
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    del g.value_info[:]
    return model


def _int32_bias(t: Target, inits, act_scale: float, w_scale: np.ndarray, new_inits, unique):
    """DequantizeLinear(int32 bias) for a Conv/Gemm bias initializer, or None when it is not a per-channel constant
    (or would overflow int32): ORT's QLinearConv/QGemm fusion needs the bias in this form."""
    b = inits.get(t.node.input[2])
    if b is None or b.data_type != TensorProto.FLOAT:
        return None
    bias = numpy_helper.to_array(b).astype(np.float64)
    if bias.ndim != 1 or bias.shape[0] != w_scale.shape[0]:
        return None
    s = np.float64(act_scale) * w_scale.astype(np.float64)
    q = np.rint(bias / s)
    if np.abs(q).max(initial=0) >= 2**31 - 1:
        return None
    base = _safe(t.node.input[2])
    qn, sn, zn = unique(f"{base}_int32"), unique(f"{base}_b_scale"), unique(f"{base}_b_zp")
    new_inits += [numpy_helper.from_array(q.astype(np.int32), qn),
                  numpy_helper.from_array(s.astype(np.float32), sn),
                  numpy_helper.from_array(np.zeros(q.shape, dtype=np.int32), zn)]
    return helper.make_node("DequantizeLinear", [qn, sn, zn], [unique(f"{base}_b_dq")], axis=0,
                            name=unique(f"{base}_b_DequantizeLinear"))


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def quantize_int8(model: onnx.ModelProto, batches: Callable[[], Iterator[np.ndarray]], method: str = "entropy",
                  keep_fp: Iterable[str] = DEFAULT_KEEP_FP,
                  progress: Callable[[str], None] | None = None,
                  stats_cache: dict | None = None, target: str = DEFAULT_TARGET,
                  fp16_keep_ops: Iterable[str] | None = None,
                  fp16_keep_patterns: Iterable[str] | None = None,
                  fp16: bool | None = None, activation_type: str | None = None) -> tuple[onnx.ModelProto, dict]:
    """Calibrate ``model`` (fp32 ONNX) on ``batches`` and return the Q/DQ model for ``target`` plus a calibration
    table. For ``tensorrt`` the result is the fp16 graph (opset >= 19, fp32 islands per ``fp16_keep_*``, defaults of
    :mod:`.fp16`); ``fp16=False`` leaves it fp32 (int8 Q/DQ on the fp32 graph, close to the single layout before
    issue 12, kept for comparisons: ``python -m priorclip.export.int8_study``); ``activation_type="int8"`` likewise
    gives ``ort-cpu`` int8 activations (:func:`activation_qparams`).

    ``method`` and ``target`` are checked here, before any work (``ValueError``). The table's ``keep_fp_matched``
    (sorted list) holds the ``keep_fp`` patterns that kept something of this graph in float; a pattern missing from
    it in both towers' tables matches no layer (a typo), which only the caller, seeing both graphs, can report.

    ``stats_cache`` (a dict the caller keeps) lets several methods and layouts share calibration runs over the same
    graph and data: statistics are kept per tensor (with histograms), so a later call only collects the tensors no
    earlier call did, and only re-chooses the thresholds for the rest.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"unknown int8 target {target!r}; choose from {', '.join(TARGETS)}")
    keep_fp = tuple(keep_fp)
    plan = plan_quantization(model, keep_fp, target)
    tensors = plan.tensors
    if stats_cache is not None:
        key = (model.graph.name, len(model.graph.node), len(model.graph.initializer))
        cached = stats_cache.setdefault(key, {})
        missing = [t for t in tensors if t not in cached]
        if missing:
            cached.update(collect_stats(model, missing, batches, "entropy", progress, info=plan.info))
        stats = {t: cached[t] for t in tensors}
    else:
        stats = collect_stats(model, tensors, batches, method, progress, info=plan.info)
    amax = {t: choose_amax(stats[t], method) for t in tensors}
    qparams = {t: activation_qparams(stats[t], amax[t], target, activation_type) for t in tensors}
    table = {
        "method": method,
        "target": target,
        "percentile": PERCENTILE if method == "percentile" else None,
        "histogram_bins": HIST_BINS if method != "minmax" else None,
        "quantized_layers": len(plan.gemms),
        "quantized_activations": len(tensors),
        "integer_ops": plan.integer_ops,
        "kept_fp_layers": sorted(set(plan.kept)),
        "keep_fp": list(keep_fp),
        "keep_fp_matched": sorted(plan.keep_fp_matched),  # a list: the table is written as JSON
        "activation_type": "uint8 asymmetric per tensor" if target == "ort-cpu" and activation_type != "int8"
                           else "int8 symmetric per tensor (zero point 0)",
        "memory_budget_bytes": CALIB_MEMORY_BUDGET,
        "activations": {t: {"min": stats[t].amin, "max": stats[t].amax, "absmax": stats[t].absmax,
                            "amax": amax[t], "scale": qparams[t].scale, "zero_point": qparams[t].zero_point,
                            "dtype": "uint8" if qparams[t].dtype == TensorProto.UINT8 else "int8"}
                        for t in tensors},
    }
    model = insert_qdq(model, plan, qparams)
    if target == "tensorrt" and fp16 is not False:
        from . import fp16 as _fp16

        model, summary = _fp16.convert_fp16(
            model, _fp16.DEFAULT_KEEP_OPS if fp16_keep_ops is None else fp16_keep_ops,
            _fp16.DEFAULT_KEEP_PATTERNS if fp16_keep_patterns is None else fp16_keep_patterns)
        table["fp16"] = summary
    return model, table


# ----------------------------------------------------------------------------------------------------------------
# What ONNX Runtime makes of it


def ort_optimized_model(path_or_model, out_path, session_config: dict[str, str] | None = None) -> onnx.ModelProto:
    """Let ONNX Runtime (CPU, all optimisations) optimise a graph, save it to ``out_path`` (weights in a side file)
    and return it without its weights: the nodes that actually run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out_path)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                f"{os.path.basename(out_path)}.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    for k, v in (session_config or {}).items():
        so.add_session_config_entry(k, v)
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return onnx.load_model(str(out_path), load_external_data=False)


def ort_kernel_counts(path_or_model, session_config: dict[str, str] | None = None) -> dict:
    """Node counts of the graph ONNX Runtime's CPU provider runs after its optimisations: the integer kernels
    (:data:`INTEGER_OPS`), the float GEMMs left (:data:`FLOAT_GEMM_OPS`) and the Q/DQ nodes that stayed."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="priorclip-ort-opt-") as tmp:
        m = ort_optimized_model(path_or_model, Path(tmp) / "optimized.onnx", session_config)
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {
        "integer": {k: counts[k] for k in INTEGER_OPS if counts.get(k)},
        "float_gemm": {k: counts[k] for k in FLOAT_GEMM_OPS if counts.get(k)},
        "qdq_left": {k: counts[k] for k in ("QuantizeLinear", "DequantizeLinear") if counts.get(k)},
        "all": dict(sorted(counts.items())),
    }
