"""The service's load-time self-test: reading an export's reference (checksum, old exports, damage), the reference of
a service built from a model, and run_selftest's verdict and log line for a correct path and for broken ones
(un-normalised or swapped-channel pixels, other weights, PIR captions padded into one batch, a failing or
malformed embedding callable, the wrong precision)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from priorclip.encoder import TorchEncoder
from priorclip.errors import DataError
from priorclip.export.selftest import SELFTEST_FILE, probe_inputs, write_selftest
from priorclip.preprocess import preprocess_for
from priorclip.registry import create_model
from priorclip.serve.selftest import (SelfTestReference, load_reference, reference_from_model, run_selftest,
                                      selftest_dict)
from priorclip.transforms import OPENAI_MEAN, OPENAI_STD, open_image

from .conftest import randomise_bn


def _service(engine, pixels=lambda x: x, group_pir: bool = True):
    """A service's path over ``engine``: bytes -> open_image -> eval transform (then ``pixels``) -> one batch;
    captions -> tokens, PIR's grouped by token length (or, with ``group_pir=False``, padded into one batch)."""
    pre = preprocess_for(engine.config)
    size = pre.transform.image_size

    def images(blobs):
        px = torch.stack([pixels(pre.transform(open_image(b, draft_size=size))) for b in blobs])
        return engine.encode_images(px).numpy()

    def texts(caps):
        if pre.text_chunk is None or not group_pir:
            return engine.encode_texts(pre.tokenizer(caps)).numpy()
        toks = [pre.tokenizer([c]) for c in caps]
        out = np.zeros((len(caps), engine.config.embed_dim), np.float32)
        for n in {t.shape[1] for t in toks}:
            idx = [i for i, t in enumerate(toks) if t.shape[1] == n]
            out[idx] = engine.encode_texts(torch.cat([toks[i] for i in idx])).numpy()
        return out

    return images, texts


@pytest.fixture(scope="module")
def pir():
    torch.manual_seed(0)
    return create_model("pir-tiny")


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    return reference_from_model(tiny)


def _export_dir(folder, model):
    """A folder holding what load_reference reads: selftest.npz and a manifest with its entry."""
    folder.mkdir()
    entry = write_selftest(model, folder)
    (folder / "manifest.json").write_text(json.dumps({"model": {"config": model.cfg.to_dict()}, "selftest": entry}))
    return folder


def test_a_model_service_gets_the_reference_an_export_stores(tiny, tiny_ref, tmp_path):
    ref = load_reference(_export_dir(tmp_path / "e", tiny))
    images, captions = probe_inputs()
    assert tiny_ref.images == ref.images == images and tiny_ref.captions == ref.captions == captions
    np.testing.assert_array_equal(tiny_ref.image_emb, ref.image_emb)
    np.testing.assert_array_equal(tiny_ref.text_emb, ref.text_emb)
    # and it is the model's own embedding of the probes (not, say, of another model's or of zeros)
    enc = TorchEncoder(tiny)
    want = enc.encode_images(preprocess_for(tiny.cfg).transform.load(images[2])[None]).numpy()[0]
    np.testing.assert_allclose(ref.image_emb[2], want, atol=2e-6)
    assert "selftest.npz (fp32 torch, cpu)" in ref.source and "priorclip-tiny" in tiny_ref.source


def test_correct_path_passes_with_one_line(tiny, tiny_ref):
    result = run_selftest(tiny_ref, *_service(TorchEncoder(tiny)), "fp32")
    assert result.passed and result.threshold == 0.99999
    assert result.line == ("self-test passed: image cosine min 1.00000, text 1.00000 (fp32 needs >= 0.99999; "
                           "6 images, 6 captions)")
    d = selftest_dict(result)
    assert d["passed"] and len(d["image_cosines"]) == len(d["text_cosines"]) == 6 and json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("broken", ["bgr", "no-normalisation"])
def test_broken_preprocessing_fails_even_int8s_floor(tiny, tiny_ref, broken):
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    fix = (lambda x: x.flip(0)) if broken == "bgr" else (lambda x: x * std + mean)
    result = run_selftest(tiny_ref, *_service(TorchEncoder(tiny), fix), "int8")
    assert not result.passed and result.image_min_cosine < 0.9 and result.text_min_cosine > 0.99999
    assert result.line.startswith("self-test FAILED (int8): image cosine min ")
    assert "< 0.99 (worst: image " in result.line
    assert "not ready" in result.line and "\n" not in result.line


def test_other_weights_fail(tiny_ref):
    torch.manual_seed(1)
    other = create_model("priorclip-tiny")
    randomise_bn(other)
    result = run_selftest(tiny_ref, *_service(TorchEncoder(other)), "int8")
    assert not result.passed and result.image_min_cosine < 0.5 and result.text_min_cosine < 0.5
    assert "image cosine min" in result.line and "text cosine min" in result.line


def test_pir_passes_grouped_and_fails_padded(pir):
    ref = reference_from_model(pir)
    ok = run_selftest(ref, *_service(TorchEncoder(pir)), "fp32")
    assert ok.passed, ok.line
    padded = run_selftest(ref, *_service(TorchEncoder(pir), group_pir=False), "int8")
    assert not padded.passed and padded.image_min_cosine > 0.99999 and padded.text_min_cosine < 0.99
    assert "text cosine min" in padded.line and "(worst: caption " in padded.line


