"""TensorRT path against a stand-in ``tensorrt`` module: strongly typed flag, one profile, timing cache, no
precision flags or calibrators; and the runtime engine (:class:`~priorclip.export.engines.TrtEngine`) against a
stand-in plan whose execution context reads its input from, and writes its outputs to, the very addresses the engine
binds, computing them with the eager model. (No TensorRT or GPU exists on these machines: the device is replaced by
the CPU and the CUDA stream by a recorder; see the module docstring of priorclip.export.tensorrt.)"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types

import numpy as np
import pytest
import torch

from priorclip.errors import PriorCLIPError
from priorclip.export import engines as E
from priorclip.export import tensorrt as T
from priorclip.export.onnx_export import io_spec

from .conftest import STREAM_HANDLE, tokens_for


class _Flag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


class _Log(list):
    accept_cache = True  # what the fake config.set_timing_cache returns


class _Recorder:
    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        def call(*args, **kwargs):
            self._log.append((f"{self._name}.{attr}", args, kwargs))
            if attr == "create_builder_config":
                return _Recorder(self._log, "config")
            if attr == "create_optimization_profile":
                return _Recorder(self._log, "profile")
            if attr == "create_network":
                return _Recorder(self._log, "network")
            if attr == "create_timing_cache":
                return "CACHE"
            if attr == "set_timing_cache":
                return self._log.accept_cache
            if attr == "build_serialized_network":
                return b"PLAN"
            if attr == "get_timing_cache":
                return types.SimpleNamespace(serialize=lambda: b"TC")
            return None

        return call


def _fake_trt(log):
    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            log.append(("parser.parse_from_file", (path,), {}))
            return True

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(
        __version__="10.9.0",
        NetworkDefinitionCreationFlag=_Flag,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WS"),
        BuilderFlag=types.SimpleNamespace(TF32="TF32"),
        Logger=Logger,
        Builder=lambda logger: _Recorder(log, "builder"),
        OnnxParser=Parser,
    )


def test_profile_shapes():
    img = T.profile_shapes("image", 224, 77, 256)
    assert img == {"pixels": ((1, 3, 224, 224), (64, 3, 224, 224), (256, 3, 224, 224))}
    txt = T.profile_shapes("text", 224, 77, 8)
    assert txt == {"tokens": ((1, 2), (8, 32), (8, 77))}
    assert T.profile_shapes("image", 64, 77, 1)["pixels"][1] == (1, 3, 64, 64)
    with pytest.raises(ValueError):
        T.profile_shapes("image", 224, 77, 0)


def test_network_is_strongly_typed_only():
    assert T.network_flags(_fake_trt(_Log())) == 1 << 5


def test_build_engine_sets_profile_and_timing_cache_but_no_precision_flags(tmp_path):
    log = _Log()
    trt = _fake_trt(log)
    onnx_path = tmp_path / "image_encoder.onnx"
    onnx_path.write_bytes(b"")
    (tmp_path / "timing.cache").write_bytes(b"OLD")
    shapes = T.profile_shapes("image", 64, 77, 16)
    info = T.build_engine(onnx_path, tmp_path / "image_encoder.plan", shapes, tmp_path / "timing.cache", trt=trt)
    names = [c[0] for c in log]
    assert ("builder.create_network", (1 << 5,), {}) in log
    assert ("config.create_timing_cache", (b"OLD",), {}) in log
    assert ("config.set_timing_cache", ("CACHE",), {"ignore_mismatch": False}) in log  # and its result checked
    assert ("profile.set_shape", ("pixels", (1, 3, 64, 64), (16, 3, 64, 64), (16, 3, 64, 64)), {}) in log
    assert "config.add_optimization_profile" in names
    assert not any(n in ("config.set_flag", "config.set_int8_calibrator") or "int8_calibrator" in n for n in names)
    assert ("config.clear_flag", ("TF32",), {}) in log  # TensorRT's default TF32 is cleared: fp32 is fp32
    assert (tmp_path / "image_encoder.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "timing.cache").read_bytes() == b"TC"
    assert info["plan"] == "image_encoder.plan"


def test_tf32_is_kept_only_when_asked(tmp_path):
    log = _Log()
    onnx_path = tmp_path / "image_encoder.onnx"
    onnx_path.write_bytes(b"")
    T.build_engine(onnx_path, tmp_path / "p.plan", T.profile_shapes("image", 64, 77, 4), tmp_path / "timing.cache",
                   trt=_fake_trt(log), tf32=True)
    assert not any(c[0] in ("config.clear_flag", "config.set_flag") for c in log)


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("fp16", True)])
def test_export_builds_fp32_plans_without_tf32(tiny_model, tmp_path, monkeypatch, precision, tf32):
    from priorclip.export import export_model

    seen = []

    def build(onnx_path, plan_path, shapes, cache_path, trt=None, tf32=False):
        seen.append(tf32)
        return {"plan": plan_path.name}

    monkeypatch.setattr(T, "import_tensorrt", lambda: _fake_trt(_Log()))
    monkeypatch.setattr(T, "build_engine", build)
    export_model(tiny_model, tmp_path, "trt", precision, progress=False, max_batch=4)
    assert seen == [tf32, tf32]


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(T.TensorRTMissing, match="too old"):
        T.import_tensorrt()


def test_rejected_timing_cache_is_one_error_line(tmp_path):
    log = _Log()
    log.accept_cache = False  # TensorRT 10 returns False for a cache from another version or GPU
    onnx_path = tmp_path / "image_encoder.onnx"
    onnx_path.write_bytes(b"")
    (tmp_path / "timing.cache").write_bytes(b"STALE")
    with pytest.raises(PriorCLIPError, match="rejected the 5-byte timing cache") as e:
        T.build_engine(onnx_path, tmp_path / "p.plan", T.profile_shapes("image", 64, 77, 4), tmp_path / "timing.cache",
                       trt=_fake_trt(log))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "p.plan").exists()


# ------------------------------------------------------------------------------------------ runtime (TrtEngine)


class _DT(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 9


class _Mode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_NP = {_DT.FLOAT: np.float32, _DT.HALF: np.float16, _DT.INT32: np.int32, _DT.INT64: np.int64}


def _view(ptr, shape, dtype):
    """A numpy view of the memory at a bound address (what TensorRT would read or write on the device)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)


