"""PIR's Progressive Attention Encoder blocks through the fused kernels (spec §2B, §3, §8B.5-6): inference only.

Each block is a handful of launches instead of eager's ~20 per block:

* MHSA: one QKV GEMM (E -> 3E), the short-sequence attention reading q/k/v straight from it, the merge GEMM with
  residual + LN1 in its epilogue, FFN GEMM1 + bias + LayerNorm(2E) + GELU, GEMM2 + residual + LN2
  (:func:`mhsa`);
* VIR's CroSA: its 40 query rows are one row repeated (the instruction), so the query is projected once per sample
  with ``mapping_img[i]`` folded into it (W_q W_map, W_q b_map + b_q, computed in float64), K and V come from one
  E -> 2E GEMM, and the single context vector is broadcast-added to every token in the merge GEMM's epilogue
  before LN1 (:func:`crosa_single_query`);
* LCA's CroSA: full-length queries with ``mapping_txt[i]`` folded likewise (:func:`crosa`);
* the last block of each chain computes row 0 only, the only row either tower pools (exact: rows are independent
  after the attention, whose keys and values still come from every row).

The ops are the dispatchers of :mod:`priorclip.kernels.pae_linear`, :mod:`~priorclip.kernels.pae_attention` and
:mod:`~priorclip.kernels.vir_filter` (Triton on CUDA at inference, their plain-torch references elsewhere);
:data:`TRITON` runs the Triton launchers directly (the interpreter on CPU: how CI tests this composition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from priorclip.kernels.pae_attention import pae_attention
from priorclip.kernels.pae_linear import pae_linear
from priorclip.kernels.vir_filter import vir_filter
from priorclip.layers.pae import MHSA, CroSA


class PAEOps(NamedTuple):
    """The three kernels a PAE chain is made of, with the references' signatures."""

    linear: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    vir_filter: Callable[..., tuple[torch.Tensor, torch.Tensor]]


DISPATCH = PAEOps(pae_linear, pae_attention, vir_filter)


def triton_ops() -> PAEOps:
    """The Triton launchers themselves (imports triton; under ``TRITON_INTERPRET=1`` they run on CPU)."""
    from priorclip.kernels.pae_attention_triton import pae_attention_triton
    from priorclip.kernels.pae_linear_triton import pae_linear_triton
    from priorclip.kernels.vir_filter_triton import vir_filter_triton

    return PAEOps(pae_linear_triton, pae_attention_triton, vir_filter_triton)


def _copy(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype, copy=True).contiguous()


@dataclass
class Dense:
    """A linear layer's weight [N, K] and bias [N] in the engine's device and dtype."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def of(cls, *layers: nn.Linear, device: torch.device, dtype: torch.dtype) -> Dense:
        """Several linears over the same input stacked into one GEMM (their outputs side by side, in order)."""
        return cls(_copy(torch.cat([m.weight for m in layers]), device, dtype),
                   _copy(torch.cat([m.bias for m in layers]), device, dtype))

    @classmethod
    def folded(cls, outer: nn.Linear, inner: nn.Linear, device: torch.device, dtype: torch.dtype) -> Dense:
        """``outer(inner(x))`` as one linear: W_o W_i and W_o b_i + b_o, computed in float64 then rounded once."""
        wo, wi = outer.weight.detach().double(), inner.weight.detach().double()
        bias = wo @ inner.bias.detach().double() + outer.bias.detach().double()
        return cls(_copy(wo @ wi, device, dtype), _copy(bias, device, dtype))


Norm = tuple[torch.Tensor, torch.Tensor, float]


def _norm(ln: nn.LayerNorm, device: torch.device, dtype: torch.dtype) -> Norm:
    return _copy(ln.weight, device, dtype), _copy(ln.bias, device, dtype), float(ln.eps)


@dataclass
class BlockWeights:
    """One MHSA or CroSA block, prepared for the kernels. ``qkv`` packs [q; k; v] for MHSA; a CroSA has ``q`` (its
    query projection with the chain's mapping folded in) and ``kv`` ([k; v]) instead."""

    heads: int
    merge: Dense
    ffn1: Dense
    ffn_norm: Norm
    ffn2: Dense
    norm1: Norm
    norm2: Norm
    qkv: Dense | None = None
    q: Dense | None = None
    kv: Dense | None = None

    @classmethod
    def of(cls, block: MHSA | CroSA, device: torch.device, dtype: torch.dtype,
           mapping: nn.Linear | None = None) -> BlockWeights:
        """From an MHSA block, or a CroSA block and the mapping applied to its query input."""
        att = block.mhatt if isinstance(block, MHSA) else block.mhatt_cross
        common = dict(heads=att.heads, merge=Dense.of(att.linear_merge, device=device, dtype=dtype),
                      ffn1=Dense.of(block.ffn[0], device=device, dtype=dtype),
                      ffn_norm=_norm(block.ffn[1], device, dtype),
                      ffn2=Dense.of(block.ffn[3], device=device, dtype=dtype),
                      norm1=_norm(block.norm1, device, dtype), norm2=_norm(block.norm2, device, dtype))
        if isinstance(block, MHSA):
            return cls(qkv=Dense.of(att.linear_q, att.linear_k, att.linear_v, device=device, dtype=dtype), **common)
        if mapping is None:
            raise ValueError("a CroSA block needs the mapping applied to its query input")
        return cls(q=Dense.folded(att.linear_q, mapping, device, dtype),
                   kv=Dense.of(att.linear_k, att.linear_v, device=device, dtype=dtype), **common)


def _ffn(x: torch.Tensor, w: BlockWeights, ops: PAEOps) -> torch.Tensor:
    """LN2(x + FFN(x)) on rows [M, E]."""
    h = ops.linear(x, w.ffn1.weight, w.ffn1.bias, ln_weight=w.ffn_norm[0], ln_bias=w.ffn_norm[1],
                   ln_eps=w.ffn_norm[2], gelu=True)
    return ops.linear(h, w.ffn2.weight, w.ffn2.bias, residual=x, ln_weight=w.norm2[0], ln_bias=w.norm2[1],
                      ln_eps=w.norm2[2])


def _merge(ctx: torch.Tensor, residual: torch.Tensor, w: BlockWeights, ops: PAEOps, rep: int = 1) -> torch.Tensor:
    """LN1(residual + merge(ctx)), each ctx row added to ``rep`` consecutive residual rows."""
    return ops.linear(ctx, w.merge.weight, w.merge.bias, residual=residual, rep=rep, ln_weight=w.norm1[0],
                      ln_bias=w.norm1[1], ln_eps=w.norm1[2])


def mhsa(x: torch.Tensor, w: BlockWeights, key_pad: torch.Tensor | None = None,
         ops: PAEOps = DISPATCH) -> torch.Tensor:
    """MHSA on [B, N, E]: x <- LN1(x + MHAtt(x, x, x)); x <- LN2(x + FFN(x))."""
    b, n, e = x.shape
    rows = x.reshape(b * n, e)
    qkv = ops.linear(rows, w.qkv.weight, w.qkv.bias).view(b, n, 3 * e)
    ctx = ops.attention(qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:], w.heads, key_pad)
    return _ffn(_merge(ctx.reshape(b * n, e), rows, w, ops), w, ops).view(b, n, e)