def test_low_precision_path_fails_a_stricter_precision(tiny, tiny_ref):
    """A bf16 autocast engine where fp32 was promised: its cosines are off by more than fp32's floor allows."""
    result = run_selftest(tiny_ref, *_service(TorchEncoder(copy.deepcopy(tiny), dtype=torch.bfloat16)), "fp32")
    assert not result.passed and 0.9 < result.image_min_cosine < 0.99999


def test_a_failing_or_malformed_path_fails_instead_of_raising(tiny_ref):
    good_img = lambda blobs: tiny_ref.image_emb.copy()  # noqa: E731
    good_txt = lambda caps: tiny_ref.text_emb.copy()  # noqa: E731
    assert run_selftest(tiny_ref, good_img, good_txt, "fp16").passed

    def decoder_broken(blobs):
        raise DataError("cannot decode image <bytes>: broken PNG\nsecond line")

    r = run_selftest(tiny_ref, decoder_broken, good_txt, "fp16")
    assert not r.passed and np.isnan(r.image_min_cosine) and r.text_min_cosine > 0.99999 and r.image_cosines == []
    assert "embedding the probe images raised DataError: cannot decode image <bytes>: broken PNG" in r.line
    assert "\n" not in r.line and selftest_dict(r)["image_min_cosine"] is None
    r = run_selftest(tiny_ref, lambda b: tiny_ref.image_emb[:5], good_txt, "fp16")  # one probe lost
    assert not r.passed and "came back as (5, 32), the reference is (6, 32)" in r.line

    def one_nan(blobs):
        out = tiny_ref.image_emb.copy()
        out[3] = np.nan
        return out

    r = run_selftest(tiny_ref, one_nan, good_txt, "fp16")
    assert not r.passed and np.isnan(r.image_cosines[3]) and "(worst: image 4 (L 128x128), 1/6 below)" in r.line
    assert json.dumps(selftest_dict(r), allow_nan=False)  # NaN becomes null: /readyz stays valid JSON
    r = run_selftest(tiny_ref, good_img, lambda caps: np.zeros_like(tiny_ref.text_emb), "fp16")
    assert not r.passed and "text cosine min nan" in r.line
    with pytest.raises(ValueError, match="unknown precision 'fp12'"):
        run_selftest(tiny_ref, good_img, good_txt, "fp12")


def test_one_bad_probe_fails_however_good_the_others(tiny_ref):
    """The rule is per probe, as the parity report's: an average over the probes would hide one bad path."""
    ref = tiny_ref.image_emb.astype(np.float64)
    other = ref[4] - (ref[4] @ ref[1]) * ref[1]  # orthogonal to probe 2's reference
    bent = ref.copy()
    bent[1] = 0.996 * ref[1] + np.sqrt(1 - 0.996**2) * other / np.linalg.norm(other)  # cosine 0.996
    r = run_selftest(tiny_ref, lambda b: bent, lambda c: tiny_ref.text_emb, "fp16")
    assert not r.passed and r.image_min_cosine == pytest.approx(0.996, abs=1e-6) and np.mean(r.image_cosines) > 0.999
    assert "(worst: image 2 (RGB 320x180), 1/6 below)" in r.line
    assert run_selftest(tiny_ref, lambda b: bent, lambda c: tiny_ref.text_emb, "bf16").passed  # bf16's floor: 0.995


def test_load_reference_old_tampered_and_damaged_exports(tiny, tmp_path):
    d = _export_dir(tmp_path / "e", tiny)
    manifest = json.loads((d / "manifest.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "selftest"}))
    assert load_reference(old) is None  # made before exports carried a reference: nothing to check against

    blob = bytearray((d / SELFTEST_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (d / SELFTEST_FILE).write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"selftest.npz: sha256 .* differs from the manifest's") as e:
        load_reference(d)
    assert "\n" not in str(e.value)

    def rewrite(**arrays):  # a file that matches its (updated) manifest entry but is not a good reference
        from priorclip.checkpoint import file_sha256

        np.savez(d / SELFTEST_FILE, **arrays)
        manifest["selftest"]["sha256"] = file_sha256(d / SELFTEST_FILE)
        (d / "manifest.json").write_text(json.dumps(manifest))

    good = load_reference(_export_dir(tmp_path / "f", tiny))
    rewrite(image_bytes=np.frombuffer(b"".join(good.images), np.uint8), captions=np.array(good.captions))
    with pytest.raises(DataError, match=r"unreadable self-test reference \(KeyError"):
        load_reference(d)
    lengths = np.array([len(b) for b in good.images])
    rewrite(image_bytes=np.frombuffer(b"".join(good.images), np.uint8), image_lengths=lengths[:5],
            captions=np.array(good.captions), image_emb=good.image_emb[:5], text_emb=good.text_emb)
    with pytest.raises(DataError, match=r"inconsistent self-test reference \(5 images"):
        load_reference(d)
    (d / SELFTEST_FILE).unlink()
    with pytest.raises(DataError, match="listed in the manifest is missing"):
        load_reference(d)


def test_reference_type_is_plain_data(tiny_ref):
    assert isinstance(tiny_ref, SelfTestReference)
    assert tiny_ref.image_emb.dtype == tiny_ref.text_emb.dtype == np.float32
    assert tiny_ref.image_emb.shape == tiny_ref.text_emb.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(tiny_ref.image_emb, axis=1), 1, atol=1e-6)
