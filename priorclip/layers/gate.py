"""The soft belief gate of open-domain PriorCLIP (spec §2A.3-2A.5), plain torch.

This is the reference implementation: fused kernels must reproduce it, and export traces it.

Math, for stem tokens x [B, T, D] (after ``ln_pre``) and the prior token y [B, 1, D]:

    s[b, t]      = <x[b, t], y[b, 0]>                      plain dot product, CLS included, no scaling
    belief[b, :] = softmax_t(s[b, :])                      in float32 (autocast runs softmax in fp32)
    pi_b(r)      = index of the token with rank r           stable descending sort of belief
    w[b, r]      = 1 / sqrt(pi_b(r) + 1)                    indexed by rank SLOT r, applied to token POSITION r
    g[b, t]      = belief[b, t] + w[b, t]                   "belief+rank";  2 * belief[b, t] for "2belief"
    out[b, :, c] = (x * g)[b, :, c] / max(||(x * g)[b, :, c]||_2, 1e-12)   L2 over the TOKEN axis (dim 1)

Numerical contract:
  * Ties (softmax entries that underflow to exactly 0 are common) are broken lower index first, on every device and
    backend. CPU ``torch.sort`` does not promise that and TensorRT's TopK does not document it, so the order is built
    from pairwise comparisons (T = 50: 2,500 compares per sample), which every backend evaluates identically.
  * The logits are computed in x's dtype; belief, w and the output are float32 (float64 for a float64 model), as dtype
    promotion makes them in the reference under autocast.
  * Batch size 1 works: only the trailing axis is squeezed (the reference's bare ``squeeze()`` fails at B = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from priorclip.config import GATE_BELIEF_PLUS_RANK, GATE_DOUBLE_BELIEF


def descending_order(v: torch.Tensor) -> torch.Tensor:
    """Indices [B, T] (int64) that sort each row of v [B, T] in descending order, equal values lower index first."""
    t = v.shape[1]
    idx = torch.arange(t, device=v.device)
    # ahead[b, i, j]: token j sorts before token i
    ahead = (v.unsqueeze(1) > v.unsqueeze(2)) | ((v.unsqueeze(1) == v.unsqueeze(2)) & (idx.view(1, 1, t) < idx.view(1, t, 1)))
    rank = ahead.sum(dim=2)  # [B, T]: rank of token i, a permutation of 0..T-1
    return torch.zeros_like(rank).scatter(1, rank, idx.expand_as(rank))  # order[b, r] = token with rank r


def belief_gate(x: torch.Tensor, y: torch.Tensor, variant: str = GATE_BELIEF_PLUS_RANK,
                return_order: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Gate and token-axis-normalise the ViT stem tokens with the prior token.

    Args:
        x: stem tokens after ``ln_pre``, [B, T, D].
        y: projected prior token, [B, 1, D].
        variant: ``"belief+rank"`` (current reference code) or ``"2belief"`` (before 2024-10-16).
        return_order: also return the belief order [B, T] int64 (token index at each rank slot; ``None`` for
            ``"2belief"``, whose gate does not depend on it), for parity checks' rank-flip rate.

    Returns:
        The gated, L2-normalised (over tokens) tokens, [B, T, D], float32 (float64 for float64 inputs); with
        ``return_order``, the pair (tokens, order).
    """
    if x.dim() != 3 or y.dim() != 3 or y.shape[1] != 1 or y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
        raise ValueError(f"belief_gate expects x [B,T,D] and y [B,1,D], got {tuple(x.shape)} and {tuple(y.shape)}")
    ct = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for a float64 model
    s = torch.matmul(x, y.to(x.dtype).transpose(1, 2)).squeeze(-1)  # [B, T]
    belief = torch.softmax(s.to(ct), dim=1)  # [B, T]
    order = None
    if variant == GATE_BELIEF_PLUS_RANK:
        order = descending_order(belief)  # [B, T]: token index at each rank slot
        w = 1.0 / torch.sqrt((order + 1).to(ct))  # [B, T], indexed by slot, applied by position
        g = belief + w
    elif variant == GATE_DOUBLE_BELIEF:
        g = 2.0 * belief
    else:
        raise ValueError(f"unknown gate variant {variant!r}")
    gated = x.to(ct) * g.unsqueeze(-1)  # [B, T, D]
    out = F.normalize(gated, p=2.0, dim=1, eps=1e-12)  # over the token axis, as the reference does
    return (out, order) if return_order else out
