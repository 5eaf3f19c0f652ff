"""The two INT8 Q/DQ layouts (ort-cpu, tensorrt): structure, what ONNX Runtime builds from them, streaming
calibration, and int64 outputs left alone. Numbers are re-derived here from the written graphs, ONNX Runtime and
numpy, not read back from the quantiser's own tables."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from priorclip.encoder import TorchEncoder
from priorclip.export import ExportError, export_model, open_engine
from priorclip.export import quantize as q
from priorclip.export.graph import node_scope

from .conftest import tokens_for

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _graph(res, tower="image"):
    return onnx.load(str(res.out_dir / f"{tower}_encoder.onnx"))


def _inits(g):
    return {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}


def _producers(g):
    return {o: n for n in g.graph.node for o in n.output}


def _types(g):
    inf = onnx.shape_inference.infer_shapes(g)
    t = {vi.name: vi.type.tensor_type.elem_type for vi in list(inf.graph.value_info) + list(inf.graph.input)
         + list(inf.graph.output)}
    t.update({i.name: i.data_type for i in g.graph.initializer})
    return t


@pytest.fixture(scope="module")
def trt_export(tiny_model, synthetic_set, tmp_path_factory):
    return export_model(tiny_model, tmp_path_factory.mktemp("trt-int8"), "onnx", "int8",
                        calib=synthetic_set.subset(6), calib_method="minmax", progress=False,
                        int8_target="tensorrt")


# ---------------------------------------------------------------------------------------------------------------
# ort-cpu


def test_ort_cpu_layout_is_what_onnxruntime_fuses(tiny_exports):
    """Every quantised conv of the prior becomes a QLinearConv (the earlier layout left all of them float)."""
    res = tiny_exports["int8"]
    assert res.manifest["calibration"]["target"] == "ort-cpu"
    g = _graph(res)
    assert {n.domain for n in g.graph.node} <= {"", "ai.onnx"}  # standard ONNX: ORT makes the QLinear* ops itself
    fp32 = _graph(tiny_exports["fp32"])
    convs = [n for n in fp32.graph.node if n.op_type == "Conv"]
    kept = [n for n in convs if q._matching(node_scope(n), q.DEFAULT_KEEP_FP)]
    assert kept and len(convs) > len(kept)
    k = q.ort_kernel_counts(res.out_dir / "image_encoder.onnx")
    assert k["integer"].get("QLinearConv") == len(convs) - len(kept)
    assert k["float_gemm"].get("Conv", 0) + k["float_gemm"].get("FusedConv", 0) == len(kept)
    assert k["integer"].get("QLinearAdd", 0) >= 1 and k["integer"].get("QLinearAveragePool", 0) >= 1
    assert k["integer"].get("MatMulIntegerToFloat", 0) >= 8  # the ViT's weight GEMMs
    t = q.ort_kernel_counts(res.out_dir / "text_encoder.onnx")
    weight_matmuls = [n for n in _graph(tiny_exports["fp32"], "text").graph.node
                      if n.op_type in ("MatMul", "Gemm") and n.input[1] in _inits(_graph(tiny_exports["fp32"], "text"))]
    assert t["integer"].get("MatMulIntegerToFloat", 0) + t["integer"].get("QGemm", 0) == len(weight_matmuls)


def test_every_default_keep_fp_pattern_names_nodes_of_the_graph(tiny_exports):
    """The defaults are matched against the exported nodes' module scopes: a model change that moved a module's ops
    out of its scope (calling it functionally) would silently quantise what they keep float."""
    scopes = {node_scope(n) for n in _graph(tiny_exports["fp32"]).graph.node}
    for pattern in q.DEFAULT_KEEP_FP:
        assert any(q._matching(scope, (pattern,)) for scope in scopes), pattern


def test_ort_cpu_qdq_groups_and_int32_bias(tiny_exports):
    g = _graph(tiny_exports["int8"])
    inits, prod = _inits(g), _producers(g)
    users: dict[str, list] = {}
    for n in g.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for n in g.graph.node:
        if n.op_type == "DequantizeLinear":  # ORT fuses a DQ only into a single consumer
            assert len(users.get(n.output[0], [])) == 1, n.name
        if n.op_type == "QuantizeLinear":  # activations: per-tensor uint8 (x86 ORT refuses int8 activations)
            assert inits[n.input[1]].shape == () and inits[n.input[2]].dtype == np.uint8
    convs = [n for n in g.graph.node if n.op_type == "Conv" and n.input[0] in prod
             and prod[n.input[0]].op_type == "DequantizeLinear"]
    assert convs
    for c in convs:
        dqs = [prod[i] for i in c.input if i]  # x, w and (a BN shift folded in at export) the bias
        assert {d.op_type for d in dqs} == {"DequantizeLinear"}
        w, s_w = inits[dqs[1].input[0]], inits[dqs[1].input[1]]
        assert w.dtype == np.int8 and s_w.shape == (w.shape[0],) and np.abs(w).max() <= 127
        if len(dqs) == 3:  # random-init BN folds to no bias; the handmade graph below covers a real one
            b, s_b, zp_b = (inits[i] for i in dqs[2].input)
            assert b.dtype == np.int32 and not zp_b.any()
            np.testing.assert_allclose(s_b, inits[dqs[0].input[1]] * s_w, rtol=1e-6)  # bias scale = s_x * s_w
        # its output goes to exactly one Q (directly, or through a ReLU the Q's zero point makes redundant)
        nxt = users[c.output[0]]
        if len(nxt) == 1 and nxt[0].op_type == "Relu":
            out_q = users[nxt[0].output[0]]
            assert len(out_q) == 1 and out_q[0].op_type == "QuantizeLinear"
            assert inits[out_q[0].input[2]] == 0  # ReLU output: zero point 0
        elif nxt[0].op_type == "QuantizeLinear":
            assert len(nxt) == 1
        else:
            pytest.fail(f"{c.name}: output goes to {[n.op_type for n in nxt]}, not to one Q (or Relu -> Q)")


def test_ort_cpu_int32_bias_reproduces_the_float_bias():
    m = _graph_with_int64_output()
    data = np.random.default_rng(5).standard_normal((4, 3, 4, 4)).astype(np.float32)
    bias, w = _inits(m)["b"], _inits(m)["w"]
    qm, _ = q.quantize_int8(m, lambda: iter([data]), "minmax", (), target="ort-cpu")  # rewrites m in place
    inits, prod = _inits(qm), _producers(qm)
    convs = [n for n in qm.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for c in convs:
        b_q, s_b, _ = (inits[i] for i in prod[c.input[2]].input)
        s_x = inits[prod[c.input[0]].input[1]]  # the activation DQ's own scale
        s_w = np.abs(w).max(axis=(1, 2, 3)) / 127  # numpy re-derivation of the per-channel weight scale
        np.testing.assert_allclose(s_b, s_x * s_w, rtol=1e-5)
        np.testing.assert_allclose(b_q * s_b, bias, atol=float(s_b.max()) / 2 + 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# tensorrt


def test_tensorrt_layout_is_int8_on_an_fp16_graph(trt_export):
    res = trt_export
    assert res.manifest["calibration"]["target"] == "tensorrt" and res.manifest["opset"] >= 19
    for tower in ("image", "text"):
        g = _graph(res, tower)
        assert max(i.version for i in g.opset_import if i.domain in ("", "ai.onnx")) >= 19
        assert {n.domain for n in g.graph.node} <= {"", "ai.onnx"}
        inits, prod, types = _inits(g), _producers(g), _types(g)
        for n in g.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in inits:
                # activations: symmetric int8, zero point 0, scalar scale (TensorRT's explicit quantisation)
                zp = inits[n.input[2]]
                assert zp.dtype == np.int8 and zp.item() == 0 and inits[n.input[1]].shape == ()
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                assert inits[n.input[0]].dtype == np.int8 and not inits[n.input[2]].any()
        gemms = [n for n in g.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
        quantised = [n for n in gemms if n.input[1] in prod and prod[n.input[1]].op_type == "DequantizeLinear"]
        assert quantised
        for n in quantised:  # int8 -> fp16 into every quantised GEMM: DQ scales fp16
            assert types[n.input[0]] == F16 and types[n.input[1]] == F16, n.name
            assert prod[n.input[0]].op_type == "DequantizeLinear"
            for dq in (prod[n.input[0]], prod[n.input[1]]):
                assert inits[dq.input[1]].dtype == np.float16
        # no fp32 GEMM outside the fp32 islands (the gate's logits, a float MatMul by design)
        for n in gemms:
            if node_scope(n).endswith("gate"):
                assert types[n.input[0]] == F32
            else:
                assert types[n.input[0]] == F16, (n.name, node_scope(n))
        # fp32 islands kept: norms, softmax
        for n in g.graph.node:
            if n.op_type in ("LayerNormalization", "Softmax"):
                assert types[n.input[0]] == F32 and types[n.output[0]] == F32, n.name
        assert g.graph.input[0].type.tensor_type.elem_type in (F32, TensorProto.INT64)
        assert g.graph.output[0].type.tensor_type.elem_type == F32
    out = {o.name: o.type.tensor_type.elem_type for o in _graph(res).graph.output}
    assert out == {"embeddings": F32, "belief_order": TensorProto.INT64}


@pytest.mark.parametrize("batch", [1, 5])
def test_tensorrt_layout_runs_in_onnxruntime_close_to_reference(tiny_model, trt_export, batch):
    ref = TorchEncoder(tiny_model)
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(20 + batch))
    tok = tokens_for([5 + 3 * i for i in range(batch)], seed=batch)
    eng = open_engine(trt_export.out_dir)
    cos = torch.nn.functional.cosine_similarity
    assert cos(eng.encode_images(x).double(), ref.encode_images(x).double()).min() > 0.99
    assert cos(eng.encode_texts(tok).double(), ref.encode_texts(tok).double()).min() > 0.99


def test_int8_target_option_checks(tiny_model, synthetic_set, tmp_path):
    with pytest.raises(ExportError, match="unknown int8 target"):
        export_model(tiny_model, tmp_path / "a", "onnx", "int8", calib=synthetic_set, int8_target="gpu",
                     progress=False)
    with pytest.raises(ExportError, match="--format trt needs --int8-target tensorrt"):
        export_model(tiny_model, tmp_path / "b", "trt", "int8", calib=synthetic_set, int8_target="ort-cpu",
                     progress=False)
    with pytest.raises(ValueError, match="unknown int8 target"):
        q.quantize_int8(onnx.ModelProto(), lambda: iter(()), "minmax", (), target="cpu")
    from priorclip.export.cli import main

    r = CliRunner().invoke(main, ["--model", "priorclip-tiny", "--precision", "int8", "--int8-target", "cuda",
                                  "--out", str(tmp_path / "c")])
    assert r.exit_code != 0 and "--int8-target" in r.output


# ---------------------------------------------------------------------------------------------------------------
# Calibration: streaming with a memory bound, the same statistics as one pass


def test_calibration_groups_respect_the_budget():
    rng = np.random.default_rng(0)
    sizes = {f"t{i}": int(s) for i, s in enumerate(rng.integers(1, 5000, 60))}
    sizes["huge"] = 50_000
    budget, sub = 40_000, 8
    groups = q.calibration_groups(sizes, budget, sub)
    flat = [t for names, _ in groups for t in names]
    assert flat == list(sizes)  # every tensor once, graph order kept
    for names, b in groups:
        if names == ["huge"]:
            assert b == 1  # larger than the budget for one image: alone, one image at a time
        else:
            assert b == sub and sum(sizes[t] for t in names) * b <= budget
    assert len(q.calibration_groups(sizes, 10**12, sub)) == 1
    for bad in ((0, 8), (100, 0)):
        with pytest.raises(ValueError):
            q.calibration_groups(sizes, *bad)


def test_streaming_calibration_matches_a_single_pass(tiny_exports):
    import onnxruntime as ort

    from priorclip.export.graph import load_model

    path = tiny_exports["fp32"].out_dir / "image_encoder.onnx"
    model = load_model(path)
    targets, _, _ = q.find_targets(model, ())
    tensors = sorted({t.activation for t in targets})
    data = np.random.default_rng(1).standard_normal((6, 3, 64, 64)).astype(np.float32)

    def batches():
        yield data[:4]
        yield data[4:]

    tiny_budget = q.collect_stats(model, tensors, batches, "entropy", memory_budget=64 * 1024, sub_batch=2)
    # reference: every tensor of all 6 images at once, reduced with numpy
    m = onnx.load(str(path))
    for t in tensors:
        m.graph.output.append(helper.make_tensor_value_info(t, F32, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip(tensors, sess.run(tensors, {"pixels": data})))
    for t in tensors:
        a, s = outs[t], tiny_budget[t]
        assert s.amin == pytest.approx(float(a.min()), abs=1e-6) and s.amax == pytest.approx(float(a.max()), abs=1e-6)
        h, _ = np.histogram(np.abs(a), bins=q.HIST_BINS, range=(0.0, s.absmax))
        assert s.hist.sum() == a.size
        assert np.abs(s.hist - h).sum() <= 2e-4 * a.size + 2  # bin-edge rounding only
    assert len(model.graph.output) == len(onnx.load(str(path), load_external_data=False).graph.output)


def test_calibration_decodes_and_infers_shapes_once_when_inputs_fit(monkeypatch):
    """Inputs within the budget are decoded once for all passes (the first batch included, not read twice) and shape
    inference runs once; past the budget every pass decodes again, with the same statistics."""
    data = np.random.default_rng(7).standard_normal((8, 3, 4, 4)).astype(np.float32)
    calls = {"batches": 0, "decoded": 0, "tensor_info": 0}

    def batches():
        calls["batches"] += 1
        for s in range(0, 8, 3):
            calls["decoded"] += 1
            yield data[s : s + 3]

    real_info = q.tensor_info

    def counting_info(*a, **k):
        calls["tensor_info"] += 1
        return real_info(*a, **k)

    monkeypatch.setattr(q, "tensor_info", counting_info)
    _, table = q.quantize_int8(_graph_with_int64_output(), batches, "entropy", (), target="ort-cpu")
    assert calls == {"batches": 1, "decoded": 3, "tensor_info": 1}
    m = _graph_with_int64_output()
    plan = q.plan_quantization(m, (), "ort-cpu")
    msgs: list[str] = []
    calls.update(batches=0, tensor_info=0)
    small = q.collect_stats(m, plan.tensors, batches, "entropy", msgs.append, memory_budget=data.nbytes // 2,
                            sub_batch=1, info=plan.info)
    n_groups = int(msgs[-1].split("/")[1].split()[0])  # "calibration group i/N (...)"
    assert calls["batches"] == 2 * n_groups  # not kept: decoded again for each min/max and histogram pass
    assert calls["tensor_info"] == 0  # the plan's shapes reused (this graph's input has no free axis)
    for t, row in table["activations"].items():
        assert (small[t].amin, small[t].amax) == pytest.approx((row["min"], row["max"]), abs=1e-6)


@pytest.mark.parametrize("target", q.TARGETS)
def test_text_graph_shape_inference_runs_once(tiny_exports, monkeypatch, target):
    """The text input's free length axis: the planner needs no shapes there, calibration infers them once."""
    from priorclip.export.graph import load_model

    m = load_model(tiny_exports["fp32"].out_dir / "text_encoder.onnx")
    assert q.plan_quantization(m, (), target).info is None
    n = {"tensor_info": 0}
    real_info = q.tensor_info

    def counting_info(*a, **k):
        n["tensor_info"] += 1
        return real_info(*a, **k)

    monkeypatch.setattr(q, "tensor_info", counting_info)
    tok = tokens_for([5, 9, 12], seed=3)[:, :12].numpy()
    q.quantize_int8(m, lambda: iter([tok]), "minmax", (), target=target, fp16=False)
    assert n["tensor_info"] == 1


