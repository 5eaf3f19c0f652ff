"""ONNX Runtime engines are what they say: a CUDA session that fell back to the CPU is refused, the CUDA path runs
on I/O binding with device tensors (no numpy, no host copies), and the image graph's ``belief_order`` output is the
gate's own order.

No GPU here: the CUDA path runs against a stand-in ``onnxruntime`` whose sessions are real CPU sessions and whose
I/O binding checks the CUDA arguments and forwards them to the real CPU binding (pointers are CPU memory), with
the device replaced by the CPU and the CUDA stream by a recorder.
"""

from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import onnx
import onnxruntime as real_ort
import pytest
import torch

from priorclip.encoder import TorchEncoder
from priorclip.errors import PriorCLIPError
from priorclip.export import engines as E
from priorclip.export import open_engine, read_manifest

from .conftest import tokens_for


class _Stream:
    def __init__(self, device):
        self.handle, self.calls = 777, []

    def begin(self):
        self.calls.append("begin")

    def end(self):
        self.calls.append("end")


def _fake_ort(cpu_only: bool = False, placement: dict | None = None):
    """A stand-in ``onnxruntime`` that offers the CUDA provider; sessions are real CPU sessions underneath."""
    log = {"providers": [], "bind_input": [], "bind_output": [], "runs": 0, "config": {}}

    class SessionOptions(real_ort.SessionOptions):
        def add_session_config_entry(self, key, value):
            log["config"][key] = value
            super().add_session_config_entry(key, value)

    class Binding:
        def __init__(self, real):
            self.real = real

        def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
            log["bind_input"].append((name, device_type, device_id, element_type, tuple(shape)))
            assert device_type == "cuda" and device_id == 0
            self.real.bind_input(name, "cpu", 0, element_type, shape, buffer_ptr)

        def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
            log["bind_output"].append((name, device_type, device_id, element_type, tuple(shape), buffer_ptr))
            assert device_type == "cuda" and buffer_ptr is not None  # preallocated on the device
            self.real.bind_output(name, "cpu", 0, element_type, shape, buffer_ptr)

    class InferenceSession:
        def __init__(self, path, so, providers):
            log["providers"].append(providers)
            self._real = real_ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self.get_inputs, self.get_outputs = self._real.get_inputs, self._real.get_outputs
            self.fallback_disabled = False

        def get_providers(self):
            return ["CPUExecutionProvider"] if cpu_only else ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def disable_fallback(self):
            self.fallback_disabled = True

        def get_provider_graph_assignment_info(self):
            return [types.SimpleNamespace(ep_name=ep, get_nodes=lambda c=counts: [
                types.SimpleNamespace(op_type=op) for op, n in c.items() for _ in range(n)])
                for ep, counts in (placement or {}).items()]

        def io_binding(self):
            return Binding(self._real.io_binding())

        def run_with_iobinding(self, binding):
            log["runs"] += 1
            self._real.run_with_iobinding(binding.real)

        def run(self, *a, **k):
            raise AssertionError("the CUDA path must not run through numpy (session.run)")

    mod = types.SimpleNamespace(__version__="1.99.0", SessionOptions=SessionOptions, InferenceSession=InferenceSession,
                                get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    return mod, log


@pytest.fixture
def fake_cuda(monkeypatch):
    def install(**kw):
        mod, log = _fake_ort(**kw)
        monkeypatch.setitem(sys.modules, "onnxruntime", mod)
        monkeypatch.setattr(E, "_cuda_device", lambda device, what: torch.device("cpu"))
        monkeypatch.setattr(E, "_CudaStream", _Stream)
        return log

    return install


def _pixels(batch, seed=0):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_cuda_session_that_fell_back_to_cpu_is_refused(tiny_exports, fake_cuda):
    log = fake_cuda(cpu_only=True)
    with pytest.raises(PriorCLIPError, match="gave a session on .'CPUExecutionProvider'. instead of "
                                             "CUDAExecutionProvider") as e:
        open_engine(tiny_exports["fp32"].out_dir, device="cuda")
    assert "\n" not in str(e.value) and "CUDA/cuDNN" in str(e.value)
    (name, opts), cpu = log["providers"][0]
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts["use_tf32"] == 0 and opts["user_compute_stream"] == "777"  # TF32 off; ORT runs on our stream


def test_cuda_session_with_compute_nodes_on_cpu_is_refused(tiny_exports, fake_cuda):
    fake_cuda(placement={"CUDAExecutionProvider": {"MatMul": 10}, "CPUExecutionProvider": {"Shape": 3, "Conv": 2}})
    with pytest.raises(PriorCLIPError, match=r"placed compute nodes on the CPU \(2 Conv\)"):
        open_engine(tiny_exports["fp32"].out_dir, device="cuda")
    # Shape arithmetic on the CPU is normal (ORT puts it there on purpose) and accepted.
    fake_cuda(placement={"CUDAExecutionProvider": {"MatMul": 10, "Conv": 2}, "CPUExecutionProvider": {"Shape": 3}})
    eng = open_engine(tiny_exports["fp32"].out_dir, device="cuda")
    assert eng.node_placement["image"]["CPUExecutionProvider"] == {"Shape": 3}
    assert eng.image_session.fallback_disabled  # an EP failure while running must raise, not rerun on the CPU


@pytest.mark.parametrize("batch", [1, 7])
def test_cuda_path_runs_on_io_binding_with_device_tensors(tiny_model, tiny_exports, fake_cuda, batch):
    log = fake_cuda()
    eng = open_engine(tiny_exports["fp32"].out_dir, device="cuda")
    assert eng.name == "onnxruntime-cuda" and eng.io_binding and eng.has_order
    assert log["config"]["session.record_ep_graph_assignment_info"] == "1"
    x = _pixels(batch, batch)
    emb, order = eng.encode_images_with_order(x)
    ref, ref_order = TorchEncoder(tiny_model).encode_images_with_order(x)
    assert (emb - ref).abs().max() < 1e-5 and torch.equal(order, ref_order)
    assert log["bind_input"] == [("pixels", "cuda", 0, np.float32, (batch, 3, 64, 64))]
    bound = {o[0]: o for o in log["bind_output"]}
    assert bound["embeddings"][3:5] == (np.float32, (batch, 32))
    assert bound["belief_order"][3:5] == (np.int64, (batch, 17))
    # The results are the preallocated tensors ORT wrote into: no copy.
    assert emb.data_ptr() == bound["embeddings"][5] and order.data_ptr() == bound["belief_order"][5]
    assert eng._stream.calls == ["begin", "end"]
    log["bind_output"].clear()
    assert (eng.encode_images(x) - ref).abs().max() < 1e-5
    assert [o[0] for o in log["bind_output"]] == ["embeddings"]  # only the outputs asked for are bound
    tok = tokens_for([5 + 3 * i for i in range(batch)], seed=batch)
    txt = eng.encode_texts(tok)
    assert log["bind_input"][-1] == ("tokens", "cuda", 0, np.int64, (batch, 5 + 3 * (batch - 1)))  # trimmed
    assert (txt - TorchEncoder(tiny_model).encode_texts(tok)).abs().max() < 1e-5
    assert log["runs"] == 3


def test_cpu_io_binding_matches_the_numpy_path(tiny_exports):
    """The real ONNX Runtime binding API (CPU device): the same code path as CUDA, minus the device strings."""
    plain = open_engine(tiny_exports["fp32"].out_dir)
    bound = open_engine(tiny_exports["fp32"].out_dir, io_binding=True)
    assert not plain.io_binding and bound.io_binding and bound.device.type == "cpu"
    x = _pixels(3)
    e1, o1 = plain.encode_images_with_order(x)
    e2, o2 = bound.encode_images_with_order(x)
    assert torch.equal(e1, e2) and torch.equal(o1, o2)
    tok = tokens_for([4, 11, 7])
    assert torch.equal(plain.encode_texts(tok), bound.encode_texts(tok))


def test_check_providers_and_placement_directly():
    ok = types.SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    E.check_providers(ok, "CUDAExecutionProvider", "g.onnx")
    with pytest.raises(PriorCLIPError, match="no provider"):
        E.check_providers(types.SimpleNamespace(get_providers=lambda: []), "CUDAExecutionProvider", "g.onnx")
    E.check_placement({"CPUExecutionProvider": {"MatMul": 4}}, "CPUExecutionProvider", "g.onnx")  # CPU is CPU
    E.check_placement(None, "CUDAExecutionProvider", "g.onnx")  # an ORT that cannot say: nothing to judge
    with pytest.raises(PriorCLIPError, match="1 MatMulInteger"):
        E.check_placement({"CPUExecutionProvider": {"MatMulInteger": 1, "Gather": 9}}, "CUDAExecutionProvider", "g")


def test_node_placement_reads_real_ort_assignment(tiny_exports):
    so = real_ort.SessionOptions()
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    path = tiny_exports["fp32"].out_dir / "image_encoder.onnx"
    sess = real_ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    placement = E.node_placement(sess)
    if placement is None:
        pytest.skip(f"onnxruntime {real_ort.__version__} does not report node placement")
    assert set(placement) == {"CPUExecutionProvider"}
    assert placement["CPUExecutionProvider"].get("Conv", 0) >= 1  # the prior ResNet's convolutions


# ------------------------------------------------------------------------------------------------- belief order


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_belief_order_equals_eager(tiny_model, tiny_exports, batch):
    eng = open_engine(tiny_exports["fp32"].out_dir)
    assert [o["name"] for o in eng.metadata["io"]["image"]["outputs"]] == ["embeddings", "belief_order"]
    x = _pixels(batch, 10 + batch)
    emb, order = eng.encode_images_with_order(x)
    ref, ref_order = TorchEncoder(tiny_model).encode_images_with_order(x)
    assert order.dtype == torch.int64 and order.shape == (batch, tiny_model.cfg.vision.num_tokens)
    assert torch.equal(order, ref_order)
    assert torch.equal(emb, eng.encode_images(x))  # the same numbers with or without the order requested


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_converted_graphs_keep_an_int64_order(tiny_model, tiny_exports, precision):
    """The fp16 and int8 converters leave the order output alone: int64, each row a permutation of the tokens,
    and (rounding may flip near-tied beliefs of a random model) mostly the eager order."""
    eng = open_engine(tiny_exports[precision].out_dir)
    g = onnx.load(str(tiny_exports[precision].out_dir / "image_encoder.onnx"), load_external_data=False)
    out_types = {o.name: o.type.tensor_type.elem_type for o in g.graph.output}
    assert out_types == {"embeddings": onnx.TensorProto.FLOAT, "belief_order": onnx.TensorProto.INT64}
    x = _pixels(7, 3)
    _, order = eng.encode_images_with_order(x)
    t = tiny_model.cfg.vision.num_tokens
    assert order.dtype == torch.int64 and order.shape == (7, t)
    assert torch.equal(order.sort(dim=1).values, torch.arange(t).expand(7, t))
    _, ref_order = TorchEncoder(tiny_model).encode_images_with_order(x)
    assert (order == ref_order).all(dim=1).sum() >= 5


def _without_order(src, dst, rename_to=None):
    """A copy of an export as made before the order output existed (or with it renamed)."""
    shutil.copytree(src, dst)
    path = dst / "image_encoder.onnx"
    g = onnx.load(str(path), load_external_data=False)  # the weights stay in the copied .data file
    if rename_to is None:
        g.graph.output.pop()
    else:  # expose the order under another name (the gate still consumes the original tensor)
        g.graph.node.append(onnx.helper.make_node("Identity", [g.graph.output[1].name], [rename_to]))
        g.graph.output[1].name = rename_to
    onnx.save(g, str(path))
    if rename_to is None:
        m = read_manifest(dst)
        m["io"]["image"]["outputs"] = m["io"]["image"]["outputs"][:1]
        (dst / "manifest.json").write_text(json.dumps(m))


def test_single_output_export_opens_and_gives_no_order(tiny_model, tiny_exports, tmp_path):
    _without_order(tiny_exports["fp32"].out_dir, tmp_path / "old")
    eng = open_engine(tmp_path / "old")
    assert not eng.has_order
    x = _pixels(3)
    emb, order = eng.encode_images_with_order(x)
    assert order is None and (emb - TorchEncoder(tiny_model).encode_images(x)).abs().max() < 1e-5
    assert eng.encode_images_with_order(x[:0])[1] is None


def test_graph_with_unexpected_output_name_is_refused(tiny_exports, tmp_path):
    _without_order(tiny_exports["fp32"].out_dir, tmp_path / "odd", rename_to="output_1")
    with pytest.raises(PriorCLIPError, match="image_encoder.onnx: outputs .*unexpected: output_1") as e:
        open_engine(tmp_path / "odd")
    assert "\n" not in str(e.value)


def test_engines_reject_bad_inputs(tiny_exports):
    eng = open_engine(tiny_exports["fp32"].out_dir)
    with pytest.raises(ValueError, match="float pixels"):
        eng.encode_images(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixels \[B,3,64,64\], got \(2, 64, 64, 3\)"):
        eng.encode_images_with_order(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="int64 token ids, got torch.float32"):
        eng.encode_texts(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"L<=77"):
        eng.encode_texts(torch.zeros(2, 78, dtype=torch.long))
    emb, order = eng.encode_images_with_order(torch.zeros(0, 3, 64, 64))
    assert emb.shape == (0, 32) and order.shape == (0, 17) and order.dtype == torch.int64


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_aoti_package_returns_embeddings_and_order(tiny_model, tmp_path, precision):
    """AOTInductor packages return (embeddings, belief_order); the engine splits them (PRIORCLIP_SLOW=1: ~1 min)."""
    from priorclip.export import export_model

    export_model(tiny_model, tmp_path, "aoti", precision, progress=False, max_batch=16)
    eng = open_engine(tmp_path)
    assert eng.has_order
    ref = TorchEncoder(tiny_model)
    for b in (1, 7):
        x = _pixels(b, 20 + b)
        emb, order = eng.encode_images_with_order(x)
        ref_emb, ref_order = ref.encode_images_with_order(x)
        assert emb.dtype == torch.float32 and order.dtype == torch.int64 and order.shape == (b, 17)
        if precision == "fp32":
            assert torch.equal(order, ref_order) and (emb - ref_emb).abs().max() < 1e-4
        else:  # half rounding may flip near-tied beliefs of a random model
            assert torch.equal(order.sort(dim=1).values, torch.arange(17).expand(b, 17))
        assert torch.equal(eng.encode_images(x), emb)


def test_export_parity_compares_orders_with_a_cpu_reference(tiny_exports):
    """Without CUDA the reference runs on the CPU; the report carries the rank-flip count of the order output."""
    parity = tiny_exports["fp32"].parity
    assert parity["reference_device"] == "cpu" and parity["passed"]
    assert parity["belief_order"]["n"] == parity["n_images"] and parity["belief_order"]["flipped"] == 0
    names = [o["name"] for o in tiny_exports["fp32"].manifest["io"]["image"]["outputs"]]
    assert names == ["embeddings", "belief_order"]


def test_fp32_matmuls_turns_tf32_off_and_restores_it():
    from priorclip.export.api import _fp32_matmuls

    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with _fp32_matmuls():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = saved
