"""Small ONNX graph helpers shared by the FP16 converter and the INT8 quantiser.

Layer names: the dynamo exporter records, for every node, the module path it came from
(``pkg.torch.onnx.name_scopes``) and the Python stack (``pkg.torch.onnx.stack_trace``). :func:`node_scope` turns
them into the dotted module path of the reference model (``visual.transformer.resblocks.3.mlp.c_fc``,
``res_visual.attnpool.q_proj``); ops of the belief gate, a plain function inside ``visual``, are named
``visual.gate``. ``--keep-fp`` patterns (fnmatch) match these names, so they are the model's own, not ONNX's.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import onnx
from onnx import TensorProto

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


def node_scope(node: onnx.NodeProto) -> str:
    """Dotted module path of the reference model that produced ``node`` ("" when unknown)."""
    md = {p.key: p.value for p in node.metadata_props}
    scopes = md.get("pkg.torch.onnx.name_scopes")
    path = ""
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            parts = []
        mods = [p for p in parts if isinstance(p, str) and p.startswith("model.")]
        if mods:
            path = mods[-1].removeprefix("model.")
    if "belief_gate" in md.get("pkg.torch.onnx.stack_trace", ""):
        path = f"{path}.gate" if path else "gate"
    return path


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save with weights in one side file ``<name>.data`` (keeps every graph, fp32 full included, under 2 GB/proto)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        os.unlink(data)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    return path


def load_model(path: str | Path) -> onnx.ModelProto:
    return onnx.load_model(str(path), load_external_data=True)


def check_model(path: str | Path) -> None:
    """``onnx.checker`` with the full check (shape inference included), on the path so external data is found."""
    onnx.checker.check_model(str(path), full_check=True)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name in the graph (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))