@pytest.mark.parametrize("target", q.TARGETS)
def test_keep_fp_matched_lists_the_patterns_that_kept_something(target):
    """A --keep-fp pattern that matches nothing (a typo) is absent from ``keep_fp_matched``; one that only names a
    pool counts where the layout would quantise that pool (ort-cpu) and not where it never would (tensorrt)."""
    m = _graph_with_int64_output()
    pool = next(n for n in m.graph.node if n.op_type == "AveragePool")
    pool.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['model', 'model.pool']")
    data = np.random.default_rng(8).standard_normal((4, 3, 4, 4)).astype(np.float32)
    _, table = q.quantize_int8(m, lambda: iter([data]), "minmax", ("w2", "pool", "visual.typo*"), target=target)
    assert table["keep_fp"] == ["w2", "pool", "visual.typo*"]
    if target == "ort-cpu":
        assert table["keep_fp_matched"] == ["pool", "w2"] and table["integer_ops"] == ["Add"]
    else:
        assert table["keep_fp_matched"] == ["w2"]
    assert table["quantized_layers"] == 2  # the two convs; the MatMul over w2 kept


# ---------------------------------------------------------------------------------------------------------------
# Quantisation parameters


def test_activation_qparams_uint8_and_int8():
    relu = q.TensorStats(amin=0.0, amax=6.0, absmax=6.0)
    p = q.activation_qparams(relu, 6.0, "ort-cpu")
    assert p.dtype == TensorProto.UINT8 and p.zero_point == 0 and p.scale == pytest.approx(6.0 / 255)
    sym = q.TensorStats(amin=-2.0, amax=2.0, absmax=2.0)
    p = q.activation_qparams(sym, 1.5, "ort-cpu")  # the threshold clips both sides
    lo, hi = (0 - p.zero_point) * p.scale, (255 - p.zero_point) * p.scale
    assert lo == pytest.approx(-1.5, abs=p.scale) and hi == pytest.approx(1.5, abs=p.scale)
    skew = q.TensorStats(amin=-0.17, amax=4.0, absmax=4.0)  # a GELU output: far finer than symmetric int8
    p = q.activation_qparams(skew, 4.0, "ort-cpu")
    x = np.linspace(-0.17, 4.0, 1001, dtype=np.float32)
    back = (np.clip(np.rint(x / p.scale) + p.zero_point, 0, 255) - p.zero_point) * p.scale
    assert np.abs(back - x).max() <= p.scale / 2 + 1e-7 and p.scale < 4.0 / 127 / 1.9
    assert (0 - p.zero_point) * p.scale <= 0.0 <= (255 - p.zero_point) * p.scale
    p = q.activation_qparams(sym, 2.0, "tensorrt")
    assert p.dtype == TensorProto.INT8 and p.zero_point == 0
    assert np.float32(np.float16(p.scale)) == np.float32(p.scale) and p.scale >= 2.0 / 127  # fp16-exact, no clip
    p = q.activation_qparams(skew, 4.0, "ort-cpu", "int8")  # the measured-slower alternative, symmetric
    assert p.dtype == TensorProto.INT8 and p.zero_point == 0 and p.scale == pytest.approx(4.0 / 127)
    with pytest.raises(ValueError, match="activation type"):
        q.activation_qparams(skew, 4.0, "ort-cpu", "uint16")


