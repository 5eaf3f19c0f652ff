"""Progressive Attention Encoder blocks of the closed-domain PIR model (spec §2B, §3).

MHSA and CroSA are post-LN blocks around PIR's multi-head attention (separate q/k/v linears, a merge linear) and an
FFN with a LayerNorm between its two linears. Module and parameter names are the reference's, so the released
checkpoints load key for key: ``mhatt`` / ``mhatt_cross``, ``linear_{v,k,q,merge}``, ``ffn.{0,1,3}``, ``norm1``,
``norm2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MASK_FILL = -1e9  # the reference's fill for masked scores (only used with PIRConfig.mask_padding)


def mask_fill(dtype: torch.dtype) -> float:
    """The fill for masked scores of ``dtype``: the reference's -1e9, or float16's most negative finite value, where
    -1e9 overflows (torch refuses the fill); either gives masked keys exactly zero weight."""
    return max(MASK_FILL, torch.finfo(dtype).min)


class MHAtt(nn.Module):
    """Multi-head attention with separate query/key/value projections; ``key_pad`` [B, Lk] True marks keys to ignore."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        # registration order as the reference (v, k, q, merge), so state dicts list keys in the same order
        self.linear_v = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_q = nn.Linear(dim, dim)
        self.linear_merge = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B, H, N, dh]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_pad: torch.Tensor | None = None) -> torch.Tensor:
        qh, kh, vh = self._split(self.linear_q(q)), self._split(self.linear_k(k)), self._split(self.linear_v(v))
        scores = qh @ kh.transpose(-2, -1) / math.sqrt(qh.shape[-1])
        if key_pad is not None:
            scores = scores.masked_fill(key_pad[:, None, None, :], mask_fill(scores.dtype))
        att = self.dropout(scores.softmax(dim=-1))
        out = (att @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
        return self.linear_merge(out)


def ffn(dim: int) -> nn.Sequential:
    """Linear(d, 2d) -> LayerNorm(2d) -> GELU -> Linear(2d, d); indices 0, 1, 3 carry the weights."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class MHSA(nn.Module):
    """Post-LN self-attention block: x <- LN1(x + MHAtt(x, x, x)); x <- LN2(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.mhatt = MHAtt(dim, heads, dropout)
        self.ffn = ffn(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.mhatt(x, x, x, key_pad)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class CroSA(nn.Module):
    """Post-LN cross-attention block whose residual runs on ``y``: the query comes from ``x``, keys and values from
    ``y`` (so x and y have equal lengths): y <- LN1(y + MHAtt(q=x, k=y, v=y)); y <- LN2(y + FFN(y))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.mhatt_cross = MHAtt(dim, heads, dropout)
        self.ffn = ffn(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_pad: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm1(y + self.dropout1(self.mhatt_cross(x, y, y, key_pad)))
        return self.norm2(y + self.dropout2(self.ffn(y)))


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] scores -> [B, N] int64 token indices by descending score, equal scores lower index first.

    Sort implementations disagree on ties (CPU ``torch.sort`` is unstable; CUDA, ONNX Runtime and TensorRT's TopK
    are not documented to agree), and VIR's kept set depends on them. Each token's rank is counted instead — the
    tokens strictly above it plus the equal ones before it — which is the same on every backend and exports as plain
    comparisons and sums (N = 50: a [B, 50, 50] comparison).
    """
    n = scores.shape[-1]
    idx = torch.arange(n, device=scores.device)
    s_i, s_j = scores.unsqueeze(-1), scores.unsqueeze(-2)  # token i against every token j
    ahead = (s_j > s_i) | ((s_j == s_i) & (idx < idx.unsqueeze(-1)))  # [B, i, j]: j ranks before i
    rank = ahead.sum(-1)  # [B, N], a permutation of 0..N-1 per row
    # order[b, r] = the i with rank r: exactly one i matches, so the masked index sum is that index
    hit = rank.unsqueeze(-2) == idx.unsqueeze(-1)  # [B, r, i]
    return (hit.to(torch.int64) * idx).sum(-1)
