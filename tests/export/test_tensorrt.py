"""TensorRT path against a stand-in ``tensorrt`` module: strongly typed flag, one profile, timing cache, no
precision flags or calibrators. (No TensorRT exists on these machines; see the module docstring of
priorclip.export.tensorrt.)"""

from __future__ import annotations

import enum
import types

import pytest

from priorclip.export import tensorrt as T


class _Flag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


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
    assert T.network_flags(_fake_trt([])) == 1 << 5


def test_build_engine_sets_profile_and_timing_cache_but_no_precision_flags(tmp_path):
    log = []
    trt = _fake_trt(log)
    onnx_path = tmp_path / "image_encoder.onnx"
    onnx_path.write_bytes(b"")
    (tmp_path / "timing.cache").write_bytes(b"OLD")
    shapes = T.profile_shapes("image", 64, 77, 16)
    info = T.build_engine(onnx_path, tmp_path / "image_encoder.plan", shapes, tmp_path / "timing.cache", trt=trt)
    names = [c[0] for c in log]
    assert ("builder.create_network", (1 << 5,), {}) in log
    assert ("config.create_timing_cache", (b"OLD",), {}) in log
    assert ("profile.set_shape", ("pixels", (1, 3, 64, 64), (16, 3, 64, 64), (16, 3, 64, 64)), {}) in log
    assert "config.add_optimization_profile" in names
    assert not any(n in ("config.set_flag", "config.set_int8_calibrator") or "int8_calibrator" in n for n in names)
    assert (tmp_path / "image_encoder.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "timing.cache").read_bytes() == b"TC"
    assert info["plan"] == "image_encoder.plan"


def test_old_tensorrt_is_refused(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(T.TensorRTMissing, match="too old"):
        T.import_tensorrt()
