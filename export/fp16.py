"""FP16 ONNX graphs: weights and activations in float16, chosen ops kept in float32 (our converter, no onnxconverter).

Every node gets a precision. Ops in ``keep_ops`` and nodes whose module path (:func:`~.graph.node_scope`) matches a
``keep_patterns`` entry run in float32; all other float ops run in float16. Casts are inserted only where a tensor
crosses between the two. Graph inputs and outputs stay float32, so an fp16 engine is a drop-in for the fp32 one;
integer tensors and outputs (token ids, the ``belief_order`` output) are left exactly as exported.

A Q/DQ graph (the int8 ``tensorrt`` layout of :mod:`.quantize`) converts too: each ``DequantizeLinear`` takes the
precision of the ops it feeds and each ``QuantizeLinear`` that of its DQs, with fp16 scales, and the opset is raised
to :data:`QDQ_FP16_OPSET`; the int8 GEMMs then read int8 -> fp16 and everything else is fp16 but the fp32 islands.

Which ops stay in fp32 was decided by measurement (``benchmarks/results/export-fp16-blocklist-*.md``, written by
``python -m priorclip.export.report --study fp16``): see :data:`DEFAULT_KEEP_OPS` and :data:`DEFAULT_KEEP_PATTERNS`.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import consumers, elem_types, node_scope

# NOTE (measurement, benchmarks/results/export-fp16-blocklist-cpu-2026-11-23.md: random-init ViT-B/32, seed 0,
# aid-rsicd test 64 images / 320 captions, ORT CPU). Image cosine mean: all-fp16 0.999944, LN+Softmax+Reduce* kept
# 0.999919-0.999938, + prior path 0.999981; top-10 i2t agreement 0.953 (all fp16) -> 0.980 (norms, softmax and
# gate kept). The per-item *minimum* (0.9971 for most variants) is one image whose belief ranks flip: with random
# weights the 50 beliefs are ~1/50 apart by ~1e-6, so any fp16 rounding of the gate's inputs reorders some ranks;
# eager torch ``model.half()`` gives the same 0.9971 on that image. Keeping the whole prior in fp32 happened to
# avoid it on this set (0.99962) but prior + stem did not (0.99767), so it is luck, not a fix, and costs about half
# the image FLOPs; it stays an option (``--fp16-keep res_visual``). Re-measure with a trained checkpoint.
# Kept in fp32: row statistics (LayerNorm mean/variance, softmax normaliser, the L2 norms), which are cheap and
# raised top-10 agreement, and the belief gate (0.1 % of the image FLOPs; exact comparisons of softmax values).
DEFAULT_KEEP_OPS = ("LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "ReduceSum")
DEFAULT_KEEP_PATTERNS = ("visual.gate",)
# PIR: the same ops (LayerNormalization kept whole also keeps BERT's eps 1e-12, below fp16's smallest subnormal: spec
# §9.5), plus VIR's belief: V @ c, its softmax, the rank count and the kept-token gather are PIR's own top-level ops,
# whose module path is "" (the pattern "" matches those alone, a few hundred FLOPs per token).
# NOTE (measurement, 2026-12-01: pir-tiny random init, torch seed 0, 32 generated images / 160 captions, ORT CPU):
# every variant passes fp16 (image cosine min 0.999999, text 1.000000); the ops alone leave 28/32 images with a
# changed belief order, the belief kept in fp32 18/32 (top-10 i2t agreement 0.997 -> 1.000), adding vision_proj and
# conv_proj (its inputs) 17/32, and only Swin and the prior in fp32 too reach 0/32. Only the set of the 40 kept
# tokens changes an embedding (VIR's attention is order-free), which is why the flips cost no cosine here.
# Re-measure with a trained checkpoint.
PIR_KEEP_PATTERNS = ("",)


def default_keeps(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keep_ops, keep_patterns) kept in fp32 by default for a model family (``cfg.family``)."""
    from priorclip.config import FAMILY_PIR

    return DEFAULT_KEEP_OPS, (PIR_KEEP_PATTERNS if family == FAMILY_PIR else DEFAULT_KEEP_PATTERNS)
# Ops whose output type is fixed by an attribute or by integer inputs: left exactly as exported.
_FIXED = {"Cast", "CastLike", "Constant", "ConstantOfShape", "Shape", "Size", "Range", "ArgMax", "ArgMin",
          "NonZero", "EyeLike"}
_QDQ = ("QuantizeLinear", "DequantizeLinear")
# Opset of an fp16 graph with Q/DQ: QuantizeLinear-19 / DequantizeLinear-19 are the first with fp16 inputs and scales
# (an older opset would need a Cast around every Q/DQ, which TensorRT's strongly typed mode cannot fuse into the GEMM).
QDQ_FP16_OPSET = 19


def _to_fp16(a: np.ndarray) -> np.ndarray:
    """Round to fp16; finite values beyond its range (e.g. the causal mask's float32 min) saturate to +-65504."""
    return np.clip(a, -65504.0, 65504.0).astype(np.float16)


def _matches(scope: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(scope, p) or scope == p or scope.startswith(p + ".") for p in patterns)


