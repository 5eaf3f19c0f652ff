"""The one-pass FP8 quantisation kernel against its plain-torch reference (a float32 division, saturation, a
round-to-nearest-even cast), on CPU under the Triton interpreter and on the GPU."""

from __future__ import annotations

import pytest
import torch

from priorclip.kernels import fp8_quant as fq


def _kernel():
    from priorclip.kernels.fp8_quant_triton import quantize_fp8_triton

    return quantize_fp8_triton


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1,), (37, 129), (4, 51, 768), (0, 16)], ids=str)
def test_kernel_matches_reference(device, dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    x = (300 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)  # ~5 % saturate at 448 * 0.7
    scale = torch.tensor([[0.7]], device=device)
    want = fq.quantize_fp8_reference(x, scale)
    quotient = _kernel()(x, scale, out_dtype=torch.float32)  # the arithmetic, before the cast
    assert torch.equal(quotient, (x.float() / 0.7).clamp(-448, 448))  # IEEE division, as torch's
    assert torch.equal(quotient.to(torch.float8_e4m3fn).view(torch.uint8), want.view(torch.uint8))
    if device == "cuda":  # the hardware cast: round to nearest even with saturation, as torch's
        got = _kernel()(x, scale)
        assert got.dtype == torch.float8_e4m3fn and got.shape == x.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_saturates_instead_of_nan(device):
    x = torch.tensor([1e6, -1e6, 447.0, 0.0], device=device)
    one = torch.tensor(1.0, device=device)
    assert _kernel()(x, one, out_dtype=torch.float32).tolist() == [448.0, -448.0, 447.0, 0.0]
    assert fq.quantize_fp8_reference(x, one).float().tolist() == [448.0, -448.0, 448.0, 0.0]  # 447 -> 448, nearest
    if device == "cuda":
        assert _kernel()(x, one).float().tolist() == [448.0, -448.0, 448.0, 0.0]


def test_reference_is_the_dequantisable_rounding():
    """Hand check: dequantising gives the nearest e4m3 value of x / scale times the scale."""
    x = torch.tensor([1.0, 1.06, 1.07, 3.3, -0.001])
    q = fq.quantize_fp8_reference(x, torch.tensor(0.5))
    assert q.float().tolist() == [2.0, 2.0, 2.25, 6.5, -0.001953125]  # e4m3 steps 0.25 in [2, 4), 0.5 in [4, 8)


def test_dispatcher_uses_the_reference_off_cuda_and_checks_the_scale():
    x = torch.randn(8, 16)
    s = torch.tensor([[0.01]])
    assert torch.equal(fq.quantize_fp8(x, s).view(torch.uint8), fq.quantize_fp8_reference(x, s).view(torch.uint8))
    with pytest.raises(ValueError, match="one per-tensor scale"):
        fq.quantize_fp8(x, torch.ones(2))


@pytest.mark.gpu
def test_op_opcheck_on_cuda():
    from priorclip.kernels.fp8_quant_triton import quantize_fp8_op

    x = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16)
    s = torch.tensor([[0.02]], device="cuda")
    torch.library.opcheck(torch.ops.priorclip.quantize_fp8.default, (x, s))
    assert torch.equal(quantize_fp8_op(x, s).view(torch.uint8), fq.quantize_fp8_reference(x, s).view(torch.uint8))
