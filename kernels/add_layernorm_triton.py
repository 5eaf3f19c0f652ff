"""Triton kernel for :func:`priorclip.kernels.add_layernorm.add_layernorm_reference`: one program per row (D <= 8192
fits one block: the model's widths are 768 and 512), the sum rounded to the stream's dtype, mean and variance in
float32 from registers. Imports triton: only the fused path imports it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_layernorm_kernel(x_ptr, d_ptr, w_ptr, b_ptr, s_ptr, h_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < D
    x = tl.load(x_ptr + row * D + c, mask=m, other=0.0).to(tl.float32)
    # torch adds half types in float32 and rounds once: so does this, and normalises the rounded sum as it does
    s = (x + tl.load(d_ptr + row * D + c, mask=m, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + row * D + c, s, mask=m)
    s = s.to(tl.float32)
    mean = tl.sum(s, axis=0) / D
    sc = tl.where(m, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(sc * sc, axis=0) / D + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * D + c, (sc * rstd * w + b).to(h_ptr.dtype.element_ty), mask=m)


def _launch(kernel, x, delta, weight, bias, eps):
    s, h = torch.empty_like(x), torch.empty_like(x)
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    if rows:
        block = triton.next_power_of_2(d)
        kernel[(rows,)](x, delta, weight, bias, s, h, d, eps, BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return s, h


def add_layernorm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel with the reference's signature, launched directly (runs under ``TRITON_INTERPRET=1`` on CPU)."""
    return _launch(_add_layernorm_kernel, x.contiguous(), delta.contiguous(), weight.contiguous(), bias.contiguous(),
                   float(eps))


@torch.library.triton_op("priorclip::add_layernorm", mutates_args=())
def _add_layernorm_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(torch.library.wrap_triton(_add_layernorm_kernel), x.contiguous(), delta.contiguous(),
                   weight.contiguous(), bias.contiguous(), eps)


@_add_layernorm_op.register_fake
def _(x, delta, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def add_layernorm_op(x, delta, weight, bias, eps):
    """``torch.ops.priorclip.add_layernorm``: (x + delta, LayerNorm(x + delta))."""
    return torch.ops.priorclip.add_layernorm(x, delta, weight, bias, eps)
