"""The fused stem-epilogue + belief-gate kernel against its plain-torch reference and a float64 run of it.

Tolerance rule (flash-attention's, HOUSE_STYLE.md): the kernel's largest error against the float64 reference is at
most twice plain torch's at the same precision, plus a small per-dtype atol. The belief order must equal the
reference's exactly wherever the reference's order is well defined (ties are broken lower index first).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from priorclip.config import GATE_BELIEF_PLUS_RANK, GATE_DOUBLE_BELIEF
from priorclip.kernels import belief_gate as bg

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}
# (B, N patches, D width, P prior features or None for an already-projected prior): batch 1, the real ViT-B/32
# shape, widths off the power-of-two grid, T = N + 1 exactly 64 and just past it (BLOCK_T 128).
SHAPES = [(1, 49, 768, 512), (3, 15, 33, 17), (2, 8, 40, None), (5, 63, 64, 32), (2, 64, 24, 8)]


def _triton_fn():
    from priorclip.kernels.belief_gate_triton import stem_gate_triton

    return stem_gate_triton


def as_f64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def report(name, got, want):
    err = (got.double() - want.double()).abs()
    print(f"{name}: max {err.max().item():.3e} mean {err.mean().item():.3e}")  # the CI log shows the margin
    return err.max().item()


@pytest.mark.parametrize("variant", [GATE_BELIEF_PLUS_RANK, GATE_DOUBLE_BELIEF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)).replace("None", "y"))
def test_kernel_matches_reference(device, shape, dtype, variant):
    kw = bg.example_inputs(*shape, dtype=dtype, device=device, seed=hash((shape, str(dtype))) % 1000)
    want, want_order = bg.stem_gate_reference(**as_f64(kw), variant=variant)  # float64 maths on the same inputs
    pt, pt_order = bg.stem_gate_reference(**kw, variant=variant)  # plain torch at this precision
    got, order = _triton_fn()(**kw, variant=variant)
    assert got.shape == (shape[0], shape[1] + 2, shape[2]) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    err = report("kernel", got, want)
    err_pt = report("torch", pt, want)
    assert err <= 2 * err_pt + ATOL[dtype], f"kernel error {err:.3e} vs torch {err_pt:.3e} at {dtype}"
    if variant == GATE_BELIEF_PLUS_RANK:
        assert order.dtype == torch.int64 and order.shape == (shape[0], shape[1] + 1)
        assert torch.equal(order.cpu(), want_order.cpu())
    else:
        assert order is None and pt_order is None


def test_exact_ties_break_lower_index_first(device):
    """Identical stem tokens tie exactly; huge logits underflow most beliefs to exact zeros, which tie too."""
    b, n, d = 3, 20, 48
    kw = bg.example_inputs(b, n, d, 16, device=device, seed=7)
    patches = kw["patches"].clone()
    patches[:, 5:15] = patches[:, 5:6]  # tokens 6..15 (after CLS) identical up to their positions
    kw["positional_embedding"] = kw["positional_embedding"].clone()
    kw["positional_embedding"][6:16] = kw["positional_embedding"][6:7]
    kw["patches"] = patches
    kw_big = dict(kw, proj_weight=kw["proj_weight"] * 200.0)  # logits in the thousands: exact-zero beliefs
    for case in (kw, kw_big):
        got, order = _triton_fn()(**case)
        want, want_order = bg.stem_gate_reference(**case)
        assert torch.equal(order.cpu(), want_order.cpu())
        # the rule itself, on the kernel's order: the identical tokens appear in ascending index order
        for row in order.cpu().tolist():
            tied = [t for t in row if 6 <= t < 16]
            assert tied == sorted(tied)
        assert report("ties", got[:, 1:], want[:, 1:]) <= 1e-5  # unit-norm columns
        y_err = (got[:, 0] - want[:, 0]).abs().max() / want[:, 0].abs().max()
        assert y_err <= 1e-6  # the prior token: values up to ~1e2, float32 rounding relative to the largest


def test_big_logits_give_exact_zero_beliefs():
    """Guard for the tie test above: its large-logit case does make exact-zero (tied) beliefs."""
    kw = bg.example_inputs(2, 20, 48, 16, seed=7)
    kw["proj_weight"] = kw["proj_weight"] * 200.0
    x = torch.cat([kw["class_embedding"].expand(2, 1, -1), kw["patches"]], 1) + kw["positional_embedding"]
    x = torch.nn.functional.layer_norm(x, (48,), kw["ln_weight"], kw["ln_bias"], 1e-5)
    y = torch.nn.functional.linear(kw["prior"], kw["proj_weight"], kw["proj_bias"])
    belief = torch.softmax(torch.einsum("btd,bd->bt", x, y), 1)
    assert (belief == 0).sum(1).min() >= 5


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_out_dtype_is_the_rounded_float32_result(device, out_dtype):
    kw = bg.example_inputs(2, 49, 96, 40, device=device, seed=3)
    full, order = _triton_fn()(**kw)
    low, order_low = _triton_fn()(**kw, out_dtype=out_dtype)
    assert low.dtype == out_dtype and torch.equal(order, order_low)
    if device == "cuda":
        assert torch.equal(low, full.to(out_dtype))  # round to nearest even, as torch
    else:  # the interpreter's numpy conversion may round bf16 the other way: within one unit in the last place
        fi = torch.finfo(out_dtype)
        torch.testing.assert_close(low.float(), full, rtol=fi.eps, atol=fi.tiny * fi.eps)  # subnormals: one ulp


def test_mixed_precision_inputs_as_under_autocast(device):
    """Half-precision patches with float32 parameters (an fp32 model under autocast) match the float64 maths."""
    kw = bg.example_inputs(2, 49, 96, 40, dtype=torch.float16, param_dtype=torch.float32, device=device, seed=5)
    want, want_order = bg.stem_gate_reference(**as_f64(kw))
    got, order = _triton_fn()(**kw)
    assert report("mixed", got, want) <= 1e-5
    assert torch.equal(order.cpu(), want_order.cpu())


def test_tiny_and_zero_channels_normalise_like_the_reference(device):
    """F.normalize's eps (1e-12) only acts on (near-)zero channels: tiny ones still come out unit-norm, zero ones 0."""
    kw = bg.example_inputs(2, 15, 32, 8, device=device, seed=9)
    lw, lb = kw["ln_weight"].clone(), kw["ln_bias"].clone()
    lw[:4], lb[:4] = 1e-6, 0.0  # column norms ~1e-5: far above eps, so normalised to 1
    lw[4:6], lb[4:6] = 0.0, 0.0  # exactly zero columns stay zero
    kw = dict(kw, ln_weight=lw, ln_bias=lb)
    got, _ = _triton_fn()(**kw)
    want, _ = bg.stem_gate_reference(**kw)
    assert report("tiny", got, want) <= 1e-5
    norms = got[:, 1:].norm(dim=1)  # [B, D]
    assert torch.allclose(norms[:, :4], torch.ones_like(norms[:, :4]), atol=1e-5)
    assert torch.equal(got[:, 1:, 4:6], torch.zeros_like(got[:, 1:, 4:6]))


