"""INT8 with explicit Q/DQ nodes from our own calibration (min-max, percentile, entropy).

What is quantised: every Conv, MatMul and Gemm whose weight is a constant (the "GEMM-like" layers; attention's
activation-activation MatMuls, softmax and the gate stay in float).

* Weights: symmetric int8, **per output channel** (Conv axis 0; MatMul ``[K,N]`` axis 1; Gemm axis 0 with
  ``transB=1``), stored as int8 initializers followed by ``DequantizeLinear``.
* Activations (the layer inputs): symmetric int8, **per tensor**, zero point 0, ``QuantizeLinear`` ->
  ``DequantizeLinear``. Symmetric with zero point 0 is what TensorRT's explicit quantisation accepts, so the same
  graph runs in ONNX Runtime and TensorRT; the methods differ only in the clipping threshold ``amax``
  (scale = amax / 127):

  - ``minmax``: the largest |x| seen over the calibration set;
  - ``percentile``: the 99.99th percentile of |x| (2048-bin histogram);
  - ``entropy``: TensorRT's KL-divergence threshold over the same histogram (128 quantised bins, thresholds from
    bin 128 to 2048, the last minimum wins), as in TensorRT's legacy entropy calibrator and pytorch-quantization.

Calibration runs the fp32 ONNX graph in ONNX Runtime with the layer inputs added as outputs: one pass for min/max,
a second one for the histograms (percentile and entropy only).

``keep_fp`` names layers that stay unquantised: fnmatch patterns over the model's module paths (see
:func:`~.graph.node_scope`; a plain path also covers everything under it) or over weight names (``visual.proj``,
``text_projection``, the bare parameters that are not in a submodule); :data:`DEFAULT_KEEP_FP` records the
measurement behind the default (with random weights recall is chance, so cosine and top-10 agreement decided).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import node_scope

METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.99
HIST_BINS = 2048
# Layers left in float by default: the ViT patch embed. NOTE (benchmarks/results/export-int8-keepfp-cpu-2026-11-23.md:
# random-init ViT-B/32, seed 0, entropy calibration on 128 train images / 512 captions, aid-rsicd test 64 images /
# 320 captions, ORT CPU): quantising every GEMM-like layer gave image cosine mean 0.99771 and top-10 i2t agreement
# 0.897; keeping the patch embed (``visual.conv1``, a 3072-long dot product over raw pixels, ~1 % of the image FLOPs)
# in float raised them to 0.99909 and 0.925 (an earlier, unseeded run agreed: 0.99868 -> 0.99924). Keeping the
# prior's first conv or attention pool moved the mean by < 0.0003; keeping the whole prior (``--keep-fp 'res_visual*'
# --keep-fp vision_proj_res``, about half the image FLOPs) gave mean 0.99811 and the best minimum, 0.99134. Otherwise
# the minimum (~0.986) is set by a few images whose belief ranks flip. With random weights recall is chance, so
# cosine and top-10 agreement decided;
# re-run ``python -m priorclip.export.report --study keep-fp`` with a trained checkpoint.
DEFAULT_KEEP_FP: tuple[str, ...] = ("visual.conv1",)


@dataclass
class Target:
    node: onnx.NodeProto
    scope: str
    activation: str
    weight: str
    axis: int


@dataclass
class TensorStats:
    amin: float = float("inf")
    amax: float = float("-inf")
    absmax: float = 0.0
    hist: np.ndarray | None = None
    count: int = 0
    extra: dict = field(default_factory=dict)


def _matches(scope: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(scope, p) or scope == p or scope.startswith(p + ".") for p in patterns)


def find_targets(model: onnx.ModelProto, keep_fp: Iterable[str] = ()) -> tuple[list[Target], list[str]]:
    """Layers to quantise and the scopes of the ones ``keep_fp`` leaves in float."""
    inits = {i.name: i for i in model.graph.initializer}
    targets, kept = [], []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        if w.data_type != TensorProto.FLOAT:
            continue
        scope = node_scope(n)
        wname = n.input[1].removeprefix("model.")
        if _matches(scope, keep_fp) or _matches(wname, keep_fp):
            kept.append(scope)
            continue
        if n.op_type == "Conv":
            axis = 0
        elif n.op_type == "MatMul":
            if len(w.dims) != 2:
                continue
            axis = 1
        else:
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        targets.append(Target(n, scope, n.input[0], n.input[1], axis))
    return targets, kept


def _session(model: onnx.ModelProto, extra_outputs: list[str]):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in extra_outputs:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def collect_stats(model: onnx.ModelProto, tensors: list[str], batches: Callable[[], Iterator[np.ndarray]],
                  method: str, progress: Callable[[str], None] | None = None) -> dict[str, TensorStats]:
    """Run the fp32 graph over the calibration batches and gather min/max (and |x| histograms when needed)."""
    sess = _session(model, tensors)
    in_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    stats = {t: TensorStats() for t in tensors}
    for batch in batches():
        outs = dict(zip(names, sess.run(None, {in_name: batch})))
        for t in tensors:
            a = outs[t]
            s = stats[t]
            s.amin = min(s.amin, float(a.min()))
            s.amax = max(s.amax, float(a.max()))
            s.absmax = max(s.absmax, float(np.abs(a).max()))
            s.count += a.size
    if progress:
        progress("min/max pass done")
    if method in ("percentile", "entropy"):
        for t in tensors:
            stats[t].hist = np.zeros(HIST_BINS, dtype=np.float64)
        for batch in batches():
            outs = dict(zip(names, sess.run(None, {in_name: batch})))
            for t in tensors:
                s = stats[t]
                top = s.absmax if s.absmax > 0 else 1.0
                h, _ = np.histogram(np.abs(outs[t]), bins=HIST_BINS, range=(0.0, top))
                s.hist += h
        if progress:
            progress("histogram pass done")
    return stats


def percentile_amax(hist: np.ndarray, top: float, pct: float = PERCENTILE) -> float:
    cdf = np.cumsum(hist) / max(hist.sum(), 1.0)
    idx = int(np.searchsorted(cdf, pct / 100.0))
    return float(min(idx + 1, len(hist)) * top / len(hist))


def entropy_amax(hist: np.ndarray, top: float, num_quant_bins: int = 128, start: int = 128, stride: int = 1) -> float:
    """TensorRT-style KL threshold: the clip bin i minimising KL(P_i || Q_i), Q_i = P_i squeezed to 128 bins."""
    bins = np.asarray(hist, dtype=np.float64).copy()
    if len(bins) < 2 or bins.sum() == 0:
        return float(top)
    bins[0] = bins[1]  # the zero bin (ReLU outputs, padding) would dominate the distribution
    edges = np.linspace(0.0, top, len(bins) + 1)
    best_i, best_kl = len(bins), np.inf
    suffix = np.concatenate([np.cumsum(bins[::-1])[::-1], [0.0]])  # suffix[i] = sum(bins[i:])
    for i in range(start, len(bins) + 1, stride):
        ref = bins[:i].copy()
        ref[-1] += suffix[i]  # outliers clipped into the last bin
        group = (np.arange(i) * num_quant_bins) // i  # which of the 128 quantised bins each fine bin falls in
        nz = bins[:i] != 0
        sums = np.bincount(group, weights=bins[:i], minlength=num_quant_bins)
        cnts = np.bincount(group, weights=nz.astype(np.float64), minlength=num_quant_bins)
        q = np.where(nz, sums[group] / np.maximum(cnts[group], 1), 0.0)
        p_sum, q_sum = ref.sum(), q.sum()
        if q_sum == 0 or p_sum == 0:
            continue
        p, qn = ref / p_sum, q / q_sum
        mask = p > 0
        if np.any(qn[mask] == 0):
            kl = np.inf
        else:
            kl = float(np.sum(p[mask] * np.log(p[mask] / qn[mask])))
        if kl <= best_kl:  # "<=": the last minimum wins, as TensorRT's calibrator picks it
            best_kl, best_i = kl, i
    return float(edges[best_i])


def choose_amax(s: TensorStats, method: str) -> float:
    if method == "minmax" or s.hist is None:
        amax = s.absmax
    elif method == "percentile":
        amax = percentile_amax(s.hist, s.absmax)
    elif method == "entropy":
        amax = entropy_amax(s.hist, s.absmax)
    else:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    return max(float(amax), 1e-8)


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: (int8 weights, float32 scales along ``axis``)."""
    red = tuple(d for d in range(w.ndim) if d != axis)
    amax = np.abs(w).max(axis=red)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def insert_qdq(model: onnx.ModelProto, targets: list[Target], amax: dict[str, float]) -> onnx.ModelProto:
    """Rewrite ``model`` in place: DQ on int8 weights, Q->DQ on the calibrated activations."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_inits: list[onnx.TensorProto] = []
    pre: dict[int, list[onnx.NodeProto]] = {}  # nodes to insert before the node with this id
    act_dq: dict[str, str] = {}
    w_dq: dict[str, str] = {}
    for t in targets:
        if t.activation not in act_dq:
            s = np.float32(amax[t.activation] / 127.0)
            base = t.activation.replace("/", "_").replace(":", "_")
            sn, zn, qn, dn = f"{base}_act_scale", f"{base}_act_zp", f"{base}_q", f"{base}_dq"
            new_inits += [numpy_helper.from_array(np.array(s, dtype=np.float32), sn),
                          numpy_helper.from_array(np.array(0, dtype=np.int8), zn)]
            pre.setdefault(id(t.node), []).extend([
                helper.make_node("QuantizeLinear", [t.activation, sn, zn], [qn], name=f"{base}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [qn, sn, zn], [dn], name=f"{base}_DequantizeLinear"),
            ])
            act_dq[t.activation] = dn
        t.node.input[0] = act_dq[t.activation]
        if t.weight not in w_dq:
            w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
            q, scale = quantize_weight(w, t.axis)
            base = t.weight.replace("/", "_").replace(":", "_")
            qn, sn, zn, dn = f"{base}_int8", f"{base}_w_scale", f"{base}_w_zp", f"{base}_w_dq"
            new_inits += [numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn),
                          numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zn)]
            pre.setdefault(id(t.node), []).append(
                helper.make_node("DequantizeLinear", [qn, sn, zn], [dn], axis=t.axis,
                                 name=f"{base}_w_DequantizeLinear"))
            w_dq[t.weight] = dn
        t.node.input[1] = w_dq[t.weight]
    nodes = []
    for n in g.node:
        nodes.extend(pre.get(id(n), []))
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


def quantize_int8(model: onnx.ModelProto, batches: Callable[[], Iterator[np.ndarray]], method: str = "entropy",
                  keep_fp: Iterable[str] = DEFAULT_KEEP_FP,
                  progress: Callable[[str], None] | None = None,
                  stats_cache: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """Calibrate ``model`` (fp32 ONNX) on ``batches`` and return the Q/DQ model plus a calibration table.

    ``stats_cache`` (a dict the caller keeps) lets several methods share one calibration run over the same graph
    and data: the first call collects min/max and histograms, later ones only re-choose the thresholds.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    keep_fp = tuple(keep_fp)
    targets, kept = find_targets(model, keep_fp)
    tensors = sorted({t.activation for t in targets})
    key = (model.graph.name, len(model.graph.node), tuple(tensors))
    if stats_cache is not None and key in stats_cache:
        stats = stats_cache[key]
    else:
        stats = collect_stats(model, tensors, batches, "entropy" if stats_cache is not None else method, progress)
        if stats_cache is not None:
            stats_cache[key] = stats
    amax = {t: choose_amax(stats[t], method) for t in tensors}
    table = {
        "method": method,
        "percentile": PERCENTILE if method == "percentile" else None,
        "histogram_bins": HIST_BINS if method != "minmax" else None,
        "quantized_layers": len(targets),
        "kept_fp_layers": sorted(set(kept)),
        "keep_fp": list(keep_fp),
        "activations": {t: {"min": stats[t].amin, "max": stats[t].amax, "absmax": stats[t].absmax,
                            "amax": amax[t], "scale": amax[t] / 127.0} for t in tensors},
    }
    return insert_qdq(model, targets, amax), table