def convert_fp16(model: onnx.ModelProto, keep_ops: Iterable[str] = DEFAULT_KEEP_OPS,
                 keep_patterns: Iterable[str] = DEFAULT_KEEP_PATTERNS) -> tuple[onnx.ModelProto, dict]:
    """Return the fp16 model and a summary (counts of fp16/fp32 nodes, casts inserted, what was kept)."""
    keep_ops, keep_patterns = tuple(keep_ops), tuple(keep_patterns)
    types = elem_types(model)
    g = model.graph
    users = consumers(g)
    outputs = {o.name for o in g.output}
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16

    mode: dict[int, int | None] = {}  # id(node) -> FLOAT / FLOAT16 / None (fixed)
    for n in g.node:
        if n.op_type in _FIXED:
            mode[id(n)] = None
        elif n.op_type in _QDQ:
            continue  # decided below, from the ops they feed
        elif n.op_type in keep_ops or _matches(node_scope(n), keep_patterns):
            mode[id(n)] = F32
        else:
            mode[id(n)] = F16
    # Q/DQ take the precision of what they feed: a DQ is fp16 (its scale fp16, opset >= 19) when every consumer
    # computes in fp16, so TensorRT sees int8 -> fp16 GEMM inputs; a Q follows its DQs. Their int8/int32 tensors
    # and zero points are left alone.
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            cons = users.get(n.output[0], [])
            mode[id(n)] = F16 if cons and n.output[0] not in outputs and all(
                mode.get(id(c)) == F16 for c in cons) else F32
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            cons = users.get(n.output[0], [])
            mode[id(n)] = F16 if cons and all(mode.get(id(c)) == F16 for c in cons) else F32

    def wants_fp32(name: str) -> bool:
        return name in outputs or any(mode[id(c)] in (F32, None) for c in users.get(name, []))

    # Casts to float: produce fp16 directly unless someone downstream computes in fp32.
    for n in g.node:
        if n.op_type == "Cast":
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == F32 and not wants_fp32(n.output[0]):
                to.i = F16
                mode[id(n)] = F16

    dtype: dict[str, int] = {}  # current element type of every float tensor
    for vi in g.input:
        dtype[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        if init.data_type == F32:
            cons = users.get(init.name, [])
            if cons and all(mode[id(c)] == F16 for c in cons):
                arr = _to_fp16(numpy_helper.to_array(init))
                init.CopyFrom(numpy_helper.from_array(arr, init.name))
        dtype[init.name] = init.data_type
    for n in g.node:
        if n.op_type == "Constant" and types.get(n.output[0]) == F32 and not wants_fp32(n.output[0]):
            for a in n.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(a.t))))
            mode[id(n)] = F16

    new_nodes: list[onnx.NodeProto] = []
    cast_cache: dict[tuple[str, int], str] = {}
    n_casts = 0
    for n in g.node:
        m = mode[id(n)]
        if m is not None and n.op_type not in ("Cast", "Constant"):
            for k, name in enumerate(n.input):
                if not name or types.get(name) not in (F32, F16):
                    continue
                cur = dtype.get(name, types[name])
                if cur == m:
                    continue
                key = (name, m)
                if key not in cast_cache:
                    cast_name = f"{name}__to_{'fp16' if m == F16 else 'fp32'}"
                    new_nodes.append(helper.make_node("Cast", [name], [cast_name], to=m, name=f"{cast_name}_cast"))
                    cast_cache[key] = cast_name
                    n_casts += 1
                n.input[k] = cast_cache[key]
        new_nodes.append(n)
        for o in n.output:
            if types.get(o) in (F32, F16):
                dtype[o] = m if (m is not None and n.op_type != "Cast") else (
                    next(a.i for a in n.attribute if a.name == "to") if n.op_type == "Cast" else
                    (F16 if mode[id(n)] == F16 else types[o]))

    # Graph outputs stay float32.
    for out in g.output:
        if dtype.get(out.name) == F16:
            inner = f"{out.name}__fp16"
            for n in new_nodes:
                for k, o in enumerate(n.output):
                    if o == out.name:
                        n.output[k] = inner
                for k, i in enumerate(n.input):
                    if i == out.name:
                        n.input[k] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=F32, name=f"{out.name}_to_fp32"))
            n_casts += 1

    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale types; re-inferred by the checker and the runtimes
    n_qdq16 = sum(1 for n in new_nodes if n.op_type in _QDQ and mode.get(id(n)) == F16)
    if n_qdq16:  # fp16 x / scales in QuantizeLinear / DequantizeLinear exist from opset 19 on
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx") and imp.version < QDQ_FP16_OPSET:
                imp.version = QDQ_FP16_OPSET
    n16 = sum(1 for n in new_nodes if mode.get(id(n)) == F16)
    n32 = sum(1 for n in new_nodes if mode.get(id(n)) == F32)
    summary = {"fp16_nodes": n16, "fp32_nodes": n32, "casts_inserted": n_casts, "keep_ops": list(keep_ops),
               "keep_patterns": list(keep_patterns)}
    if any(n.op_type in _QDQ for n in new_nodes):
        summary["qdq_fp16_nodes"] = n_qdq16
    return model, summary