def test_contiguous_and_strided_patches_agree(device):
    kw = bg.example_inputs(3, 15, 33, 17, device=device, seed=11)
    a, oa = _triton_fn()(**kw)
    b, ob = _triton_fn()(**dict(kw, patches=kw["patches"].contiguous()))
    assert torch.equal(a, b) and torch.equal(oa, ob)


def test_empty_batch(device):
    kw = bg.example_inputs(1, 8, 16, 8, device=device)
    kw = dict(kw, patches=kw["patches"][:0], prior=kw["prior"][:0])
    got, order = _triton_fn()(**kw)
    assert got.shape == (0, 10, 16) and order.shape == (0, 9)


# ----------------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_runs_the_reference_on_cpu():
    kw = bg.example_inputs(2, 8, 16, 8, seed=1)
    got, order = bg.stem_gate(**kw)
    want, want_order = bg.stem_gate_reference(**kw)
    assert torch.equal(got, want) and torch.equal(order, want_order)
    assert not bg.fused_enabled(kw["patches"])


def test_dispatcher_refuses_bad_inputs():
    kw = bg.example_inputs(2, 8, 16, 8)
    with pytest.raises(ValueError, match="stem_gate expects"):
        bg.stem_gate(**dict(kw, prior=kw["prior"][:1]))
    with pytest.raises(ValueError, match="stem_gate expects"):
        bg.stem_gate(**dict(kw, positional_embedding=kw["positional_embedding"][:-1]))
    with pytest.raises(ValueError, match="stem_gate expects"):
        bg.stem_gate(**dict(kw, patches=kw["patches"][0]))
    with pytest.raises(ValueError, match=r"proj_weight \(16, 7\)"):  # [D, P] that does not match the prior's P
        bg.stem_gate(**dict(kw, proj_weight=kw["proj_weight"][:, :7]))
    with pytest.raises(ValueError, match="stem_gate expects"):
        bg.stem_gate(**dict(kw, ln_weight=kw["ln_weight"][:-1]))
    with pytest.raises(ValueError, match="stem_gate expects"):  # no projection: the prior must be [B, D] already
        bg.stem_gate(**dict(kw, proj_weight=None, proj_bias=None))
    with pytest.raises(ValueError, match="unknown gate variant"):
        bg.stem_gate(**kw, variant="3belief")
    with pytest.raises(ValueError, match="kernels must be one of"):
        bg.stem_gate(**kw, kernels="fast")


