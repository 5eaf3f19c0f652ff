"""FP8 (e4m3) image path of the fused engine (priorclip.serve.fp8), on CPU: torch._scaled_mm emulates the GEMM.

Tolerances: against a float64 evaluation of the same quantise-dequantise maths, Fp8Linear differs only by its bf16
output and bias add (2^-7 of the output range). Against the unquantised linear, e4m3's 3-bit mantissa rounds each
operand by up to 2^-4 relative, so the output's relative error is a few percent (measured 3.6 %; bound 2^-4). The
engine's bar is the task's: cosine >= 0.99 per item against the fp32 reference on the tiny model, on images that
were not in the calibration set (measured: min 0.998; nearly all of it from the ViT GEMMs, the prior's FP8 convolutions
cost about 1e-4). Over other seeds of the random tiny model the minimum ranged 0.986-0.998 (bf16 alone: 0.991-0.9999),
the low items being those whose belief order flipped, so the bar is checked on this fixture's model only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from priorclip.data import load_karpathy
from priorclip.encoder import TorchEncoder
from priorclip.errors import PriorCLIPError
from priorclip.retrieval import iter_image_batches
from priorclip.serve import fp8 as fp8_mod
from priorclip.serve.engines import BACKENDS, create_engine
from priorclip.serve.fp8 import E4M3, Fp8Config, Fp8Conv1x1, Fp8Linear, shape_unsupported
from priorclip.serve.fused import FoldedConv, FusedEncoder, Linear
from priorclip.synthetic import make_sample
from priorclip.tokenizer import tokenize
from priorclip.transforms import EvalTransform

E4M3_MAX = 448.0


@pytest.fixture(autouse=True)
def cublaslt(monkeypatch):
    """torch._scaled_mm held to what cuBLASLt's rowwise FP8 GEMM accepts on Hopper (the CPU build is laxer): no empty
    operand, K and N multiples of 16, A row-major and B column-major e4m3, fp32 scales [M, 1] and [1, N]
    (contiguous), bf16 out. Returns the (M, K, N) of each call."""
    real, calls = torch._scaled_mm, []

    def strict(a, b, scale_a, scale_b, out_dtype=None, **kw):
        (m, k), n = a.shape, b.shape[1]
        assert m > 0 and k % 16 == 0 and n % 16 == 0, (m, k, n)
        assert a.dtype == b.dtype == E4M3 and a.is_contiguous() and b.t().is_contiguous()
        assert scale_a.shape == (m, 1) and scale_b.shape == (1, n) and scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.is_contiguous() and scale_b.is_contiguous() and out_dtype == torch.bfloat16
        calls.append((m, k, n))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", strict)
    return calls


def _q(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 quantise-dequantise: t / scale saturated at ±448, rounded to e4m3, times scale."""
    return (t.double() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).double() * scale


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, amax: float) -> torch.Tensor:
    """Fp8Linear's maths in float64, scales derived here from the weight and amax (as fp32 values, as the GEMM
    takes them)."""
    w_scale = (w.double().abs().amax(dim=1, keepdim=True) / E4M3_MAX).float().double()  # [N, 1]
    x_scale = torch.tensor(amax / E4M3_MAX, dtype=torch.float32).double()
    return _q(x, x_scale) @ _q(w, w_scale).t() + b.bfloat16().double()


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows 4 decades apart: per-row scales matter
    return w, torch.randn(48)


def test_fp8_linear_is_the_quantise_dequantise_maths(layer):
    w, b = layer
    torch.manual_seed(1)
    x = torch.randn(5, 7, 32).bfloat16()
    amax = x.abs().max().item()
    lin = Fp8Linear(w, b, amax)
    assert lin.w_q.dtype == E4M3 and lin.w_scale.shape == (1, 48) and lin.bias.dtype == torch.bfloat16
    y = lin(x)
    assert y.shape == (5, 7, 48) and y.dtype == torch.bfloat16
    want = _reference(x, w, b, amax)
    # per output channel: the small rows would be lost to a per-tensor weight scale
    err = ((y.double() - want).abs() / want.abs().amax(dim=(0, 1))).max().item()
    assert err <= 2**-7, err
    plain = F.linear(x.float(), w, b)
    rel = ((y.float() - plain).norm() / plain.norm()).item()
    assert 2**-8 <= rel <= 2**-4, rel  # e4m3-sized: clearly quantised, and no worse than its 3-bit mantissa


def test_fp8_linear_saturates_out_of_range_activations(layer):
    w, b = layer
    torch.manual_seed(2)
    x = torch.randn(6, 32).bfloat16()
    x[0, :4] = torch.tensor([50.0, -50.0, 1e4, -1e30])  # far beyond the calibrated range
    lin = Fp8Linear(w, b, amax=3.0)
    q = lin.quantize(x.float()).float()
    assert q[0, :4].tolist() == [448.0, -448.0, 448.0, -448.0] and torch.isfinite(q).all()
    y = lin(x)
    assert torch.isfinite(y).all()
    want = _reference(x, w, b, 3.0)  # the reference saturates at ±448 * x_scale = ±3
    assert ((y.double() - want).abs() / want.abs().amax(dim=0)).max().item() <= 2**-7