def crosa_single_query(query: torch.Tensor, y: torch.Tensor, w: BlockWeights, first_only: bool = False,
                       ops: PAEOps = DISPATCH) -> torch.Tensor:
    """VIR's CroSA whose query rows are all ``query`` [B, E] (the instruction, before the folded mapping): [B, N, E]
    (or [B, 1, E] with ``first_only``)."""
    b, n, e = y.shape
    q = ops.linear(query, w.q.weight, w.q.bias).view(b, 1, e)
    kv = ops.linear(y.reshape(b * n, e), w.kv.weight, w.kv.bias).view(b, n, 2 * e)
    ctx = ops.attention(q, kv[..., :e], kv[..., e:], w.heads).reshape(b, e)  # one context vector per sample
    keep = y[:, :1] if first_only else y
    rows = _merge(ctx, keep.reshape(-1, e), w, ops, rep=keep.shape[1])
    return _ffn(rows, w, ops).view(b, keep.shape[1], e)


def crosa(x: torch.Tensor, y: torch.Tensor, w: BlockWeights, key_pad: torch.Tensor | None = None,
          first_only: bool = False, ops: PAEOps = DISPATCH) -> torch.Tensor:
    """LCA's CroSA: queries from ``x`` [B, L, E] (before the folded mapping), keys, values and residual from ``y``:
    [B, L, E] (or [B, 1, E] with ``first_only``)."""
    b, n, e = y.shape
    src = x[:, :1] if first_only else x
    lq = src.shape[1]
    q = ops.linear(src.reshape(b * lq, e), w.q.weight, w.q.bias).view(b, lq, e)
    kv = ops.linear(y.reshape(b * n, e), w.kv.weight, w.kv.bias).view(b, n, 2 * e)
    ctx = ops.attention(q, kv[..., :e], kv[..., e:], w.heads, key_pad)
    rows = _merge(ctx.reshape(b * lq, e), y[:, :lq].reshape(b * lq, e), w, ops)
    return _ffn(rows, w, ops).view(b, lq, e)


@dataclass
class ChainWeights:
    """VIR's or LCA's stack: (MHSA, CroSA) pairs, each CroSA with its mapping folded into the query."""

    sa: list[BlockWeights]
    ca: list[BlockWeights]

    @classmethod
    def of(cls, sa: nn.ModuleList, ca: nn.ModuleList, mappings: nn.ModuleList, device: torch.device,
           dtype: torch.dtype) -> ChainWeights:
        return cls([BlockWeights.of(s, device, dtype) for s in sa],
                   [BlockWeights.of(c, device, dtype, m) for c, m in zip(ca, mappings)])


def vir(tokens: torch.Tensor, instr: torch.Tensor, chain: ChainWeights, keep: int,
        ops: PAEOps = DISPATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """VIR (spec §2B): projected Swin tokens [B, T, E] and instruction [B, E] -> (F_last[:, 0] [B, E], belief order
    [B, T] int64)."""
    f, order = ops.vir_filter(tokens, instr, keep)
    last = len(chain.sa) - 1
    for i, (sa, ca) in enumerate(zip(chain.sa, chain.ca)):
        f = crosa_single_query(instr, mhsa(f, sa, ops=ops), ca, first_only=i == last, ops=ops)
    return f[:, 0], order


def lca(tokens: torch.Tensor, chain: ChainWeights, key_pad: torch.Tensor | None = None,
        ops: PAEOps = DISPATCH) -> torch.Tensor:
    """LCA (spec §3): projected BERT tokens [B, L, E] -> T_last[:, 0] [B, E]."""
    t = tokens
    last = len(chain.sa) - 1
    for i, (sa, ca) in enumerate(zip(chain.sa, chain.ca)):
        t = crosa(t, mhsa(t, sa, key_pad, ops), ca, key_pad, first_only=i == last, ops=ops)
    return t[:, 0]
