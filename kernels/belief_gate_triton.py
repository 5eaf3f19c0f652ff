"""Fused Triton kernel for the ViT stem epilogue and the belief gate (spec §8B.1), one launch per batch.

One program per sample walks the [T, D] token tile in D-chunks (T = 50 tokens pad to 64 rows; a whole 64 x 768
fp32 tile would not fit in registers, and the re-reads of a 77-154 KB sample come from L1/L2, not HBM):

    pass 1, 2   x = [cls; patches] + pos                    LayerNorm mean, then variance (two passes, as exact as
                                                            torch's Welford on these widths)
    pass 3      xn = ln_pre(x); y = W r + b (or y = r)      logits s[t] = <xn[t], y>, and y stored as output row 0
    on-chip     softmax, stable descending order by pairwise comparisons (lower index first on ties, the
                reference's rule), rank-slot weights w[r] = 1/sqrt(order[r] + 1), gate g = belief + w (or 2 belief)
    pass 4      xn * g, L2 norm over the token axis per channel, rows 1.. of the output

Everything accumulates in float32 whatever the input dtype. ``priorclip.kernels.belief_gate`` holds the reference
with the same signature and the dispatcher; this module imports triton, so only the fused path imports it.

NOTE on the prior projection: in-kernel (``proj_weight`` given) every program streams the whole [D, P] weight (0.75
MB fp16) from L2, which at large batch can cost more than one cuBLAS GEMM before the kernel; the benchmark times
both forms (``benchmarks/kernels.py``) and the fused engine picks by that measurement.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_D = 128
DEFAULT_NUM_WARPS = 4
BLOCK_P = 64


@triton.jit
def _tokens(patch_ptr, s_pb, s_pn, s_pd, cls_ptr, pos_ptr, D, b, t, d, t_ok, d_ok):
    """Raw stem tokens x[t, d] = (cls if t == 0 else patches[t - 1, d]) + pos[t, d] in float32, 0 outside the tile."""
    is_patch = (t >= 1) & t_ok
    tp = tl.maximum(t - 1, 0)
    m2 = t_ok[:, None] & d_ok[None, :]
    p = tl.load(patch_ptr + b * s_pb + tp[:, None] * s_pn + d[None, :] * s_pd,
                mask=is_patch[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    c = tl.load(cls_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    x = tl.where((t == 0)[:, None], c[None, :], p)
    pos = tl.load(pos_ptr + t[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    return tl.where(m2, x + pos, 0.0)


@triton.jit
def _normed_tokens(patch_ptr, s_pb, s_pn, s_pd, cls_ptr, pos_ptr, lnw_ptr, lnb_ptr, D, b, t, d, t_ok, d_ok, mean,
                   rstd):
    """``ln_pre`` of the raw tokens of chunk d, float32 (rows past T are junk: callers mask them)."""
    x = _tokens(patch_ptr, s_pb, s_pn, s_pd, cls_ptr, pos_ptr, D, b, t, d, t_ok, d_ok)
    lw = tl.load(lnw_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    lb = tl.load(lnb_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    return (x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]


@triton.jit
def _stem_gate_kernel(
    patch_ptr, s_pb, s_pn, s_pd,
    cls_ptr, pos_ptr, lnw_ptr, lnb_ptr,
    prior_ptr, w_ptr, bias_ptr,
    out_ptr, order_ptr,
    N, D, P, eps,
    HAS_PROJ: tl.constexpr, RANK_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    T = N + 1
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    dd = tl.arange(0, BLOCK_D)

    # pass 1: LayerNorm mean
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        x = _tokens(patch_ptr, s_pb, s_pn, s_pd, cls_ptr, pos_ptr, D, b, t, d, t_ok, d < D)
        acc += tl.sum(x, axis=1)
    mean = acc / D
    # pass 2: LayerNorm variance (biased, as torch)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        x = _tokens(patch_ptr, s_pb, s_pn, s_pd, cls_ptr, pos_ptr, D, b, t, d, t_ok, d_ok)
        xc = tl.where(d_ok[None, :], x - mean[:, None], 0.0)
        acc += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(acc / D + eps)

    # pass 3: the prior token y (stored as output row 0) and the logits s[t] = <ln_pre(x)[t], y>
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    pp = tl.arange(0, BLOCK_P)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        xn = _normed_tokens(patch_ptr, s_pb, s_pn, s_pd, cls_ptr, pos_ptr, lnw_ptr, lnb_ptr, D, b, t, d, t_ok, d_ok,
                            mean, rstd)
        if HAS_PROJ:
            y = tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
            for p0 in range(0, P, BLOCK_P):
                p = p0 + pp
                p_ok = p < P
                r = tl.load(prior_ptr + b * P + p, mask=p_ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + d[:, None] * P + p[None, :], mask=d_ok[:, None] & p_ok[None, :],
                            other=0.0).to(tl.float32)
                y += tl.sum(w * r[None, :], axis=1)
        else:
            y = tl.load(prior_ptr + b * D + d, mask=d_ok, other=0.0).to(tl.float32)
        y = tl.where(d_ok, y, 0.0)
        tl.store(out_ptr + b * (T + 1) * D + d, y.to(out_ptr.dtype.element_ty), mask=d_ok)
        s += tl.sum(tl.where(t_ok[:, None] & d_ok[None, :], xn * y[None, :], 0.0), axis=1)

    # on-chip: softmax over the T tokens, then the stable descending order and the gate
    s = tl.where(t_ok, s, float("-inf"))
    e = tl.where(t_ok, tl.exp(s - tl.max(s, axis=0)), 0.0)
    belief = e / tl.sum(e, axis=0)
    if RANK_WEIGHTS:
        bi = belief[:, None]  # token i (rows)
        bj = belief[None, :]  # token j (columns)
        ahead = ((bj > bi) | ((bj == bi) & (t[None, :] < t[:, None]))) & t_ok[None, :]
        rank = tl.sum(ahead.to(tl.int32), axis=1)  # rank of token i: a permutation of 0..T-1
        # order[r] = the token whose rank is r (rows r, columns token i)
        hit = (rank[None, :] == t[:, None]) & t_ok[None, :]
        order = tl.sum(tl.where(hit, t[None, :], 0), axis=1)
        tl.store(order_ptr + b * T + t, order.to(tl.int64), mask=t_ok)
        g = belief + 1.0 / tl.sqrt((order + 1).to(tl.float32))  # slot r's weight on position r
    else:
        g = 2.0 * belief
    g = tl.where(t_ok, g, 0.0)

    # pass 4: gate, L2 norm over the token axis (all T rows of a channel are in the tile), rows 1..T of the output
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        xn = _normed_tokens(patch_ptr, s_pb, s_pn, s_pd, cls_ptr, pos_ptr, lnw_ptr, lnb_ptr, D, b, t, d, t_ok, d_ok,
                            mean, rstd)
        gated = tl.where(t_ok[:, None] & d_ok[None, :], xn * g[:, None], 0.0)
        nrm = tl.maximum(tl.sqrt(tl.sum(gated * gated, axis=0)), 1e-12)
        o = gated / nrm[None, :]
        tl.store(out_ptr + b * (T + 1) * D + (t[:, None] + 1) * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & d_ok[None, :])


def _launch(kernel, patches, class_embedding, positional_embedding, ln_weight, ln_bias, ln_eps, prior, proj_weight,
            proj_bias, rank_weights, out_dtype, block_d=DEFAULT_BLOCK_D, num_warps=DEFAULT_NUM_WARPS):
    b, n, d = patches.shape
    has_proj = proj_weight is not None
    p = proj_weight.shape[1] if has_proj else d
    tokens = torch.empty(b, n + 2, d, device=patches.device, dtype=out_dtype)
    order = torch.zeros(b, n + 1, device=patches.device, dtype=torch.int64)
    if b == 0:
        return tokens, order
    w = proj_weight.contiguous() if has_proj else prior  # unused pointers still need a tensor
    bias = proj_bias.contiguous() if has_proj and proj_bias is not None else (
        torch.zeros(d, device=patches.device, dtype=prior.dtype) if has_proj else prior)
    kernel[(b,)](
        patches, patches.stride(0), patches.stride(1), patches.stride(2),
        class_embedding.contiguous(), positional_embedding.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(),
        prior.contiguous(), w, bias,
        tokens, order,
        n, d, p, float(ln_eps),
        HAS_PROJ=has_proj, RANK_WEIGHTS=bool(rank_weights),
        BLOCK_T=triton.next_power_of_2(n + 1), BLOCK_D=min(block_d, triton.next_power_of_2(d)), BLOCK_P=BLOCK_P,
        num_warps=num_warps,
    )
    return tokens, order


def stem_gate_triton(patches, class_embedding, positional_embedding, ln_weight, ln_bias, ln_eps, prior,
                     proj_weight=None, proj_bias=None, variant="belief+rank", out_dtype=None,
                     block_d: int = DEFAULT_BLOCK_D, num_warps: int = DEFAULT_NUM_WARPS):
    """The fused kernel with the reference's signature (plus tuning knobs), launched directly (no torch.library).

    Runs under ``TRITON_INTERPRET=1`` on CPU tensors, which is how CI tests it.
    """
    tokens, order = _launch(_stem_gate_kernel, patches, class_embedding, positional_embedding, ln_weight, ln_bias,
                            ln_eps, prior, proj_weight, proj_bias, variant == "belief+rank",
                            out_dtype or torch.float32, block_d, num_warps)
    return tokens, (order if variant == "belief+rank" else None)


# ------------------------------------------------------------------------------------------- torch.library op


@torch.library.triton_op("priorclip::stem_gate", mutates_args=())
def _stem_gate_op(
    patches: torch.Tensor,
    class_embedding: torch.Tensor,
    positional_embedding: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    prior: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    rank_weights: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    # wrap_triton lets torch.compile / AOTInductor trace the launch and keep the kernel whole
    return _launch(torch.library.wrap_triton(_stem_gate_kernel), patches, class_embedding, positional_embedding,
                   ln_weight, ln_bias, ln_eps, prior, proj_weight, proj_bias, rank_weights, out_dtype)


@_stem_gate_op.register_fake
def _(patches, class_embedding, positional_embedding, ln_weight, ln_bias, ln_eps, prior, proj_weight, proj_bias,
      rank_weights, out_dtype):
    # Shapes only: lets FakeTensor tracing (torch.compile, torch.export) run without launching the kernel.
    b, n, d = patches.shape
    return (patches.new_empty(b, n + 2, d, dtype=out_dtype), patches.new_empty(b, n + 1, dtype=torch.int64))


def stem_gate_op(patches, class_embedding, positional_embedding, ln_weight, ln_bias, ln_eps, prior, proj_weight,
                 proj_bias, rank_weights, out_dtype):
    """``torch.ops.priorclip.stem_gate``: (tokens [B, N+2, D] out_dtype, order [B, N+1] int64)."""
    return torch.ops.priorclip.stem_gate(patches, class_embedding, positional_embedding, ln_weight, ln_bias, ln_eps,
                                         prior, proj_weight, proj_bias, rank_weights, out_dtype)
