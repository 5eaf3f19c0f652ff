"""PIR's ``fused`` engine (priorclip.serve.fused_pir) against the eager model: embeddings, belief order, bad inputs.

On CPU the PAE dispatchers run their plain-torch references, so these tests check the engine's own work — folded
BatchNorm, folded query mappings, VIR's single query, the last blocks' row-0 pruning, ids run as given, the padding
mask — to float32 rounding. The kernels themselves are checked in tests/kernels; on a GPU (``-m gpu``) the engine
runs them, in bf16 and under CUDA graphs, against the fp32 reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from priorclip.errors import PriorCLIPError
from priorclip.preprocess import preprocess_for
from priorclip.registry import create_model
from priorclip.serve.engines import create_engine
from priorclip.serve.fused_pir import FusedPIREncoder, fold_resnet

CAPTIONS = ["many planes are parked next to a long building in an airport", "a river",
            "several green trees are around a white church with a parking lot", "dense residential area"]


def _busy(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affines and LayerNorm affines: defaults (0/1) would hide a missed fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def pir():
    torch.manual_seed(0)
    return _busy(create_model("pir-tiny"), 1)


def _pixels(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def test_folded_prior_equals_the_eval_prior(pir):
    x = _pixels(3, 5).double()
    folded = fold_resnet(pir.conv_encoder)
    want = copy.deepcopy(pir.conv_encoder).double()(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("b", [1, 3])
def test_images_match_the_model_with_the_same_order(pir, b):
    eng = create_engine("fused", pir, "fp32", "cpu")
    assert isinstance(eng.inner, FusedPIREncoder) and eng.metadata()["kernels"] == "reference"
    x = _pixels(b, b)
    got, order = eng.encode_images_with_order(x)
    with torch.no_grad():
        want, want_order = pir.encode_image_with_order(x)
    assert got.shape == (b, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert torch.equal(order, want_order)


def test_texts_run_as_tokenised_at_every_length(pir):
    enc = FusedPIREncoder(pir, "cpu", torch.float32)
    for chunk in (CAPTIONS, CAPTIONS[1:2], CAPTIONS[:2]):  # the batch's longest caption sets the length
        (tokens,) = list(preprocess_for(pir.cfg).text_batches(chunk, 8))
        with torch.no_grad():
            torch.testing.assert_close(enc.encode_texts(tokens), pir.encode_text(tokens), rtol=0, atol=2e-6)


def test_masked_padding_variant():
    torch.manual_seed(0)
    model = _busy(_masked(), 2)
    (tokens,) = list(preprocess_for(model.cfg).text_batches(CAPTIONS, 8))
    enc = FusedPIREncoder(model, "cpu", torch.float32)
    with torch.no_grad():
        want = model.encode_text(tokens)
        torch.testing.assert_close(enc.encode_texts(tokens), want, rtol=0, atol=2e-6)
        # masked: a caption's embedding no longer depends on how far its batch pads it
        short = enc.encode_texts(torch.nn.functional.pad(tokens[1:2], (0, 5)))
    torch.testing.assert_close(short[0], want[1], rtol=0, atol=2e-6)


def _masked():
    return create_model("pir-tiny", mask_padding=True)


def test_bf16_on_cpu_stays_close(pir):
    eng = create_engine("fused", pir, "bf16", "cpu")
    x = _pixels(2, 9)
    (tokens,) = list(preprocess_for(pir.cfg).text_batches(CAPTIONS, 8))
    with torch.no_grad():
        cos_i = torch.nn.functional.cosine_similarity(eng.encode_images(x), pir.encode_image(x))
        cos_t = torch.nn.functional.cosine_similarity(eng.encode_texts(tokens), pir.encode_text(tokens))
    assert cos_i.min() > 0.99 and cos_t.min() > 0.99


def test_bad_inputs_and_refused_options(pir):
    enc = FusedPIREncoder(pir, "cpu", torch.float32)
    for bad, match in ((torch.zeros(2, 3, 32, 32), r"pixels \[B,3,56,56\]"),
                       (torch.zeros(3, 56, 56), r"pixels \[B,3,56,56\]")):
        with pytest.raises(ValueError, match=match):
            enc.encode_images(bad)
    for bad in (torch.zeros(2, 48, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 5)):
        with pytest.raises(ValueError, match="integer token ids"):
            enc.encode_texts(bad)
    with pytest.raises(ValueError, match=r"in \[0, 30522\), got range \[-1, 101\]"):
        enc.encode_texts(torch.tensor([[101, -1]]))
    assert enc.encode_texts(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 32)
    assert enc.encode_images(torch.zeros(0, 3, 56, 56)).shape == (0, 32)
    with pytest.raises(PriorCLIPError, match="fused fused_norms runs the open-domain PriorCLIP only"):
        create_engine("fused", pir, "fp32", "cpu", fused_norms=True)
    with pytest.raises(PriorCLIPError, match="fused fp8 runs the open-domain PriorCLIP only"):
        create_engine("fused", pir, "fp8", "cpu", calib=object())
    with pytest.raises(PriorCLIPError, match="runs PIR models"):
        FusedPIREncoder(create_model("priorclip-tiny"), "cpu", torch.float32)


def test_caller_model_is_untouched(pir):
    before = {k: v.clone() for k, v in pir.state_dict().items()}
    FusedPIREncoder(pir, "cpu", torch.bfloat16)
    after = pir.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_engine_runs_the_kernels_under_cuda_graphs(pir, precision):
    """On a GPU: the Triton kernels, CUDA graphs (batch buckets), against the fp32 eager reference."""
    eng = create_engine("fused", pir, precision, "cuda")
    assert eng.metadata()["kernels"] == "fused" and eng.metadata()["cuda_graphs"] is True
    x = _pixels(5, 3)
    (tokens,) = list(preprocess_for(pir.cfg).text_batches(CAPTIONS, 8))
    with torch.no_grad():
        want_i, want_order = pir.cpu().encode_image_with_order(x)
        want_t = pir.encode_text(tokens)
    for _ in range(2):  # capture, then replay
        got_i, order = eng.encode_images_with_order(x.cuda())
        got_t = eng.encode_texts(tokens.cuda())
    floor = 0.9999 if precision == "fp32" else 0.99
    assert torch.nn.functional.cosine_similarity(got_i.cpu(), want_i).min() > floor
    assert torch.nn.functional.cosine_similarity(got_t.cpu(), want_t).min() > floor
    if precision == "fp32":
        assert torch.equal(order.cpu(), want_order)



def test_one_cuda_graph_per_batch_and_caption_length(pir, fake_cuda_graphs):
    """No GPU here: torch.cuda's graph API is replaced by recording stand-ins (tests/conftest.py), so the
    capture/replay path runs. PIR's texts run at their own length, so each (batch, length) is a graph of its own; a
    replay copies the new ids into the graph's static input."""
    log = fake_cuda_graphs
    enc = FusedPIREncoder(pir, "cpu", torch.float32)
    enc._graphs.enabled = True
    pre = preprocess_for(pir.cfg)
    (a,), (b,) = (list(pre.text_batches(caps, 8)) for caps in (CAPTIONS[:2], CAPTIONS[1::2]))
    assert a.shape[1] != b.shape[1]
    for ids in (a, b):  # first call of a key: captured, outputs from the capture run
        with torch.no_grad():
            torch.testing.assert_close(enc.encode_texts(ids), pir.encode_text(ids), rtol=0, atol=2e-6)
    enc.encode_texts(a[[1, 0]])  # same (batch, length): replayed
    assert (log["captures"], log["replays"]) == (2, 3)
    assert set(enc._graphs._graphs) == {("text", 2, a.shape[1]), ("text", 2, b.shape[1])}
    assert torch.equal(enc._graphs._graphs[("text", 2, a.shape[1])][1][0], a[[1, 0]])


@pytest.mark.gpu
def test_model_dispatches_the_filter_kernel_and_compiles_whole_on_cuda(pir):
    """On a GPU the PIR model itself runs VIR's filter kernel (as PriorCLIP runs its gate kernel), and
    torch.compile(fullgraph=True) traces the op without a graph break; fp32 keeps the reference's order."""
    model = copy.deepcopy(pir).cuda()
    x = _pixels(3, 7).cuda()
    with torch.no_grad():
        want, want_order = model.encode_image_with_order(x, kernels="reference")
        got, order = model.encode_image_with_order(x)
        compiled, compiled_order = torch.compile(model.encode_image_with_order, fullgraph=True)(x)
    for emb, o in ((got, order), (compiled, compiled_order)):
        assert (emb - want).abs().max().item() <= 1e-5 and torch.equal(o, want_order)