def test_fp8_linear_empty_batch(layer, cublaslt):
    lin = Fp8Linear(*layer, amax=1.0)
    assert lin(torch.empty(0, 32, dtype=torch.bfloat16)).shape == (0, 48)
    out = lin(torch.empty(2, 0, 32, dtype=torch.bfloat16))
    assert out.shape == (2, 0, 48) and out.dtype == torch.bfloat16
    assert cublaslt == []  # never handed to the GEMM


def test_shape_rule_for_cublaslt():
    assert shape_unsupported(64, 192) is None
    assert "multiples of 16" in shape_unsupported(8, 32) and shape_unsupported(32, 8) is not None


def test_1x1_conv_as_gemm_over_the_channels_last_view(tiny):
    blk = tiny.res_visual.layer2[0]
    folded = FoldedConv.fold(blk.conv3, blk.bn3, torch.device("cpu"), torch.float32)  # 16 -> 64 channels
    torch.manual_seed(3)
    x = torch.randn(2, 16, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 16)
    assert rows.data_ptr() == x.data_ptr() and rows._base is not None  # a view: no copy of the map
    amax = x.abs().max().item()
    lin = Fp8Linear(folded.weight[:, :, 0, 0], folded.bias, amax)
    y = Fp8Conv1x1(lin)(x)
    assert y.shape == (2, 64, 8, 8) and y.is_contiguous(memory_format=torch.channels_last)
    x_dq = _q(x, torch.tensor(amax / E4M3_MAX, dtype=torch.float32).double())
    want = F.conv2d(x_dq, lin.dequantized_weight().double()[:, :, None, None], lin.bias.double())
    assert (y.double() - want).abs().max().item() <= 2**-7 * want.abs().max().item()


# ------------------------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    json_path, img_dir = make_sample(tmp_path_factory.mktemp("fp8-calib"), n_images=12, size=64, seed=0)
    return load_karpathy(json_path, img_dir, "test")


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    """Held-out images (another seed), preprocessed as the engines see them."""
    json_path, img_dir = make_sample(tmp_path_factory.mktemp("fp8-eval"), n_images=10, size=64, seed=1)
    return next(iter_image_batches(load_karpathy(json_path, img_dir, "test").images, EvalTransform(64), 16))


@pytest.fixture(scope="module")
def enc(tiny, calib):
    return FusedEncoder(tiny, "cpu", torch.bfloat16, fp8=Fp8Config(calib))


def test_fp8_engine_is_close_to_the_fp32_reference(tiny, enc, pixels, cublaslt):
    ref = TorchEncoder(tiny, "cpu", torch.float32)
    bf16 = FusedEncoder(tiny, "cpu", torch.bfloat16)
    before = len(cublaslt)
    img = enc.encode_images(pixels)
    assert len(cublaslt) - before == 18  # one FP8 GEMM per FP8 layer, each within cuBLASLt's rules
    assert img.dtype == torch.float32 and img.shape == (10, 32)
    cos = F.cosine_similarity(img, ref.encode_images(pixels))
    assert cos.min().item() >= 0.99, cos
    assert not torch.equal(img, bf16.encode_images(pixels))  # the FP8 GEMMs really ran
    tokens = tokenize(["farmland", "a red roof near a lake", " ".join(["bridge"] * 90)])
    assert torch.equal(enc.encode_texts(tokens), bf16.encode_texts(tokens))  # the text tower is untouched


def test_fp8_layer_plan_and_report(enc, calib):
    rep = enc.fp8
    assert isinstance(enc.vis_blocks[0].qkv, Fp8Linear) and isinstance(enc.vis_blocks[-1].kv, Fp8Linear)
    assert isinstance(enc.prior.blocks[1].c1, Fp8Conv1x1) and isinstance(enc.prior.blocks[1].down, Fp8Conv1x1)
    assert isinstance(enc.prior.blocks[1].c2, FoldedConv)  # 3x3: bf16
    assert enc.prior.stem[0].weight.dtype == torch.bfloat16 and enc.conv1.dtype == torch.bfloat16
    assert rep["fp8_layers"] == ["vit.0.qkv", "vit.0.out", "vit.0.fc", "vit.0.proj",
                                 "vit.1.q", "vit.1.kv", "vit.1.out", "vit.1.fc", "vit.1.proj",
                                 *[f"prior.layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv1", "conv3", "down")]]
    # layer1 of the tiny prior has 8 input channels: not a cuBLASLt FP8 shape, kept bf16 with the reason
    assert set(rep["bf16_layers"]) == {"prior.layer1.0.conv1", "prior.layer1.0.conv3", "prior.layer1.0.down"}
    assert all("multiples of 16" in r for r in rep["bf16_layers"].values())
    assert isinstance(enc.prior.blocks[0].c1, FoldedConv) and isinstance(enc.prior.blocks[0].down, FoldedConv)
    assert rep["calibration"] == {"method": "minmax", "images": 12, "batch_size": 16, "source": "RetrievalSet"}
    assert all(x["amax"] > 0 and x["amax"] == x["absmax"] for x in rep["layers"])  # minmax: amax = absmax


