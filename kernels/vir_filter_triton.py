"""Triton kernel for :func:`priorclip.kernels.vir_filter.vir_filter_reference`: one program per sample.

    pass 1      logits s[t] = <tokens[t], instr> over E in BLOCK_E chunks, float32 accumulation, rounded once to
                the tokens' dtype (torch's half matmuls accumulate in float32 and round once)
    on-chip     float32 softmax, each token's rank by pairwise comparison of the beliefs (tokens strictly above
                it plus equal ones before it: equal beliefs lower index first), order[rank[t]] = t
    pass 2      tokens[t] copied to kept[rank[t]] where rank[t] < keep (a scatter by rank is the reference's gather
                by order, one pass); the rows are moved in their own dtype, never converted, so copies are exact

T pads to BLOCK_T = next_power_of_2(T) <= 256 (the [BLOCK_T, BLOCK_T] comparison lives in registers). Imports
triton: only the fused path imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_E = 128
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _round_logits(s, ROUND: tl.constexpr):
    """float32 logits rounded to the tokens' dtype (0: float32, 1: float16, 2: bfloat16), back in float32."""
    if ROUND == 1:
        s = s.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        # Round to nearest even on the bits: the GPU's cast does the same, but the interpreter's numpy bf16 cast
        # truncates, and a truncated logit can make or break a tie that decides the order.
        u = s.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        s = tl.where(s != s, s, u.to(tl.float32, bitcast=True))  # NaN stays NaN
    return s


@triton.jit
def _vir_filter_kernel(tok_ptr, s_tb, s_tt, s_te, ins_ptr, s_ib, s_ie, kept_ptr, order_ptr, T, E, KEEP,
                       ROUND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    ee = tl.arange(0, BLOCK_E)
    tok = tok_ptr + b * s_tb + t[:, None].to(tl.int64) * s_tt

    # pass 1: logits, float32 accumulation over E chunks, rounded once
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + ee
        e_ok = e < E
        x = tl.load(tok + e[None, :] * s_te, mask=t_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        y = tl.load(ins_ptr + b * s_ib + e * s_ie, mask=e_ok, other=0.0).to(tl.float32)
        acc += tl.sum(x * y[None, :], axis=1)
    s = _round_logits(acc, ROUND)

    # on-chip: the softmax itself, not just the logits. The reference ranks the softmax, where beliefs that
    # underflow to exactly 0 (logits > ~104 below the max, which unscaled 512-d dot products of a trained model
    # reach) tie and go lower index first; a top-k on the logits would keep the larger logit instead, so the kept
    # set would differ whenever the cut falls among underflowed tokens.
    s = tl.where(t_ok, s, float("-inf"))
    p = tl.where(t_ok, tl.exp(s - tl.max(s, axis=0)), 0.0)
    # IEEE division, as torch's softmax. Padded lanes get -1, below every belief (>= 0): they rank after every
    # token without leaning on the index rule (which would also put them last, their indices being the highest).
    belief = tl.where(t_ok, tl.div_rn(p, tl.sum(p, axis=0)), -1.0)
    bi = belief[:, None]  # token i (rows)
    bj = belief[None, :]  # token j (columns)
    ahead = (bj > bi) | ((bj == bi) & (t[None, :] < t[:, None]))  # token j ranks before token i
    rank = tl.sum(ahead.to(tl.int32), axis=1)  # a permutation of 0..T-1 on real lanes, >= T on padded ones
    tl.store(order_ptr + b * T + rank, t.to(tl.int64), mask=t_ok)

    # pass 2: row t to kept[rank[t]] for the kept ranks, copied in the tokens' dtype
    take = t_ok & (rank < KEEP)
    dst = kept_ptr + b * KEEP * E + rank[:, None].to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        e = e0 + ee
        m = take[:, None] & (e < E)[None, :]
        tl.store(dst + e[None, :], tl.load(tok + e[None, :] * s_te, mask=m), mask=m)


def _launch(kernel, tokens: torch.Tensor, instr: torch.Tensor, keep: int,
            block_e: int = DEFAULT_BLOCK_E) -> tuple[torch.Tensor, torch.Tensor]:
    b, t, e = tokens.shape
    if tokens.dtype not in _ROUND or not 1 <= t <= 256:
        raise ValueError(f"the vir_filter kernel takes float32/float16/bfloat16 tokens with 1..256 tokens, got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    kept = torch.empty(b, keep, e, device=tokens.device, dtype=tokens.dtype)
    order = torch.empty(b, t, device=tokens.device, dtype=torch.int64)
    if b == 0:
        return kept, order
    instr = instr.to(tokens.dtype)  # as the reference, rounded by torch (the interpreter's bf16 cast truncates)
    block_t = triton.next_power_of_2(t)
    kernel[(b,)](tokens, tokens.stride(0), tokens.stride(1), tokens.stride(2), instr, instr.stride(0),
                 instr.stride(1), kept, order, t, e, keep, ROUND=_ROUND[tokens.dtype], BLOCK_T=block_t,
                 BLOCK_E=min(block_e, triton.next_power_of_2(e)), num_warps=4 if block_t <= 64 else 8)
    return kept, order


def vir_filter_triton(tokens: torch.Tensor, instr: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel with the reference's signature, launched directly (runs under ``TRITON_INTERPRET=1`` on CPU)."""
    return _launch(_vir_filter_kernel, tokens, instr, int(keep))


@torch.library.triton_op("priorclip::vir_filter", mutates_args=())
def _vir_filter_op(tokens: torch.Tensor, instr: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    # wrap_triton lets torch.compile / AOTInductor trace the launch and keep the kernel whole
    return _launch(torch.library.wrap_triton(_vir_filter_kernel), tokens, instr, keep)


@_vir_filter_op.register_fake
def _(tokens, instr, keep):
    b, t, e = tokens.shape
    return tokens.new_empty(b, keep, e), tokens.new_empty(b, t, dtype=torch.int64)


def vir_filter_op(tokens: torch.Tensor, instr: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.priorclip.vir_filter``: (kept [B, keep, E] in tokens' dtype, order [B, T] int64)."""
    return torch.ops.priorclip.vir_filter(tokens, instr, keep)
