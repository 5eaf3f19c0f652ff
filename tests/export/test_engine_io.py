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

from .conftest import STREAM_HANDLE, tokens_for


def _fake_ort(events: list, cpu_only: bool = False, placement: dict | None = None):
    """A stand-in ``onnxruntime`` that offers the CUDA provider; sessions are real CPU sessions underneath.
    ``run_with_iobinding`` appends "run" to ``events``, the list the stand-in stream records begin/end in."""
    log = {"providers": [], "bind_input": [], "bind_output": [], "runs": 0, "config": {}, "bindings": 0,
           "cleared": 0, "run_options": [], "raise_run": None}

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

        def clear_binding_inputs(self):
            log["cleared"] += 1
            self.real.clear_binding_inputs()

        def clear_binding_outputs(self):
            self.real.clear_binding_outputs()

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
            log["bindings"] += 1
            return Binding(self._real.io_binding())

        def run_with_iobinding(self, binding, run_options=None):
            events.append("run")
            log["runs"] += 1
            log["run_options"].append(run_options)
            if log["raise_run"]:
                raise log["raise_run"]
            self._real.run_with_iobinding(binding.real, run_options)

        def run(self, *a, **k):
            raise AssertionError("the CUDA path must not run through numpy (session.run)")

    mod = types.SimpleNamespace(__version__="1.99.0", SessionOptions=SessionOptions, InferenceSession=InferenceSession,
                                RunOptions=real_ort.RunOptions,
                                get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    return mod, log


@pytest.fixture
def fake_cuda(monkeypatch, cuda_stand_in):
    def install(**kw):
        mod, log = _fake_ort(cuda_stand_in, **kw)
        monkeypatch.setitem(sys.modules, "onnxruntime", mod)
        log["events"] = cuda_stand_in
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
    assert opts["use_tf32"] == 0 and opts["user_compute_stream"] == str(STREAM_HANDLE)  # TF32 off; our stream


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
    assert log["events"] == ["begin", "run", "end"]  # ORT runs between the two stream waits
    # No host synchronisation at the end of Run: the stream waits order the outputs instead.
    assert log["run_options"][0].get_run_config_entry("disable_synchronize_execution_providers") == "1"
    log["bind_output"].clear()
    assert (eng.encode_images(x) - ref).abs().max() < 1e-5
    assert [o[0] for o in log["bind_output"]] == ["embeddings"]  # only the outputs asked for are bound
    tok = tokens_for([5 + 3 * i for i in range(batch)], seed=batch)
    txt = eng.encode_texts(tok)
    assert log["bind_input"][-1] == ("tokens", "cuda", 0, np.int64, (batch, 5 + 3 * (batch - 1)))  # trimmed
    assert (txt - TorchEncoder(tiny_model).encode_texts(tok)).abs().max() < 1e-5
    assert log["runs"] == 3 and log["events"] == ["begin", "run", "end"] * 3
    assert log["bindings"] == 2 and log["cleared"] == 3  # one binding per tower, cleared after every call


def test_cuda_run_that_raises_still_orders_the_callers_stream(tiny_exports, fake_cuda):
    log = fake_cuda()
    eng = open_engine(tiny_exports["fp32"].out_dir, device="cuda")
    log["raise_run"] = RuntimeError("CUDA failure 2: out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        eng.encode_images(_pixels(2))
    assert log["events"] == ["begin", "run", "end"] and log["cleared"] == 1
    log["raise_run"] = None
    assert eng.encode_images(_pixels(2)).shape == (2, 32)  # the kept binding was cleared: the next call works


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
    from priorclip.numerics import fp32_matmuls

    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with fp32_matmuls():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        with pytest.raises(KeyError), fp32_matmuls():
            raise KeyError("restored on error too")
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_parity_runs_only_the_reference_with_tf32_off(tiny_model, tiny_exports, synthetic_set, tmp_path,
                                                      monkeypatch):
    """The engine under test runs with the global TF32 settings it is served with; only the reference is fp32."""
    from priorclip.export import api
    from priorclip.export import parity as P

    seen = {}
    real_ref, real_report = P.reference_embed, P.parity_report

    def ref(*a, **k):
        seen["reference"] = torch.backends.cudnn.allow_tf32
        return real_ref(*a, **k)

    def report(*a, **k):
        seen["engine"] = torch.backends.cudnn.allow_tf32
        return real_report(*a, **k)

    monkeypatch.setattr(P, "reference_embed", ref)
    monkeypatch.setattr(P, "parity_report", report)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    out = tmp_path / "fp32"
    shutil.copytree(tiny_exports["fp32"].out_dir, out)
    rep = api.run_parity(tiny_model, out, read_manifest(out), synthetic_set, "cpu", 8, False)
    assert seen == {"reference": False, "engine": True} and rep["passed"]


# ------------------------------------------------------------------------------------------------- bad input


def _corrupt_copy(src, dst, what):
    shutil.copytree(src, dst)
    if what == "corrupt":
        (dst / "image_encoder.onnx").write_bytes(b"\x08\x07not a protobuf\xff\xff")
    elif what == "no-data":
        (dst / "image_encoder.onnx.data").unlink()
    elif what == "no-graph":
        (dst / "text_encoder.onnx").unlink()
    return dst


@pytest.mark.parametrize("what, match", [
    ("corrupt", r"image_encoder.onnx: ONNX Runtime could not load this graph \(InvalidProtobuf"),
    ("no-data", r"image_encoder.onnx: ONNX Runtime could not load this graph \(Fail: .*image_encoder.onnx.data"),
    ("no-graph", r"text_encoder.onnx: the text graph is missing"),
])
def test_damaged_onnx_export_is_one_error_line(tiny_exports, tmp_path, what, match):
    d = _corrupt_copy(tiny_exports["fp32"].out_dir, tmp_path / what, what)
    with pytest.raises(PriorCLIPError, match=match) as e:
        open_engine(d)
    assert "\n" not in str(e.value) and "re-export" in str(e.value)


def test_missing_onnxruntime_names_the_install(tiny_exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(PriorCLIPError, match="ONNX Runtime is not installed .*pip install onnxruntime .*"
                                             "onnxruntime-gpu") as e:
        open_engine(tiny_exports["fp32"].out_dir)
    assert "\n" not in str(e.value)


def test_token_ids_outside_the_vocabulary_are_refused(tiny_exports):
    eng = open_engine(tiny_exports["fp32"].out_dir)
    assert eng.vocab_size == 49408
    tok = tokens_for([5, 7])
    for bad in (49408, -1):
        t = tok.clone()
        t[1, 2] = bad
        with pytest.raises(ValueError, match=rf"token ids in \[0, 49408\), got ids from {min(bad, 0)} to "):
            eng.encode_texts(t)
    assert eng.encode_texts(tok.int()).shape == (2, 32)  # int32 ids in range are fine


def test_check_io_checks_input_dtypes():
    out = {"embeddings": torch.float32}
    assert not E.check_io("g", "text", {"tokens": torch.int32}, out)
    assert E.check_io("g", "image", {"pixels": torch.float16}, out | {"belief_order": torch.int64})
    with pytest.raises(PriorCLIPError, match="g: input 'pixels' is torch.int64, expected torch.float32 or "):
        E.check_io("g", "image", {"pixels": torch.int64}, out)
    with pytest.raises(PriorCLIPError, match="input 'tokens' is tensor.uint8., expected torch.int64 or torch.int32"):
        E.check_io("g", "text", {"tokens": "tensor(uint8)"}, out)  # an ORT type torch has no name for
    with pytest.raises(PriorCLIPError, match="input 'tokens' is torch.float32"):
        E.check_io("g", "text", {"tokens": torch.float32}, out)


def _manifest_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    m.update(changes)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_open_engine_refuses_options_the_format_does_not_take(tiny_exports, tmp_path):
    with pytest.raises(PriorCLIPError, match=r"option batch_size does not apply to this onnx export .*"
                                             r"\(threads, io_binding\)"):
        open_engine(tiny_exports["fp32"].out_dir, batch_size=4)
    d = _manifest_copy(tiny_exports["fp32"].out_dir, tmp_path / "aoti", format="aoti", aoti={"device": "cpu"})
    with pytest.raises(PriorCLIPError, match="option io_binding, threads does not apply to this aoti export"):
        open_engine(d, threads=2, io_binding=True)


@pytest.mark.parametrize("content", [None, b"not a zip archive"])
def test_missing_or_bad_aoti_package_is_one_error_line(tiny_exports, tmp_path, content):
    files = {"image": "image_encoder.pt2", "text": "text_encoder.pt2"}
    d = _manifest_copy(tiny_exports["fp32"].out_dir, tmp_path / "aoti", format="aoti", aoti={"device": "cpu"},
                       files=files)
    if content is not None:
        (d / "image_encoder.pt2").write_bytes(content)
    match = "image_encoder.pt2: the image AOTInductor package is missing" if content is None else \
        "image_encoder.pt2: torch .* could not load this AOTInductor package \\(RuntimeError"
    with pytest.raises(PriorCLIPError, match=match) as e:
        open_engine(d)
    assert "\n" not in str(e.value)