class _Plan:
    """A deserialised stand-in plan: ``io`` is [(name, mode, dtype, shape)] in the plan's own order; its context's
    ``execute_async_v3`` appends "run" to ``events`` (where the stand-in stream records begin/end)."""

    def __init__(self, spec, model, knobs, events):
        self.io = [(n, _Mode[m], _DT[d], tuple(s)) for n, m, d, s in spec["io"]]
        self.tower, self.model, self.knobs, self.events = spec["tower"], model, knobs, events
        self.num_io_tensors = len(self.io)

    def _get(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return self._get(name)[1]

    def get_tensor_dtype(self, name):
        return self._get(name)[2]

    def get_tensor_shape(self, name):
        return self._get(name)[3]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, plan):
        self.plan, self.shapes, self.addresses, self.handles = plan, {}, {}, []

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return shape[0] <= self.plan.knobs.get("profile_max", 64)

    def get_tensor_shape(self, name):
        b = next(iter(self.shapes.values()))[0]
        shape = self.plan._get(name)[3]
        return (b,) + tuple(shape[1:])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return name not in self.plan.knobs.get("refuse_address", ())

    def execute_async_v3(self, handle):
        self.handles.append(handle)
        self.plan.events.append("run")
        if self.plan.knobs.get("raise_execute"):
            raise RuntimeError("pybind11: execute_async_v3 failed")
        if self.plan.knobs.get("fail_execute"):
            return False
        (name, _, dt, _), = [t for t in self.plan.io if t[1] == _Mode.INPUT]
        x = torch.from_numpy(_view(self.addresses[name], self.shapes[name], _NP[dt]).copy())
        with torch.no_grad():
            if self.plan.tower == "image":
                emb, order = self.plan.model.encode_image_with_order(x)
                results = {"embeddings": emb, "belief_order": order}
            else:
                results = {"embeddings": self.plan.model.encode_text(x.long())}
        for name, mode, dt, _ in self.plan.io:
            if mode == _Mode.OUTPUT:
                out = results[name].numpy().astype(_NP[dt])
                _view(self.addresses[name], out.shape, _NP[dt])[...] = out
        return True


