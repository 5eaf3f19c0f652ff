"""FP16 and INT8 graphs: structure (fp32 islands, Q/DQ nodes, per-channel weights) and closeness to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from priorclip.encoder import TorchEncoder
from priorclip.export import open_engine
from priorclip.export.graph import op_counts
from priorclip.export.amax import entropy_amax, percentile_amax
from priorclip.export.quantize import quantize_weight

from .conftest import tokens_for


def _load(res, tower):
    return onnx.load(str(res.out_dir / f"{tower}_encoder.onnx"))


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def test_fp16_graph_keeps_norms_in_fp32_and_io_in_fp32(tiny_exports):
    g = _load(tiny_exports["fp16"], "image")
    inits = {i.name: i.data_type for i in g.graph.initializer}
    assert TensorProto.FLOAT16 in inits.values()
    for n in g.graph.node:
        if n.op_type == "LayerNormalization":
            assert all(inits.get(i, TensorProto.FLOAT) == TensorProto.FLOAT for i in n.input[1:])
    assert g.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert g.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert tiny_exports["fp16"].manifest["onnx"]["fp16"]["image"]["fp16_nodes"] > 50


@pytest.mark.parametrize("batch", [1, 7])
def test_fp16_and_int8_run_close_to_reference(tiny_model, tiny_exports, batch):
    ref = TorchEncoder(tiny_model)
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(10 + batch))
    tok = tokens_for([6 + 2 * i for i in range(batch)], seed=batch)
    r_img, r_txt = ref.encode_images(x), ref.encode_texts(tok)
    for prec, floor in (("fp16", 0.995), ("int8", 0.95)):
        eng = open_engine(tiny_exports[prec].out_dir)
        assert eng.precision == prec
        assert _cos(eng.encode_images(x), r_img).min() > floor, prec
        assert _cos(eng.encode_texts(tok), r_txt).min() > floor, prec


def test_int8_graph_has_qdq_with_per_channel_weights(tiny_exports):
    res = tiny_exports["int8"]
    for tower in ("image", "text"):
        g = _load(res, tower)
        ops = op_counts(g)
        assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > ops["QuantizeLinear"]
        inits = {i.name: i for i in g.graph.initializer}
        per_channel = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                       and inits[n.input[0]].data_type == TensorProto.INT8 and len(inits[n.input[1]].dims) == 1]
        assert per_channel
        # Activation quantisers (the default --format onnx layout, ort-cpu): per-tensor scalar scale, uint8 zero
        # point in range; tests/export/test_int8_layouts.py checks both layouts in depth.
        for n in g.graph.node:
            if n.op_type == "QuantizeLinear":
                assert list(inits[n.input[1]].dims) == []
                assert inits[n.input[2]].data_type == TensorProto.UINT8
    cal = res.manifest["calibration"]
    assert cal["method"] == "minmax" and cal["images"] == 16 and cal["captions"] == 80
    assert cal["target"] == "ort-cpu" and cal["layers"]["image"]["target"] == "ort-cpu"
    assert (res.out_dir / "calibration.json").is_file()


def test_calibration_methods_order_thresholds():
    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.standard_normal(200_000), [40.0]]))  # a gaussian plus one outlier
    hist, _ = np.histogram(x, bins=2048, range=(0, x.max()))
    p = percentile_amax(hist, x.max())
    e = entropy_amax(hist, x.max())
    assert 3.0 < p < 5.0  # 99.99th percentile of |N(0,1)| is ~3.9
    assert 1.5 < e < x.max() / 2  # KL clips the outlier
    q, s = quantize_weight(rng.standard_normal((8, 5)).astype(np.float32), axis=1)
    assert q.dtype == np.int8 and s.shape == (5,) and np.abs(q).max() == 127


def test_keep_fp_leaves_layers_unquantised(tiny_model, synthetic_set, tmp_path):
    from priorclip.export import export_model

    res = export_model(tiny_model, tmp_path, "onnx", "int8", calib=synthetic_set.subset(4), calib_method="minmax",
                       progress=False, keep_fp=("res_visual*", "visual.proj"))
    layers = res.manifest["calibration"]["layers"]["image"]
    assert "res_visual.attnpool.q_proj" in layers["kept_fp_layers"] and "visual" in layers["kept_fp_layers"]
    g = _load(res, "image")
    assert any(i.name == "model.visual.proj" and i.data_type == TensorProto.FLOAT for i in g.graph.initializer)
