"""The engine interface and its registry, on the tiny model on CPU."""

from __future__ import annotations

import pytest
import torch

from priorclip.encoder import Encoder, TorchEncoder
from priorclip.errors import PriorCLIPError
from priorclip.registry import create_model
from priorclip.serve.engines import BACKENDS, Engine, available_backends, create_engine
from priorclip.tokenizer import tokenize


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("priorclip-tiny")


@pytest.fixture(scope="module")
def inputs(tiny):
    torch.manual_seed(1)
    s = tiny.cfg.vision.image_size
    return torch.randn(3, 3, s, s), tokenize(["a red roof near a lake", "farmland", "a road crossing in a desert area"])


def _reference(tiny, inputs):
    enc = TorchEncoder(tiny)
    return enc.encode_images(inputs[0]), enc.encode_texts(inputs[1])


def test_registry_reports_every_backend_with_a_reason():
    avail = available_backends("cpu")
    assert set(avail) == set(BACKENDS)
    assert avail["torch"] is None
    assert "cpu" in avail["tensorrt"] or "tensorrt" in avail["tensorrt"]
    for name, reason in avail.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_torch_engine_matches_the_reference_encoder(tiny, inputs):
    eng = create_engine("torch", tiny, "fp32", "cpu")
    assert isinstance(eng, Engine) and isinstance(eng, Encoder)
    assert eng.name == "torch/fp32" and eng.metadata()["backend"] == "torch"
    img, txt = eng.encode_images(inputs[0]), eng.encode_texts(inputs[1])
    ref_img, ref_txt = _reference(tiny, inputs)
    assert img.dtype == txt.dtype == torch.float32
    assert img.shape == (3, tiny.cfg.embed_dim) and txt.shape == (3, tiny.cfg.embed_dim)
    torch.testing.assert_close(img, ref_img)
    torch.testing.assert_close(txt, ref_txt)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))


def test_bf16_engine_is_close_and_normalised(tiny, inputs):
    eng = create_engine("torch", tiny, "bf16", "cpu")
    img = eng.encode_images(inputs[0])
    ref_img, _ = _reference(tiny, inputs)
    assert img.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(img, ref_img).min() > 0.95


@pytest.fixture(scope="module")
def parity_set(tmp_path_factory):
    from priorclip.data import load_karpathy
    from priorclip.synthetic import make_sample

    j, imgs = make_sample(tmp_path_factory.mktemp("parity"), 8, size=72)
    return load_karpathy(j, imgs)


