"""PIR's short-sequence attention core (MHAtt between its projections) against its plain-torch reference and an
independent float64 attention, with flash-attention's rule (HOUSE_STYLE.md): kernel error <= 2 x the reference's error
at the same dtype + atol. atol: fp32 1e-5 (outputs are O(1); the float32 errors are ~1e-6), fp16 1e-3 (an fp16 ulp at
1-2 is 1e-3-2e-3: the kernel's score and probability roundings differ from torch's by about one), bf16 1e-2 (the same
in bf16's 8 bits: an ulp at 1-2 is 8e-3-1.6e-2)."""

from __future__ import annotations

import pytest
import torch

from priorclip.kernels import pae_attention as pa
from priorclip.layers.pae import MHAtt

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Lq, Lk, E, heads): VIR's MHSA (N=40), VIR's CroSA (one query per sample), LCA at L=47, pir-tiny (dh 16), small
SHAPES = [(1, 40, 40, 512, 8), (2, 1, 40, 512, 8), (3, 47, 47, 512, 8), (2, 13, 13, 32, 2), (4, 5, 9, 64, 4)]


def _kernel():
    from priorclip.kernels.pae_attention_triton import pae_attention_triton

    return pae_attention_triton


def _inputs(b, lq, lk, e, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (std * torch.randn(*s, generator=g)).to(device=device, dtype=dtype)  # noqa: E731
    return r(b, lq, e, std=1.5), r(b, lk, e), r(b, lk, e)  # scores of std 1.5: softmaxes neither flat nor one-hot


def _attention64(q, k, v, heads, key_pad=None):
    """Float64 yardstick, written independently of the reference (einsum over [B, L, H, dh] views)."""
    b, lq, e = q.shape
    dh = e // heads
    qh, kh, vh = (t.double().reshape(b, t.shape[1], heads, dh) for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / dh**0.5
    if key_pad is not None:
        s = torch.where(key_pad[:, None, None, :], torch.tensor(-1e9, dtype=s.dtype, device=s.device), s)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vh).reshape(b, lq, e)


def _slack(device, dtype, want):
    """The interpreter's numpy bf16 casts truncate (the GPU's round to nearest): one more ulp of the output."""
    if device == "cpu" and dtype == torch.bfloat16:
        return 2.0 ** (torch.floor(torch.log2(want.abs().max())).item() - 7)
    return 0.0


def _check_parity(out, ref, want, dtype, device, label):
    err, err_pt = (out.double() - want).abs().max().item(), (ref.double() - want).abs().max().item()
    print(f"{label} {dtype}: kernel {err:.3e} torch {err_pt:.3e}")
    assert err <= 2 * err_pt + ATOL[dtype] + _slack(device, dtype, want), (err, err_pt)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(device, shape, dtype):
    b, lq, lk, e, heads = shape
    q, k, v = _inputs(b, lq, lk, e, dtype, device, seed=sum(shape))
    out = _kernel()(q, k, v, heads)
    ref = pa.pae_attention_reference(q, k, v, heads)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == (b, lq, e)
    assert out.is_contiguous() and ref.is_contiguous()
    _check_parity(out, ref, _attention64(q, k, v, heads), dtype, device, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_projection_views(device, dtype):
    """q/k/v sliced from one packed [B, L, 3E] QKV output (MHSA), or q alone with k/v from a packed [B, L, 2E] KV
    output (CroSA): read through their strides, the same results as contiguous copies."""
    b, length, e, heads = 2, 11, 64, 4
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, length, 3 * e, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
    pad = torch.zeros(length, b, dtype=torch.bool, device=device)
    pad[-3:, 1] = True
    pad = pad.t()  # a non-contiguous mask as well
    for key_pad in (None, pad):
        pad_c = None if key_pad is None else key_pad.contiguous()
        contiguous = _kernel()(q.contiguous(), k.contiguous(), v.contiguous(), heads, pad_c)
        assert torch.equal(_kernel()(q, k, v, heads, key_pad), contiguous)
        ref = pa.pae_attention_reference(q, k, v, heads, key_pad)
        assert ref.is_contiguous()
        assert torch.equal(ref, pa.pae_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), heads,
                                                           key_pad))
    kv = torch.randn(b, length, 2 * e, generator=g).to(device=device, dtype=dtype)
    q1 = torch.randn(b, 1, e, generator=g).to(device=device, dtype=dtype)
    k, v = kv[..., :e], kv[..., e:]
    want = _kernel()(q1, k.contiguous(), v.contiguous(), heads)
    assert torch.equal(_kernel()(q1, k, v, heads), want)
    assert torch.equal(_kernel()(q1, k.contiguous(), v, heads), want)  # each operand through its own strides
    _check_parity(_kernel()(q1, k, v, heads), pa.pae_attention_reference(q1, k, v, heads),
                  _attention64(q1, k, v, heads), dtype, device, "packed kv")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_pad(device, dtype):
    """Padded keys get no weight (changing their values changes nothing); a sample with every key padded gets the
    uniform average over its keys, as the reference's -1e9 fill gives."""
    b, lq, lk, e, heads = 3, 6, 9, 64, 4
    q, k, v = _inputs(b, lq, lk, e, dtype, device, seed=11)
    pad = torch.zeros(b, lk, dtype=torch.bool, device=device)
    pad[0, [2, 7, 8]] = True
    pad[1, 0] = True
    pad[2, :] = True
    out = _kernel()(q, k, v, heads, pad)
    want = _attention64(q, k, v, heads, pad)
    ref = pa.pae_attention_reference(q, k, v, heads, pad)  # float16 fills -65504 where -1e9 overflows
    _check_parity(out, ref, want, dtype, device, "key_pad")
    assert (_attention64(q, k, v, heads)[:2] - want[:2]).abs().max() > 0.05  # the mask matters in this case
    # the padded keys' values and keys do not reach the output
    k2, v2 = k.clone(), v.clone()
    k2[pad], v2[pad] = 100.0, 100.0
    v2[2] = v[2]  # the all-padded sample averages its values uniformly: those do count (its keys do not)
    assert torch.equal(_kernel()(q, k2, v2, heads, pad), out)
    assert torch.equal(pa.pae_attention_reference(q, k2, v2, heads, pad), ref)
    uniform = v[2].double().mean(0).expand(lq, e)
    assert (out[2].double() - uniform).abs().max() <= ATOL[dtype] + _slack(device, dtype, uniform)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_mhatt_core(dtype):
    """MHAtt(q, k, v) == linear_merge(reference(linear_q(q), linear_k(k), linear_v(v))), bit for bit."""
    torch.manual_seed(0)
    e, heads = 128, 4  # dh 32: 1/sqrt(dh) is not a power of two, so the order of the scaling shows in the bits
    m = MHAtt(e, heads, dropout=0.2).eval().to(dtype)
    x, y = torch.randn(3, 12, e, dtype=dtype), torch.randn(3, 12, e, dtype=dtype)
    pad = torch.rand(3, 12) < 0.3
    with torch.no_grad():
        for qin, kin, key_pad in ((x, x, None), (x, x, pad), (x, y, None), (x[:, :1], y, None), (x[:, :1], y, pad)):
            core = pa.pae_attention_reference(m.linear_q(qin), m.linear_k(kin), m.linear_v(kin), heads, key_pad)
            assert torch.equal(m.linear_merge(core), m(qin, kin, kin, key_pad))