def test_quantize_weight_fp16_scales_and_bad_axis():
    w = np.random.default_rng(2).standard_normal((7, 5)).astype(np.float32) * 1e-3
    qw, s = q.quantize_weight(w, 1, fp16_scales=True)
    assert np.all(s.astype(np.float16).astype(np.float32) == s) and np.all(s >= np.abs(w).max(0) / 127)
    np.testing.assert_allclose(qw * s, w, atol=float(s.max()) / 2 + 1e-9)
    with pytest.raises(ValueError):
        q.quantize_weight(w, 2)


# ---------------------------------------------------------------------------------------------------------------
# int64 outputs pass through both layouts untouched


def _graph_with_int64_output() -> onnx.ModelProto:
    """x [B,3,4,4] -> Conv(+bias) -> Relu -> AvgPool -> Add(residual) -> flatten -> MatMul -> y [B,4] float, and
    order [B,4] int64 = ArgMax-free rank from TopK indices of y (an int64 output like belief_order)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32) * 0.1, "b"),
        numpy_helper.from_array(rng.standard_normal((12, 4)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(np.array([0, 12], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array([4], dtype=np.int64), "k"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w", "b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r"], ["a"]),
        helper.make_node("Relu", ["a"], ["r2"]),
        helper.make_node("AveragePool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
        helper.make_node("TopK", ["y", "k"], ["vals", "order"], axis=1),
    ]
    g = helper.make_graph(nodes, "int64-out", [helper.make_tensor_value_info("x", F32, ["batch", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", F32, ["batch", 4]),
                           helper.make_tensor_value_info("order", TensorProto.INT64, ["batch", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("target", q.TARGETS)
def test_int64_outputs_are_left_alone(target):
    import onnxruntime as ort

    data = np.random.default_rng(4).standard_normal((8, 3, 4, 4)).astype(np.float32)
    m = _graph_with_int64_output()
    ref_y, ref_order = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": data})
    qm, table = q.quantize_int8(m, lambda: iter([data[:5], data[5:]]), "minmax", (), target=target)
    onnx.checker.check_model(qm, full_check=True)
    outs = {o.name: o.type.tensor_type.elem_type for o in qm.graph.output}
    assert outs == {"y": F32, "order": TensorProto.INT64}
    assert not any(n.op_type == "Cast" and n.output[0] == "order" for n in qm.graph.node)
    y, order = ort.InferenceSession(qm.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": data})
    assert order.dtype == np.int64 and y.dtype == np.float32
    cos = (y * ref_y).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref_y, axis=1)
    assert cos.min() > 0.98
    assert (order == np.argsort(-y, axis=1, kind="stable")).all()  # the order of this graph's own y
    if target == "ort-cpu":
        assert set(table["integer_ops"]) == {"Add", "AveragePool"}
        k = q.ort_kernel_counts(qm)["integer"]
        assert k.get("QLinearConv") == 2 and k.get("QLinearAdd") == 1 and k.get("QLinearAveragePool") == 1
    else:
        assert table["fp16"]["qdq_fp16_nodes"] > 0 and table["integer_ops"] == []


def test_study_measures_the_gate_inputs(tiny_exports):
    """The study's probe of y and x: zero error against itself, x exact where the stem is kept, y close."""
    from priorclip.export.int8_study import gate_input_errors, gate_input_tensors, gate_inputs

    fp32 = tiny_exports["fp32"].out_dir / "image_encoder.onnx"
    names = gate_input_tensors(fp32)
    assert set(names) == {"y (prior token)", "x (ViT stem)"}
    px = np.random.default_rng(6).standard_normal((5, 3, 64, 64)).astype(np.float32)
    ref = gate_inputs(fp32, px, names)  # once, for every layout compared
    same = gate_input_errors(ref, fp32, px, names)
    assert all(v["max"] == 0.0 for v in same.values())
    err = gate_input_errors(ref, tiny_exports["int8"].out_dir / "image_encoder.onnx", px, names)
    assert err["x (ViT stem)"]["max"] == 0.0  # visual.conv1 and ln_pre stay float by default
    assert 0.0 < err["y (prior token)"]["median"] < 1e-2


def test_study_gate_sensitivity_runs_the_model_forward(tiny_model):
    """Through model.visual with the prior token: no noise, nothing flips; noise the size of y flips beliefs."""
    from priorclip.export.int8_study import gate_sensitivity

    px = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    res = gate_sensitivity(tiny_model, px, levels=(0.0, 1.0))
    assert res["0"] == {"flipped": 0, "n": 5, "cosine_min": pytest.approx(1.0, abs=1e-6), "below_0.99": 0}
    assert res["1"]["flipped"] > 0  # noise as large as y itself reorders the beliefs


@pytest.mark.parametrize("args, hint", [(["--calib-method", "bogus"], "--calib-method"),
                                        (["--variants", "0,9"], "--variants"), (["--variants", "1,x"], "--variants"),
                                        (["--variants", "2,2"], "--variants")])
def test_study_cli_rejects_bad_input_before_any_work(args, hint, tmp_path):
    from priorclip.export.int8_study import main

    r = CliRunner().invoke(main, ["--model", "priorclip-tiny", "--data", "synthetic", "--out", str(tmp_path), *args])
    assert r.exit_code == 2 and hint in r.output, r.output  # a usage error, raised while parsing
    assert not any(tmp_path.iterdir())
