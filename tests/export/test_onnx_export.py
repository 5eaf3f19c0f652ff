"""FP32 ONNX export: checker, pinned opset, dynamic axes, parity with the reference at batch 1 and 7, tie order."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from priorclip.encoder import TorchEncoder
from priorclip.export import OPSET, open_engine
from priorclip.export.graph import op_counts

from .conftest import tokens_for


def _graph(res, tower):
    return onnx.load(str(res.out_dir / f"{tower}_encoder.onnx"), load_external_data=False)


def test_graphs_pass_full_checker_with_pinned_opset_and_dynamic_axes(tiny_exports):
    res = tiny_exports["fp32"]
    for tower in ("image", "text"):
        onnx.checker.check_model(str(res.out_dir / f"{tower}_encoder.onnx"), full_check=True)
        g = _graph(res, tower)
        assert {o.domain: o.version for o in g.opset_import}[""] == OPSET
        dims = g.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param  # symbolic batch
        if tower == "text":
            assert dims[1].dim_param  # symbolic length
    # The gate sorts by pairwise comparison: no TopK, whose tie order TensorRT does not document.
    assert "TopK" not in op_counts(_graph(res, "image"))
    assert "ArgMax" in op_counts(_graph(res, "text"))  # EOT position computed in-graph


@pytest.mark.parametrize("batch", [1, 7])
def test_fp32_onnx_matches_reference(tiny_model, tiny_exports, batch):
    eng = open_engine(tiny_exports["fp32"].out_dir)
    ref = TorchEncoder(tiny_model)
    assert eng.name == "onnxruntime-cpu" and eng.precision == "fp32"
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    assert (eng.encode_images(x) - ref.encode_images(x)).abs().max() < 1e-5
    tok = tokens_for([5 + 3 * i for i in range(batch)], seed=batch)
    out = eng.encode_texts(tok)
    assert out.shape == (batch, 32) and out.dtype == torch.float32
    assert (out - ref.encode_texts(tok)).abs().max() < 1e-5
    assert torch.allclose(out.norm(dim=1), torch.ones(batch), atol=1e-5)


def test_text_length_axis_is_exact(tiny_model, tiny_exports):
    """Full 77-token input and trimmed input give the same embedding (causal mask + EOT pooling)."""
    eng = open_engine(tiny_exports["fp32"].out_dir)
    tok = tokens_for([4, 12, 30])
    sess = eng.text_session
    full = sess.run(None, {"tokens": tok.numpy()})[0]
    short = sess.run(None, {"tokens": tok[:, :30].numpy()})[0]
    assert np.abs(full - short).max() < 1e-5
    # And the maximum length is accepted.
    assert eng.encode_texts(tokens_for([77])).shape == (1, 32)


def test_image_export_with_saturated_belief_matches_reference(tiny_model, tmp_path):
    """A prior scaled so most softmax entries are exactly 0: ties everywhere, still matches torch at batch 1 and 7."""
    import copy

    from priorclip.export import export_model

    m = copy.deepcopy(tiny_model)
    with torch.no_grad():
        m.vision_proj_res.weight.mul_(200.0)
        m.vision_proj_res.bias.mul_(200.0)
    x = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stem = m.visual.stem(x)
        s = torch.matmul(stem, m.prior_token(x).transpose(1, 2)).squeeze(-1)
        zeros = (torch.softmax(s, dim=1) == 0).float().mean()
    assert zeros > 0.5  # the precondition: many exact-zero beliefs
    export_model(m, tmp_path, "onnx", "fp32", progress=False)
    eng = open_engine(tmp_path)
    ref = TorchEncoder(m)
    # The exported order output is the gate's order, ties included: lower index first, as a float64-free stable
    # descending argsort of the fp32 belief gives it, and as the eager model gives it.
    belief32 = torch.softmax(s, dim=1).numpy()
    want = torch.from_numpy(np.stack([np.argsort(-row, kind="stable") for row in belief32]))
    tied_rows = [(np.diff(np.sort(row)) == 0).sum() for row in belief32]
    assert min(tied_rows) >= 5  # every row really has exact ties
    for b in (1, 7):
        emb, order = eng.encode_images_with_order(x[:b])
        assert (emb - ref.encode_images(x[:b])).abs().max() < 1e-4
        assert torch.equal(order, want[:b])
        assert torch.equal(order, ref.encode_images_with_order(x[:b])[1])


def test_gate_graph_breaks_ties_lower_index_first(tmp_path):
    """The exported gate alone, against an independent float64 gate with a stable descending sort."""
    import onnxruntime as ort

    from priorclip.kernels.belief_gate import belief_gate

    class Gate(torch.nn.Module):
        def forward(self, x, y):
            return belief_gate(x, y)

    g = torch.Generator().manual_seed(0)
    b, t, d = 3, 50, 16
    x = torch.randn(b, t, d, generator=g)
    y = 400.0 * torch.randn(b, 1, d, generator=g)  # logit gaps >> 104: all but a few beliefs are exactly 0
    x[:, 7] = x[:, 3]  # exact duplicates too
    path = tmp_path / "gate.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(Gate(), (x, y), str(path), dynamo=True, opset_version=OPSET, input_names=["x", "y"],
                      dynamic_shapes={"x": {0: batch}, "y": {0: batch}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": x.numpy(), "y": y.numpy()})[0]

    xd, yd = x.double().numpy(), y.double().numpy()
    s = np.einsum("btd,bd->bt", xd, yd[:, 0])
    belief32 = torch.softmax(torch.from_numpy(s).float(), dim=1).double().numpy()  # the reference's fp32 belief
    assert (belief32 == 0).mean() > 0.8
    order = np.stack([np.argsort(-row, kind="stable") for row in belief32])  # ties: lower index first
    w = 1.0 / np.sqrt(order + 1.0)
    gated = xd * (belief32 + w)[:, :, None]
    ref = gated / np.maximum(np.linalg.norm(gated, axis=1, keepdims=True), 1e-12)
    assert np.abs(out - ref).max() < 1e-5


@pytest.mark.parametrize("name, gate, outputs", [
    ("priorclip-tiny", "belief+rank", ["embeddings", "belief_order"]),
    ("priorclip-tiny", "2belief", ["embeddings"]),  # this gate does not rank: no order to export
    ("clip-tiny", None, ["embeddings"]),  # no prior, no gate
])
def test_image_graph_outputs_follow_the_gate(name, gate, outputs):
    from priorclip import create_model
    from priorclip.export.onnx_export import ImageEncoder, image_output_names, io_spec

    torch.manual_seed(0)
    m = create_model(name, **({"gate": gate} if gate else {})).eval()
    assert image_output_names(m) == outputs
    spec = io_spec(m, 8)["image"]["outputs"]
    assert [o["name"] for o in spec] == outputs
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = ImageEncoder(m)(x)
        ref, ref_order = m.encode_image_with_order(x)
    if len(outputs) == 2:
        assert spec[1] == {**spec[1], "dtype": "int64", "shape": ["batch", m.cfg.vision.num_tokens]}
        assert torch.equal(out[0], ref) and torch.equal(out[1], ref_order)
    else:
        assert isinstance(out, torch.Tensor) and torch.equal(out, ref) and ref_order is None