def test_empty(device):
    q, k, v = _inputs(0, 40, 40, 512, torch.float32, device)
    for f in (_kernel(), pa.pae_attention_reference, pa.pae_attention):
        assert f(q, k, v, 8).shape == (0, 40, 512)
    q, k, v = _inputs(2, 3, 0, 64, torch.float32, device)  # no keys: the reference's empty product, zeros
    assert torch.equal(_kernel()(q, k, v, 4), pa.pae_attention_reference(q, k, v, 4))


def test_dispatcher_off_cuda_is_reference():
    q, k, v = _inputs(2, 7, 9, 64, torch.float32, "cpu", seed=3)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 4] = True
    want = pa.pae_attention_reference(q, k, v, 4, pad)
    assert torch.equal(pa.pae_attention(q, k, v, 4, pad), want)
    assert torch.equal(pa.pae_attention(q, k, v, 4, pad, kernels="reference"), want)
    with pytest.raises(ValueError, match="kernels must be one of"):
        pa.pae_attention(q, k, v, 4, kernels="fast")


def test_kernel_supports():
    q, k, v = _inputs(1, 5, 5, 64, torch.float32, "cpu")
    assert pa._kernel_supports(q, k, v, 4) and pa._kernel_supports(q, k, v, 1)
    assert not pa._kernel_supports(q, k, v, 8)  # dh 8 < 16
    q, k, v = _inputs(1, 5, 5, 48, torch.float32, "cpu")
    assert not pa._kernel_supports(q, k, v, 2)  # dh 24: not a power of two
    q, k, v = _inputs(1, 5, 5, 256, torch.float32, "cpu")
    assert pa._kernel_supports(q, k, v, 2) and not pa._kernel_supports(q, k, v, 1)  # dh 256: too wide
    for dtype, n in ((torch.float16, 256), (torch.bfloat16, 256), (torch.float32, 128)):
        q, k, v = _inputs(1, n, 5, 64, dtype, "cpu")
        assert pa._kernel_supports(q, k, v, 4) and pa._kernel_supports(k, q, q, 4)
        q, k, v = _inputs(1, n + 1, 5, 64, dtype, "cpu")
        assert not pa._kernel_supports(q, k, v, 4) and not pa._kernel_supports(k, q, q, 4)  # Lq or Lk too long
    qkv = torch.randn(1, 5, 64, 3).unbind(-1)  # last-axis stride 3
    assert not pa._kernel_supports(*qkv, 4)