@pytest.mark.parametrize("backend", ["onnxruntime"])  # aoti: in test_cli's slow test
def test_exported_engines_when_export_is_built(tiny, inputs, backend, tmp_path, parity_set):
    reason = available_backends("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    from priorclip.export.parity import reference_embed

    cached = reference_embed(TorchEncoder(tiny), parity_set, 8)  # (image, text, belief order), as the bench caches
    eng = create_engine(backend, tiny, "fp32", "cpu", workdir=tmp_path, parity_set=parity_set,
                        reference_embeddings=cached)
    parity = eng.metadata()["export_parity"]  # the export was checked on the set it was given
    assert parity["passed"] and parity["n_images"] == len(parity_set.images) == 8
    assert parity["belief_order"]["flipped"] == 0 and parity["reference_device"] == "cached"
    ref_img, ref_txt = _reference(tiny, inputs)
    img, txt = eng.encode_images(inputs[0]), eng.encode_texts(inputs[1])
    emb, order = eng.encode_images_with_order(inputs[0])
    assert torch.equal(order, TorchEncoder(tiny).encode_images_with_order(inputs[0])[1]) and torch.equal(emb, img)
    assert eng.metadata()["export_dir"].startswith(str(tmp_path))
    assert torch.nn.functional.cosine_similarity(img, ref_img).min() > 0.9999
    assert torch.nn.functional.cosine_similarity(txt, ref_txt).min() > 0.9999
    one = eng.encode_images(inputs[0][:1])  # batch 1 works through every backend
    assert torch.nn.functional.cosine_similarity(one, ref_img[:1]).item() > 0.9999


def test_exporting_backends_are_not_forced_past_failing_parity(tiny, monkeypatch, tmp_path):
    """create_engine hands parity_set / reference_embeddings to export_model with force=False, and its ExportError
    reaches the caller (the benchmark records the engine as failed with that reason)."""
    import priorclip.export as X
    from priorclip.export.api import ExportError

    calls = []

    def export_model(model, out_dir, **kw):
        calls.append(kw)
        if not kw["force"] and kw["parity_set"] is not None:
            raise ExportError("parity outside the fp32 tolerance: image cosine min 0.9 < 0.99999")
        raise AssertionError("a benchmark export must be checked and never forced")

    monkeypatch.setattr(X, "export_model", export_model, raising=False)
    monkeypatch.setattr(X, "open_engine", lambda *a, **k: pytest.fail("a failing export must not be opened"),
                        raising=False)
    with pytest.raises(ExportError, match="parity outside the fp32 tolerance"):
        create_engine("onnxruntime", tiny, "fp32", "cpu", workdir=tmp_path, parity_set="SET",
                      reference_embeddings="REF")
    assert calls[0]["parity_set"] == "SET" and calls[0]["reference_embeddings"] == "REF" and not calls[0]["force"]


def test_engine_wrapper_passes_the_order_through_buckets(tiny, inputs):
    eng = create_engine("torch", tiny, "fp32", "cpu")
    emb, order = eng.encode_images_with_order(inputs[0])
    want_emb, want_order = TorchEncoder(tiny).encode_images_with_order(inputs[0])
    torch.testing.assert_close(emb, want_emb)
    assert torch.equal(order, want_order) and order.shape == (3, tiny.cfg.vision.num_tokens)
    bucketed = Engine(TorchEncoder(tiny), "torch", "fp32", "cpu", fixed_text_length=False, batch_buckets=(2,))
    emb2, order2 = bucketed.encode_images_with_order(inputs[0])  # 3 rows = 2 + 1 padded to 2
    torch.testing.assert_close(emb2, want_emb)
    assert torch.equal(order2, want_order)
    no_order = Engine(_Recorder(), "fake", "fp32", "cpu", fixed_text_length=True)
    assert no_order.encode_images_with_order(torch.randn(2, 3, 4, 4))[1] is None


def test_bad_requests_are_one_line_errors(tiny):
    with pytest.raises(PriorCLIPError, match="unknown backend 'nope'"):
        create_engine("nope", tiny, "fp32", "cpu")
    with pytest.raises(PriorCLIPError, match="does not run int8"):
        create_engine("torch", tiny, "int8", "cpu")
    with pytest.raises(PriorCLIPError, match="not available"):
        create_engine("tensorrt", tiny, "fp16", "cpu")


class _Recorder:
    image_size, context_length = 4, 77

    def __init__(self):
        self.shapes = []

    def encode_images(self, x):
        self.shapes.append(tuple(x.shape))
        return torch.nn.functional.normalize(x.flatten(1)[:, :5] + 1.0, dim=1)

    def encode_texts(self, t):
        self.shapes.append(tuple(t.shape))
        return torch.nn.functional.normalize(t[:, :5].float() + 1.0, dim=1)


def test_batch_buckets_pad_and_split_without_changing_rows():
    inner = _Recorder()
    eng = Engine(inner, "fake", "fp32", "cpu", fixed_text_length=True, batch_buckets=(1, 4, 8))
    x = torch.randn(11, 3, 4, 4)
    out = eng.encode_images(x)
    assert [s[0] for s in inner.shapes] == [8, 4]  # 11 = 8 + 3 padded to 4
    torch.testing.assert_close(out, _Recorder().encode_images(x))
    inner.shapes.clear()
    eng.encode_texts(torch.ones(2, 10, dtype=torch.long))
    assert inner.shapes == [(4, 77)]  # fixed-length engines get the full context


@pytest.mark.slow
def test_compiled_engine_matches_eager_on_cpu(tiny, inputs):
    """torch.compile on CPU takes ~10-40 s for the tiny model on a 2-core machine (marked slow)."""
    if available_backends("cpu")["torch-compile"] is not None:
        pytest.skip(available_backends("cpu")["torch-compile"])
    from torch._dynamo.utils import counters

    eng = create_engine("torch-compile", tiny, "fp32", "cpu", batch_buckets=(3,))
    assert eng.fixed_text_length and eng.metadata()["compile_mode"] == "default"
    ref_img, ref_txt = _reference(tiny, inputs)
    img, txt = eng.encode_images(inputs[0]), eng.encode_texts(inputs[1])
    assert torch.nn.functional.cosine_similarity(img, ref_img).min() > 0.9999
    assert torch.nn.functional.cosine_similarity(txt, ref_txt).min() > 0.9999
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter is live (the check below is not vacuous)
    emb, order = eng.encode_images_with_order(inputs[0])  # a parity pass: the same compiled image graph
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(order, TorchEncoder(tiny).encode_images_with_order(inputs[0])[1])
    torch.testing.assert_close(emb, img)
    one = eng.encode_images(inputs[0][:1])  # padded up to the bucket of 3: no new graph, same row
    assert torch.nn.functional.cosine_similarity(one, ref_img[:1]).item() > 0.9999
