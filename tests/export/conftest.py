"""Fixtures for the exporter tests: a seeded tiny model, its exports (built once per session) and a generated set.

Tests marked ``slow`` here (AOTInductor compiles, the full-config end-to-end export) run only with
``PRIORCLIP_SLOW=1`` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session")
def tiny_model():
    from priorclip import create_model

    torch.manual_seed(0)
    return create_model("priorclip-tiny").eval()


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    from priorclip.data import load_karpathy
    from priorclip.synthetic import make_sample

    j, imgs = make_sample(tmp_path_factory.mktemp("syn"), 16, size=72)
    return load_karpathy(j, imgs)


@pytest.fixture(scope="session")
def tiny_exports(tiny_model, synthetic_set, tmp_path_factory):
    """fp32 (with its parity report), fp16 and int8 (minmax) ONNX exports of the tiny model, made once."""
    from priorclip.export import export_model

    root = tmp_path_factory.mktemp("exports")
    out = {}
    cache: dict = {}
    for prec in ("fp32", "fp16", "int8"):
        out[prec] = export_model(tiny_model, root / prec, "onnx", prec, calib=synthetic_set if prec == "int8" else None,
                                 calib_method="minmax", progress=False, stats_cache=cache,
                                 parity_set=synthetic_set if prec == "fp32" else None)
    return out


STREAM_HANDLE = 777  # the raw handle the stand-in private stream hands to the runtime


@pytest.fixture
def cuda_stand_in(monkeypatch):
    """No GPU here: the engines' CUDA device becomes the CPU and their private stream a recorder.

    Returns the event list the recorder appends "begin" / "end" to; the stand-in runtimes (ONNX Runtime's
    ``run_with_iobinding``, TensorRT's ``execute_async_v3``) append "run" to the same list, so a test sees the order.
    """
    from priorclip.export import engines as E

    events: list[str] = []

    class Stream:
        handle = STREAM_HANDLE

        def __init__(self, device):
            self.device = device

        def begin(self):
            events.append("begin")

        def end(self):
            events.append("end")

    monkeypatch.setattr(E, "_cuda_device", lambda device, what: torch.device("cpu"))
    monkeypatch.setattr(E, "_CudaStream", Stream)
    return events


def tokens_for(lengths, context=77, seed=0):
    """Token batch [B, context]: SOT, random ids, EOT at the given lengths, zero padding."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(len(lengths), context, dtype=torch.int64)
    for i, n in enumerate(lengths):
        tok[i, 0] = 49406
        tok[i, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        tok[i, n - 1] = 49407
    return tok