def _runtime_trt(model, knobs, events):
    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _Plan(json.loads(data), model, knobs, events)

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(__version__="10.9.0", DataType=_DT, TensorIOMode=_Mode, Runtime=Runtime,
                                 Logger=Logger)


_IMAGE_IO = [["pixels", "INPUT", "FLOAT", [-1, 3, 64, 64]],
             ["belief_order", "OUTPUT", "INT64", [-1, 17]],  # the plan's order, not the ONNX's, is what counts
             ["embeddings", "OUTPUT", "FLOAT", [-1, 32]]]
_TEXT_IO = [["tokens", "INPUT", "INT64", [-1, -1]], ["embeddings", "OUTPUT", "FLOAT", [-1, 32]]]


@pytest.fixture
def trt_export(tiny_model, tmp_path, monkeypatch, cuda_stand_in):
    """Writes a trt export of the tiny model whose plans are I/O descriptions; returns open(image_io, text_io)."""
    knobs: dict = {}

    def make(image_io=_IMAGE_IO, text_io=_TEXT_IO, drop=None, **options):
        manifest = {"format": "trt", "precision": "fp32", "model": {"config": tiny_model.cfg.to_dict()},
                    "io": io_spec(tiny_model, 256),
                    "files": {"image": "image_encoder.onnx", "text": "text_encoder.onnx"},
                    "tensorrt": {"engines": {"image": "image.plan", "text": "text.plan"},
                                 "profiles": {"image": {"pixels": {"min": [1, 3, 64, 64], "max": [64, 3, 64, 64]}}}}}
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        (tmp_path / "image.plan").write_text(json.dumps({"tower": "image", "io": image_io}))
        (tmp_path / "text.plan").write_text(json.dumps({"tower": "text", "io": text_io}))
        if drop:
            (tmp_path / drop).unlink()
        return E.open_engine(tmp_path, device="cuda", **options)

    monkeypatch.setitem(sys.modules, "tensorrt", _runtime_trt(tiny_model, knobs, cuda_stand_in))
    make.knobs, make.events = knobs, cuda_stand_in
    return make


@pytest.mark.parametrize("batch", [1, 5])
def test_trt_engine_binds_io_by_the_plans_names_and_returns_its_buffers(trt_export, tiny_model, batch):
    eng = trt_export()
    assert eng.name == "tensorrt" and eng.has_order
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    emb, order = eng.encode_images_with_order(x)
    with torch.no_grad():
        ref, ref_order = tiny_model.encode_image_with_order(x)
    assert emb.dtype == torch.float32 and order.dtype == torch.int64 and order.shape == (batch, 17)
    assert (emb - ref).abs().max() < 1e-6 and torch.equal(order, ref_order)
    ctx = eng._contexts["image"]
    assert ctx.shapes == {"pixels": (batch, 3, 64, 64)}
    # The returned tensors are the buffers TensorRT wrote into: nothing is copied (to the host or anywhere).
    assert emb.data_ptr() == ctx.addresses["embeddings"] and order.data_ptr() == ctx.addresses["belief_order"]
    assert ctx.handles == [STREAM_HANDLE] and trt_export.events == ["begin", "run", "end"]  # enqueued between
    assert eng.encode_images(x).data_ptr() == ctx.addresses["embeddings"]
    tok = tokens_for([4, 9, 6, 12, 3][:batch], seed=batch)
    txt = eng.encode_texts(tok)
    assert eng._contexts["text"].shapes == {"tokens": (batch, 12 if batch > 1 else 4)}  # cut to the longest caption
    assert (txt - tiny_model.encode_text(tok).detach()).abs().max() < 1e-6


