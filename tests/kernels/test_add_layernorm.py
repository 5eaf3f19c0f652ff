"""The fused residual add + LayerNorm against its plain-torch reference and a float64 LayerNorm of the same sum,
with flash-attention's rule (HOUSE_STYLE.md)."""

from __future__ import annotations

import pytest
import torch

from priorclip.kernels import add_layernorm as al

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}
SHAPES = [(1, 768), (3, 51, 768), (5, 33), (2, 20, 512), (4, 1000)]


def _kernel():
    from priorclip.kernels.add_layernorm_triton import add_layernorm_triton

    return add_layernorm_triton


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (std * torch.randn(*s, generator=g)).to(device=device, dtype=dtype)  # noqa: E731
    d = shape[-1]
    return r(*shape, std=3.0), r(*shape), 1 + r(d, std=0.1), r(d, std=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(device, shape, dtype):
    x, delta, w, b = _inputs(shape, dtype, device, seed=len(shape) * shape[-1])
    s, h = _kernel()(x, delta, w, b, 1e-5)
    rs, rh = al.add_layernorm_reference(x, delta, w, b, 1e-5)
    assert s.dtype == h.dtype == dtype and s.shape == h.shape == x.shape
    # the float64 LayerNorm of the reference's (rounded) sum: what both should approximate
    want = torch.nn.functional.layer_norm(rs.double(), (shape[-1],), w.double(), b.double(), 1e-5)
    err, err_pt = (h.double() - want).abs().max().item(), (rh.double() - want).abs().max().item()
    print(f"{dtype} {shape}: kernel {err:.3e} torch {err_pt:.3e}")
    slack = 0.0
    if device == "cpu" and dtype == torch.bfloat16:
        # the interpreter's numpy bf16 cast truncates (the GPU's rounds to nearest): one more unit in the last place
        slack = 2.0 ** (torch.floor(torch.log2(want.abs().max())).item() - 7)
        assert (s.double() - rs.double()).abs().max() <= 2.0 ** (torch.floor(torch.log2(rs.abs().max().double())) - 7)
    else:
        assert torch.equal(s, rs)  # torch adds half types in float32 and rounds once: so does the kernel
    assert err <= 2 * err_pt + ATOL[dtype] + slack


def test_dispatcher_and_bad_inputs():
    x, delta, w, b = _inputs((3, 40), torch.float32, "cpu")
    s, h = al.add_layernorm(x, delta, w, b, 1e-5)
    rs, rh = al.add_layernorm_reference(x, delta, w, b, 1e-5)
    assert torch.equal(s, rs) and torch.equal(h, rh)  # off CUDA: the reference itself
    with pytest.raises(ValueError, match="add_layernorm expects"):
        al.add_layernorm(x, delta[:2], w, b, 1e-5)
    with pytest.raises(ValueError, match="add_layernorm expects"):
        al.add_layernorm(x, delta, w[:3], b, 1e-5)


def test_empty_rows(device):
    x, delta, w, b = _inputs((0, 64), torch.float32, device)
    s, h = _kernel()(x, delta, w, b, 1e-5)
    assert s.shape == h.shape == (0, 64)


@pytest.mark.gpu
def test_op_opcheck_on_cuda():
    x, delta, w, b = _inputs((8, 51, 768), torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.priorclip.add_layernorm.default, (x, delta, w, b, 1e-5))


def test_the_rounded_sum_is_what_is_normalised(device):
    """A stream near 1000 in fp16 (unit in the last place 0.5) with small deltas: the sum's rounding is a large part
    of the row's spread, so normalising the unrounded sum would be visibly off; the kernel normalises what it stores."""
    g = torch.Generator().manual_seed(3)
    x = (1000 + 0.5 * torch.randn(4, 256, generator=g)).to(device=device, dtype=torch.float16)
    delta = (0.3 * torch.randn(4, 256, generator=g)).to(device=device, dtype=torch.float16)
    w, b = torch.ones(256, device=device, dtype=torch.float16), torch.zeros(256, device=device, dtype=torch.float16)
    s, h = _kernel()(x, delta, w, b, 1e-5)
    rs, rh = al.add_layernorm_reference(x, delta, w, b, 1e-5)
    assert torch.equal(s, rs)
    assert (h.float() - rh.float()).abs().max() <= 4e-3  # fp16 rounding of h only
    unrounded = torch.nn.functional.layer_norm(x.float() + delta.float(), (256,), w.float(), b.float(), 1e-5)
    assert (unrounded - rh.float()).abs().max() > 0.05  # the case really separates the two
