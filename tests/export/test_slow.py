"""Slow checks (PRIORCLIP_SLOW=1): AOTInductor packages, and the full config end to end."""

from __future__ import annotations

import pytest
import torch

from priorclip.encoder import TorchEncoder
from priorclip.export import export_model, open_engine

from .conftest import tokens_for


@pytest.mark.slow
def test_aoti_package_matches_reference(tiny_model, tmp_path):
    res = export_model(tiny_model, tmp_path, "aoti", "fp32", progress=False, max_batch=16)
    assert res.manifest["aoti"]["device"] == "cpu"
    eng = open_engine(tmp_path)
    ref = TorchEncoder(tiny_model)
    for b in (1, 7):
        x = torch.randn(b, 3, 64, 64)
        assert (eng.encode_images(x) - ref.encode_images(x)).abs().max() < 1e-4
    tok = tokens_for([5, 9, 20])
    assert (eng.encode_texts(tok) - ref.encode_texts(tok)).abs().max() < 1e-4


@pytest.mark.slow
def test_full_config_fp16_export(tmp_path):
    from priorclip import create_model

    torch.manual_seed(0)
    m = create_model("priorclip-vit-b32")
    export_model(m, tmp_path, "onnx", "fp16", progress=False)
    eng = open_engine(tmp_path)
    ref = TorchEncoder(m)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.cosine_similarity(eng.encode_images(x), ref.encode_images(x))
    # Mean, not min: with random weights a few items flip belief ranks under any fp16 rounding (fp16.py NOTE).
    assert cos.mean() > 0.999
    tok = tokens_for([5, 9, 20, 77])
    assert torch.nn.functional.cosine_similarity(eng.encode_texts(tok), ref.encode_texts(tok)).min() > 0.999
