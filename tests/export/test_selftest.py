"""The self-test reference every export carries: deterministic probes, the manifest entry and its checksum, the fp32
reference recomputed independently (PIR caption by caption), and the check passing for real ONNX engines while
failing for a corrupted one, other weights, a swapped-channel preprocessing path or the wrong precision."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from priorclip.checkpoint import file_sha256
from priorclip.encoder import TorchEncoder
from priorclip.export import open_engine
from priorclip.export.selftest import PROBE_CAPTIONS, SELFTEST_FILE, probe_inputs, reference_embeddings
from priorclip.preprocess import preprocess_for
from priorclip.registry import create_model
from priorclip.retrieval import embed_texts
from priorclip.serve.selftest import load_reference, reference_from_model, run_selftest
from priorclip.transforms import RESIZE_SQUASH, EvalTransform
from priorclip.wordpiece import pir_tokenizer


def _service(engine, swap_channels: bool = False):
    """A service's full path over ``engine``: bytes -> decode + eval transform -> one image batch; captions ->
    tokens, one batch (PriorCLIP) or one batch per token length (PIR, so that no caption is padded)."""
    pre = preprocess_for(engine.config)

    def images(blobs):
        px = torch.stack([pre.transform.load(b) for b in blobs])
        return engine.encode_images(px.flip(1) if swap_channels else px).cpu().numpy()

    def texts(caps):
        if pre.text_chunk is None:
            return engine.encode_texts(pre.tokenizer(caps)).cpu().numpy()
        toks = [pre.tokenizer([c]) for c in caps]
        out = [None] * len(caps)
        for n in {t.shape[1] for t in toks}:
            idx = [i for i, t in enumerate(toks) if t.shape[1] == n]
            for i, e in zip(idx, engine.encode_texts(torch.cat([toks[i] for i in idx])).cpu().numpy()):
                out[i] = e
        return np.stack(out)

    return images, texts


def test_probes_are_deterministic_and_cover_every_png_mode():
    images, captions = probe_inputs()
    again, captions2 = probe_inputs()
    assert images == again and captions == captions2 == list(PROBE_CAPTIONS)
    opened = [Image.open(io.BytesIO(b)) for b in images]
    assert all(im.format == "PNG" for im in opened)
    assert {im.mode for im in opened} == {"RGB", "P", "L", "RGBA", "I;16"}
    assert len({im.size[0] / im.size[1] for im in opened}) >= 4  # square, wide, tall and in between
    assert len(set(images)) == len(images) and len(set(captions)) == len(captions) == 6
    assert all(len(c.split()) <= 30 for c in captions)  # within PIR's pre_caption cut: nothing is truncated
    assert len({pir_tokenizer(47)([c]).shape[1] for c in captions}) >= 4  # PIR's length groups are exercised


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_export_carries_the_fp32_reference(tiny_exports, tiny_model, precision):
    res = tiny_exports[precision]
    entry = json.loads((res.out_dir / "manifest.json").read_text())["selftest"]
    path = res.out_dir / SELFTEST_FILE
    assert entry == {"file": SELFTEST_FILE, "sha256": file_sha256(path), "n_images": 6, "n_captions": 6,
                     "reference": "fp32 torch, cpu"}
    ref = load_reference(res.out_dir)
    images, captions = probe_inputs()
    assert ref.images == images and ref.captions == captions
    # independent recomputation: the eval loader, the whole batch at once, retrieval's caption batching
    enc = TorchEncoder(tiny_model)
    img = enc.encode_images(torch.stack([EvalTransform(64).load(b) for b in images])).numpy()
    txt = embed_texts(enc, captions, progress=False).numpy()
    np.testing.assert_allclose(ref.image_emb, img, atol=2e-6)
    np.testing.assert_allclose(ref.text_emb, txt, atol=2e-6)


def test_pir_reference_embeds_each_caption_on_its_own():
    torch.manual_seed(0)
    model = create_model("pir-tiny")
    images, captions = probe_inputs()
    img, txt = reference_embeddings(model, images, captions)
    tr, tok = EvalTransform(56, RESIZE_SQUASH), pir_tokenizer(47)
    with torch.inference_mode():
        want_img = torch.cat([model.encode_image(tr.load(b)[None]) for b in images]).numpy()
        want_txt = torch.cat([model.encode_text(tok([c])) for c in captions]).numpy()
        padded = model.encode_text(tok(captions)).numpy()  # one batch, padded to the longest: not the same
    np.testing.assert_allclose(img, want_img, atol=2e-6)
    np.testing.assert_allclose(txt, want_txt, atol=2e-6)
    assert np.abs(padded - want_txt).max() > 1e-2


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_selftest_passes_for_the_real_onnx_engine(tiny_exports, precision):
    engine = open_engine(tiny_exports[precision].out_dir)
    result = run_selftest(load_reference(tiny_exports[precision].out_dir), *_service(engine), precision)
    assert result.passed, result.line
    assert result.line.startswith("self-test passed:") and "\n" not in result.line
    assert len(result.image_cosines) == len(result.text_cosines) == 6
    assert min(result.image_cosines) == result.image_min_cosine >= result.threshold


def test_selftest_fails_for_a_corrupted_engine_file(tiny_exports, tmp_path):
    """A weight of the image graph altered after export (the manifest and its reference untouched)."""
    import onnx

    from priorclip.export.graph import save_model

    out = tmp_path / "corrupt"
    shutil.copytree(tiny_exports["fp32"].out_dir, out)
    g = onnx.load_model(str(out / "image_encoder.onnx"), load_external_data=True)
    w = next(t for t in g.graph.initializer if t.name == "model.visual.conv1.weight")  # the patch embedding
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w)[::-1].copy(), w.name))
    save_model(g, out / "image_encoder.onnx")
    result = run_selftest(load_reference(out), *_service(open_engine(out)), "fp32")
    assert not result.passed and result.image_min_cosine < 0.9
    assert result.text_min_cosine > 0.99999  # the text graph is intact: the line names the image tower only
    assert result.line.startswith("self-test FAILED (fp32): image cosine min") and "text cosine" not in result.line
    assert "not ready" in result.line and "\n" not in result.line


def test_selftest_fails_for_other_weights_swapped_channels_and_the_wrong_precision(tiny_exports):
    engine = open_engine(tiny_exports["fp32"].out_dir)
    ref = load_reference(tiny_exports["fp32"].out_dir)
    torch.manual_seed(1)
    stale = run_selftest(reference_from_model(create_model("priorclip-tiny")), *_service(engine), "fp32")
    assert not stale.passed and stale.image_min_cosine < 0.5 and stale.text_min_cosine < 0.5
    bgr = run_selftest(ref, *_service(engine, swap_channels=True), "int8")  # fails even the loosest floor
    assert not bgr.passed and bgr.image_min_cosine < 0.9 and bgr.text_min_cosine > 0.99999
    # an int8 engine served as fp32: within int8's floor (above), outside fp32's
    int8 = run_selftest(load_reference(tiny_exports["int8"].out_dir),
                        *_service(open_engine(tiny_exports["int8"].out_dir)), "fp32")
    assert not int8.passed and 0.99 < int8.image_min_cosine < 0.99999 and "< 0.99999" in int8.line


@pytest.mark.parametrize("fmt", ["trt", "aoti"])
def test_trt_and_aoti_manifests_carry_it_too(tiny_model, tmp_path, monkeypatch, fmt):
    """The graph writers are stand-ins (the ONNX path is the real one above): what is checked is that the manifest a
    trt export writes early, without TensorRT, and an aoti export's both hold the entry."""
    from priorclip.export import aoti, api, export_model
    from priorclip.export import tensorrt as T

    def fake_graphs(out_dir):
        for t in ("image", "text"):
            (out_dir / f"{t}_encoder.onnx").write_bytes(b"stand-in")
        return {t: out_dir / f"{t}_encoder.onnx" for t in ("image", "text")}

    monkeypatch.setattr(api, "_export_onnx", lambda model, out_dir, *a, **k: (fake_graphs(out_dir),
                                                                               {"opset": {"image": 18, "text": 18}}))
    monkeypatch.setattr(aoti, "export_aoti", lambda model, out_dir, *a: fake_graphs(out_dir))

    def no_trt():
        raise T.TensorRTMissing("TensorRT is not installed (stand-in)")

    monkeypatch.setattr(T, "import_tensorrt", no_trt)
    if fmt == "trt":
        with pytest.raises(T.TensorRTMissing):
            export_model(tiny_model, tmp_path, fmt, progress=False)
    else:
        export_model(tiny_model, tmp_path, fmt, progress=False)
    entry = json.loads((tmp_path / "manifest.json").read_text())["selftest"]
    assert entry["sha256"] == file_sha256(tmp_path / SELFTEST_FILE)
    ref = load_reference(tmp_path)
    images, captions = probe_inputs()
    want_img, want_txt = reference_embeddings(tiny_model, images, captions)
    assert ref.images == images and np.array_equal(ref.image_emb, want_img) and np.array_equal(ref.text_emb, want_txt)