def test_fake_implementation_and_schema():
    """torch.compile / torch.export trace the op through its fake implementation: shapes and dtypes only."""
    importlib.import_module("priorclip.kernels.belief_gate_triton")  # registers torch.ops.priorclip.stem_gate

    kw = bg.example_inputs(2, 9, 40, 24)
    args = tuple(kw.values()) + (True, torch.float16)
    res = torch.library.opcheck(torch.ops.priorclip.stem_gate.default, args,
                                test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        tokens, order = torch.ops.priorclip.stem_gate(*fake)
    assert tokens.shape == (2, 11, 40) and tokens.dtype == torch.float16
    assert order.shape == (2, 10) and order.dtype == torch.int64


# ----------------------------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
def test_dispatcher_fuses_on_cuda_and_not_under_autograd(monkeypatch):
    kw = bg.example_inputs(2, 49, 96, 40, device="cuda", seed=2)
    assert bg.fused_enabled(kw["patches"])
    monkeypatch.setenv(bg.KERNELS_ENV, "reference")
    assert not bg.fused_enabled(kw["patches"])
    monkeypatch.delenv(bg.KERNELS_ENV)
    w = kw["proj_weight"].clone().requires_grad_(True)
    assert not bg.fused_enabled(kw["patches"], w)
    with torch.no_grad():
        assert bg.fused_enabled(kw["patches"], w)
    got, order = bg.stem_gate(**kw)
    want, want_order = bg.stem_gate_reference(**as_f64(kw))
    assert report("dispatch", got, want) <= 1e-5 and torch.equal(order, want_order)


@pytest.mark.gpu
def test_op_full_opcheck_and_torch_compile_keeps_it_whole():
    from priorclip.kernels.belief_gate_triton import stem_gate_op

    kw = bg.example_inputs(4, 49, 768, 512, device="cuda", seed=4)
    args = tuple(kw.values()) + (True, torch.float32)
    torch.library.opcheck(torch.ops.priorclip.stem_gate.default, args)
    compiled = torch.compile(lambda *a: stem_gate_op(*a), fullgraph=True)  # fullgraph: a graph break is an error
    got, order = compiled(*args)
    want, want_order = bg.stem_gate_reference(**kw)
    assert report("compiled", got, want) <= 1e-5 and torch.equal(order, want_order)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_model_image_embeddings_fused_vs_reference_on_cuda(dtype):
    """The real model on CUDA with the dispatcher fused vs pinned to the reference, at each precision.

    Random weights leave the 50 beliefs of an image ~1e-6 apart, so at fp16/bf16 (the reference's logits are computed
    in half precision, the kernel's in fp32) an image's order may flip; those are counted and shown, and the others
    must agree to the precision's cosine floor. At fp32 every order must agree."""
    from priorclip import create_model

    model = create_model("priorclip-vit-b32").cuda().eval()
    pixels = torch.randn(8, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        fused, order = model.encode_image_with_order(pixels, kernels="auto")
        ref, ref_order = model.encode_image_with_order(pixels, kernels="reference")
    same = (order == ref_order).all(dim=1)
    cos = torch.nn.functional.cosine_similarity(fused.float(), ref.float(), dim=-1)
    print(f"{dtype}: {int((~same).sum())} of 8 orders differ; min cosine where equal {cos[same].min().item():.6f}")
    if dtype == torch.float32:
        assert bool(same.all()) and report("model fp32", fused, ref) <= 1e-5
    else:
        assert int(same.sum()) >= 4 and cos[same].min() > (0.999 if dtype == torch.float16 else 0.995)


@pytest.mark.gpu
def test_compiled_model_keeps_the_fused_op_whole():
    """torch.compile(fullgraph=True) of the model's image encoder: the dispatcher's op traces without a graph break."""
    from priorclip import create_model

    model = create_model("priorclip-tiny").cuda().eval()
    s = model.image_size
    pixels = torch.randn(3, 3, s, s, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want, want_order = model.encode_image_with_order(pixels, kernels="reference")
        got, order = torch.compile(model.encode_image_with_order, fullgraph=True)(pixels)
    assert report("compiled model", got, want) <= 1e-4 and torch.equal(order, want_order)


def test_a_failing_kernel_fails_loudly_with_the_way_out():
    """No quiet fallback (it would mislabel measurements): the error names the kernel and PRIORCLIP_KERNELS."""
    with pytest.raises(RuntimeError, match="fused stem_gate kernel failed .*PRIORCLIP_KERNELS=reference"):
        with bg.kernel_failure_hint("stem_gate"):
            raise ValueError("PTX .version 9.0 does not support .target sm_90a")