def test_trt_engine_reads_dtypes_from_the_plan(trt_export, tiny_model):
    """An fp16 embeddings output and int32 token input, as a plan may have them: bound as such, returned as fp32."""
    image_io = [["pixels", "INPUT", "FLOAT", [-1, 3, 64, 64]], ["embeddings", "OUTPUT", "HALF", [-1, 32]]]
    text_io = [["tokens", "INPUT", "INT32", [-1, -1]], ["embeddings", "OUTPUT", "FLOAT", [-1, 32]]]
    eng = trt_export(image_io, text_io)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    emb, order = eng.encode_images_with_order(x)
    assert order is None and not eng.has_order  # a single-output plan: no order, no error
    assert emb.dtype == torch.float32 and (emb - tiny_model.encode_image(x).detach()).abs().max() < 2e-3
    tok = tokens_for([5, 7])
    assert (eng.encode_texts(tok) - tiny_model.encode_text(tok).detach()).abs().max() < 1e-6


@pytest.mark.parametrize("image_io, match", [
    (_IMAGE_IO[:2] + [["output_0", "OUTPUT", "FLOAT", [-1, 32]]], "unexpected: output_0"),
    (_IMAGE_IO + [["logits", "OUTPUT", "FLOAT", [-1, 32]]], "unexpected: logits"),
    ([["input", "INPUT", "FLOAT", [-1, 3, 64, 64]], _IMAGE_IO[2]], r"inputs \['input'\], expected \['pixels'\]"),
    ([_IMAGE_IO[0], ["belief_order", "OUTPUT", "FLOAT", [-1, 17]], _IMAGE_IO[2]], "'belief_order' is torch.float32"),
    ([["pixels", "INPUT", "INT32", [-1, 3, 64, 64]], _IMAGE_IO[2]], "input 'pixels' is torch.int32, expected"),
    ([["pixels", "INPUT", "INT8", [-1, 3, 64, 64]], _IMAGE_IO[2]], "'pixels' has TensorRT type .*INT8.*cannot bind"),
])
def test_trt_plan_with_unexpected_io_is_refused(trt_export, image_io, match):
    with pytest.raises(PriorCLIPError, match=match) as e:
        trt_export(image_io)
    assert "\n" not in str(e.value) and "image.plan" in str(e.value)


@pytest.mark.parametrize("knob, value, match", [
    ("profile_max", 2, r"rejected input shape \[3, 3, 64, 64\] for 'pixels' \(profile min \[1, 3, 64, 64\], max "),
    ("refuse_address", ("pixels",), "refused the address of input 'pixels'"),
    ("refuse_address", ("belief_order",), "refused the address of output 'belief_order'"),
    ("fail_execute", True, "failed to enqueue"),
])
def test_trt_runtime_failures_are_one_error_line(trt_export, knob, value, match):
    eng = trt_export()
    trt_export.knobs[knob] = value
    with pytest.raises(PriorCLIPError, match=match) as e:
        eng.encode_images(torch.randn(3, 3, 64, 64))  # every output is bound, the order too, even when not asked
    assert "\n" not in str(e.value)
    if knob == "fail_execute":
        assert trt_export.events == ["begin", "run", "end"]


def test_trt_execute_that_raises_still_orders_the_callers_stream(trt_export):
    eng = trt_export()
    trt_export.knobs["raise_execute"] = True
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        eng.encode_images(torch.randn(2, 3, 64, 64))
    assert trt_export.events == ["begin", "run", "end"]


def test_missing_plan_is_one_error_line(trt_export):
    with pytest.raises(PriorCLIPError, match="text.plan: the TensorRT text plan is missing") as e:
        trt_export(drop="text.plan")
    assert "\n" not in str(e.value)


def test_trt_export_refuses_onnx_runtime_options(trt_export):
    with pytest.raises(PriorCLIPError, match="option io_binding does not apply to this trt export"):
        trt_export(io_binding=True)


def test_torch_dtypes_cover_only_what_check_io_accepts():
    assert set(T.torch_dtypes(types.SimpleNamespace(DataType=_DT)).values()) == {
        torch.float32, torch.float16, torch.int32, torch.int64}  # (the stand-in has no BF16)


def test_trt_engine_rejects_bad_inputs(trt_export):
    eng = trt_export()
    with pytest.raises(ValueError, match="float pixels"):
        eng.encode_images(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixels \[B,3,64,64\]"):
        eng.encode_images(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="int64 token ids"):
        eng.encode_texts(torch.zeros(1, 5))