def test_bad_inputs():
    q, k, v = _inputs(2, 7, 9, 64, torch.float32, "cpu")
    pad = torch.zeros(2, 9, dtype=torch.bool)
    bad = [
        (q[0], k, v, 4, None),  # not 3-D
        (q, k[:1], v[:1], 4, None),  # batch mismatch
        (q, k, v[:, :8], 4, None),  # k and v shapes differ
        (q, k[..., :32], v[..., :32], 4, None),  # E mismatch
        (q, k, v, 5, None),  # heads do not divide E
        (q, k, v, 0, None),
        (q, k.half(), v.half(), 4, None),  # dtypes differ
        (q, k, v, 4, pad[:, :8]),  # key_pad shape
        (q, k, v, 4, pad.float()),  # key_pad dtype
    ]
    for args in bad:
        with pytest.raises(ValueError, match="pae_attention expects") as exc:
            pa.pae_attention(*args)
        assert "\n" not in str(exc.value)


@pytest.mark.gpu
def test_op_opcheck_on_cuda():
    from priorclip.kernels.pae_attention_triton import pae_attention_op

    qkv = torch.randn(4, 47, 3 * 512, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[..., :512], qkv[..., 512:1024], qkv[..., 1024:]
    pad = torch.rand(4, 47, device="cuda") < 0.2
    for args in ((q, k, v, 8, None), (q, k, v, 8, pad), (q[:, :1], k, v, 8, None)):
        torch.library.opcheck(torch.ops.priorclip.pae_attention.default, args)
        assert torch.equal(pa.pae_attention(*args), pae_attention_op(*args))  # the dispatcher takes the op on CUDA
        assert torch.equal(pae_attention_op(*args), _kernel()(*args))
