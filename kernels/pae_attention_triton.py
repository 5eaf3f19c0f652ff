"""Triton kernel for :func:`priorclip.kernels.pae_attention.pae_attention_reference`: one program per (sample, head)
holds the head's whole [Lq, Lk] score tile (PIR's sequences are <= 47 tokens: one 64 x 64 tile), so the scores never
leave the chip. Q, K and V are read through their real strides, so slices of one packed QKV (or KV) projection need no
copy. Imports triton: only the fused path imports it."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MASK_FILL: tl.constexpr = tl.constexpr(-1e9)  # the reference's fill (priorclip.layers.pae.MASK_FILL)


@triton.jit
def _pae_attention_kernel(
    q_ptr, s_qb, s_ql,
    k_ptr, s_kb, s_kl,
    v_ptr, s_vb, s_vl,
    pad_ptr, s_pb, s_pl,
    out_ptr,
    LQ, LK, E, scale,
    HAS_PAD: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DH: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rq = tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, BLOCK_K)
    c = h * DH + tl.arange(0, DH)  # this head's columns of E
    q_ok = rq < LQ
    k_ok = rk < LK

    # padded rows load as 0: their scores are masked below and 0 * V keeps NaN out of the PV dot
    q = tl.load(q_ptr + b * s_qb + rq[:, None] * s_ql + c[None, :], mask=q_ok[:, None], other=0.0)
    k = tl.load(k_ptr + b * s_kb + rk[:, None] * s_kl + c[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * s_vb + rk[:, None] * s_vl + c[None, :], mask=k_ok[:, None], other=0.0)

    if F32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))  # half types: tensor cores, float32 accumulation
    s = s * scale
    if HAS_PAD:
        # the reference's fill, not -inf: a row with every key masked averages them all, as it does
        pad = tl.load(pad_ptr + b * s_pb + rk * s_pl, mask=k_ok, other=0) != 0
        s = tl.where(pad[None, :], MASK_FILL, s)
    s = tl.where(k_ok[None, :], s, float("-inf"))  # columns past Lk are not keys at all

    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    # half types: rounded to the input dtype before the PV dot, as the reference rounds its softmax output
    p = (p / tl.sum(p, axis=1)[:, None]).to(v.dtype)
    if F32_DOT:
        o = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        o = tl.dot(p, v)
    out = out_ptr + b * LQ * E + rq[:, None] * E + c[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=q_ok[:, None])


def _f32_dot(q: torch.Tensor) -> bool:
    """IEEE float32 dots: for float32 inputs (no TF32, as the reference's float32 matmul), and for bfloat16 under the
    interpreter (CPU tensors), whose numpy matmul has no bfloat16; bf16 x bf16 products are exact in float32, so that
    differs from the GPU's tensor-core dot only in the order of the float32 sums."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")


def _launch(kernel, q, k, v, heads, key_pad):
    b, lq, e = q.shape
    lk = k.shape[1]
    out = torch.empty(b, lq, e, device=q.device, dtype=q.dtype)
    if b == 0 or lq == 0:
        return out
    if lk == 0:
        return out.zero_()  # no keys: the reference's empty PV product is 0
    dh = e // heads
    # bool pointers are awkward in Triton; the same bytes as uint8 (a view, no copy). Unused pointer: any tensor.
    pad = key_pad.view(torch.uint8) if key_pad is not None else q
    s_pb, s_pl = (key_pad.stride(0), key_pad.stride(1)) if key_pad is not None else (0, 0)
    block_q, block_k = max(16, triton.next_power_of_2(lq)), max(16, triton.next_power_of_2(lk))
    kernel[(b, heads)](
        q, q.stride(0), q.stride(1),
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        pad, s_pb, s_pl,
        out,
        lq, lk, e, 1.0 / math.sqrt(dh),
        HAS_PAD=key_pad is not None, F32_DOT=_f32_dot(q),
        BLOCK_Q=block_q, BLOCK_K=block_k, DH=dh,
        num_warps=4 if block_q * block_k <= 64 * 64 else 8,
    )
    return out


def pae_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         key_pad: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel with the reference's signature, launched directly with the inputs' real strides (runs under
    ``TRITON_INTERPRET=1`` on CPU). Inputs must have passed the dispatcher's checks and suit the kernel."""
    return _launch(_pae_attention_kernel, q, k, v, heads, key_pad)


@torch.library.triton_op("priorclip::pae_attention", mutates_args=())
def _pae_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      key_pad: torch.Tensor | None) -> torch.Tensor:
    # wrap_triton lets torch.compile / AOTInductor trace the launch and keep the kernel whole
    return _launch(torch.library.wrap_triton(_pae_attention_kernel), q, k, v, heads, key_pad)


@_pae_attention_op.register_fake
def _(q, k, v, heads, key_pad):
    return q.new_empty(q.shape)  # contiguous [B, Lq, E] in q's dtype, as the kernel returns


def pae_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     key_pad: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.priorclip.pae_attention``: the attention core, [B, Lq, E] in q's dtype."""
    return torch.ops.priorclip.pae_attention(q, k, v, heads, key_pad)