def test_calibration_records_each_gemms_own_input(tiny, enc, calib):
    """The report's amax is the |x| max of that GEMM's input in the bf16 forward (an independent hook here)."""
    bf16 = FusedEncoder(tiny, "cpu", torch.bfloat16)
    seen = {}

    def spy(name, inner):
        def call(x):
            seen[name] = max(seen.get(name, 0.0), x.abs().max().item())
            return inner(x)
        return call

    bf16.vis_blocks[1].q = spy("vit.1.q", bf16.vis_blocks[1].q)
    bf16.vis_blocks[0].proj = spy("vit.0.proj", bf16.vis_blocks[0].proj)
    bf16.prior.blocks[1].down = spy("prior.layer2.0.down", bf16.prior.blocks[1].down)
    for px in iter_image_batches(calib.images, EvalTransform(64), 5):
        bf16.encode_images(px)
    amax = {x["name"]: x["amax"] for x in enc.fp8["layers"]}
    for name, want in seen.items():
        assert amax[name] == pytest.approx(want, rel=1e-6), name
    assert len({round(v, 6) for v in seen.values()}) == 3  # three different tensors


def test_keep_patterns_stay_bf16(tiny, enc, calib, pixels):
    kept = FusedEncoder(tiny, "cpu", torch.bfloat16, fp8=Fp8Config(calib, keep=("vit.1.*", "prior.layer4.*")))
    rep = kept.fp8
    assert isinstance(kept.vis_blocks[1].fc, Linear) and isinstance(kept.prior.blocks[3].c3, FoldedConv)
    assert isinstance(kept.vis_blocks[0].fc, Fp8Linear)
    assert rep["bf16_layers"]["vit.1.q"] == "keep pattern 'vit.1.*'"
    assert rep["bf16_layers"]["prior.layer4.0.down"] == "keep pattern 'prior.layer4.*'"
    assert len(rep["fp8_layers"]) == len(enc.fp8["fp8_layers"]) - 8 and rep["keep"] == ["vit.1.*", "prior.layer4.*"]
    assert not torch.equal(kept.encode_images(pixels), enc.encode_images(pixels))
    with pytest.raises(ValueError, match="match no FP8 layer"):
        FusedEncoder(tiny, "cpu", torch.bfloat16, fp8=Fp8Config(calib, keep=("vit.9.*",)))
    with pytest.raises(ValueError, match="bfloat16"):
        FusedEncoder(tiny, "cpu", torch.float32, fp8=Fp8Config(calib))


def test_histogram_method_and_bounded_image_count(tiny, calib, enc):
    pct = FusedEncoder(tiny, "cpu", torch.bfloat16, fp8=Fp8Config(calib, method="percentile", max_images=4,
                                                                    batch_size=3))
    rep = pct.fp8
    assert rep["calibration"]["images"] == 4 and rep["calibration"]["method"] == "percentile"
    assert all(0 < x["amax"] <= x["absmax"] * (1 + 1e-6) for x in rep["layers"])
    assert any(x["amax"] < x["absmax"] for x in rep["layers"])  # the histogram really clipped somewhere
    with pytest.raises(ValueError, match="unknown calibration method"):
        FusedEncoder(tiny, "cpu", torch.bfloat16, fp8=Fp8Config(calib, method="mse"))


def test_create_engine_fp8(tiny, calib, enc, pixels):
    eng = create_engine("fused", tiny, "fp8", "cpu", calib=calib, fp8_keep=["vit.1.out"])
    meta = eng.metadata()
    assert eng.name == "fused/fp8" and meta["precision"] == "fp8" and isinstance(eng.inner, FusedEncoder)
    assert "vit.1.out" in meta["fp8"]["bf16_layers"] and "vit.0.qkv" in meta["fp8"]["fp8_layers"]
    assert meta["fp8"]["calibration"]["method"] == "minmax" and meta["fp8"]["layers"][0]["amax"] > 0
    assert eng.encode_images(pixels).shape == (10, 32)
    with pytest.raises(PriorCLIPError) as err:
        create_engine("fused", tiny, "fp8", "cpu")
    assert "\n" not in str(err.value) and "calib" in str(err.value)
    with pytest.raises(PriorCLIPError, match="match no FP8 layer"):
        create_engine("fused", tiny, "fp8", "cpu", calib=calib, fp8_keep=["nope"])
    with pytest.raises(PriorCLIPError, match="unknown calibration method"):
        create_engine("fused", tiny, "fp8", "cpu", calib=calib, calib_method="mse")


def test_fp8_needs_ada_or_hopper_on_cuda(tiny, calib, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    fp8_mod.fp8_unsupported.cache_clear()
    try:
        reason = fp8_mod.fp8_unsupported("cuda:0")
        assert "8.9" in reason and "A100" in reason and "8.0" in reason
        with pytest.raises(PriorCLIPError, match="compute capability >= 8.9"):
            BACKENDS["fused"].build(tiny, "fp8", torch.device("cuda", 0), calib=calib)
    finally:
        fp8_mod.fp8_unsupported.cache_clear()
    assert fp8_mod.fp8_unsupported("cpu") is None
