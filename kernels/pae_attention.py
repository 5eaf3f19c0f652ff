"""The attention core of PIR's PAE blocks (``MHAtt`` in ``priorclip.layers.pae``; spec §2B, §3, §8B.5-6), between
the q/k/v projections and the merge linear: ``softmax(q kᵀ / sqrt(dh) [key_pad -> -1e9]) v`` per head.

The sequences are short (VIR's MHSA: 40 tokens; VIR's CroSA: one query per sample against 40 keys; LCA: Lq = Lk <= 47
with padding attended), so one head's whole [Lq, Lk] score tile fits on-chip: the Triton kernel runs one program per
(sample, head) and never writes the scores, where eager PyTorch writes and re-reads them and the split/merge copies.
q, k and v may be views of one packed projection output ([B, L, 3E] or [B, L, 2E]): only the last axis must have
stride 1, the kernel reads the real strides.

``pae_attention_reference`` (plain torch, MHAtt's own ops in MHAtt's order, so bit-identical to it; what ONNX export
traces) and the kernel (``pae_attention_triton``) share one signature; :func:`pae_attention` dispatches (fused on CUDA
at inference, the reference elsewhere). Numerics of the kernel: scores and softmax in float32 (IEEE dots for float32
inputs, tensor cores for half types), masked keys filled with -1e9 as the reference does (a fully masked row gives
the uniform average over the Lk keys), probabilities rounded to the input dtype before the PV dot (as the reference
rounds its softmax output), the output in q's dtype.
The float16 reference fills -65504 where -1e9 does not fit; the kernel fills -1e9 in float32: both give masked keys
exactly zero weight.
"""

from __future__ import annotations

import importlib
import math

import torch

from priorclip.kernels.belief_gate import _triton_importable, fused_enabled, kernel_failure_hint
from priorclip.layers.pae import mask_fill  # the reference's fill for masked scores (-1e9; float16: -65504)
# The kernel holds a head's whole [Lq, Lk] tile on-chip (PIR's sequences are <= 47). Its shared memory, compiled for
# sm_90 at 8 warps: 192 KiB at 256 x 256 with dh 128 in half types, 320 KiB at 256 x 256 in float32 (past the
# H100's 227 KiB) but 192 KiB at 128 x 128 with dh 128.
MAX_LEN = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 128}
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # tl.dot's smallest inner dimension; the shared-memory bound above


def pae_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                            key_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention core, plain torch: q [B, Lq, E], k and v [B, Lk, E] (any strides), ``key_pad`` [B, Lk]
    bool (True: the key is ignored). Returns [B, Lq, E], contiguous, in q's dtype. No dropout (inference)."""
    b, lq, e = q.shape
    # reshape, not view: q/k/v may be slices of a packed projection (for those it is a view all the same)
    qh = q.reshape(b, lq, heads, e // heads).transpose(1, 2)  # [B, H, Lq, dh]
    kh = k.reshape(b, k.shape[1], heads, e // heads).transpose(1, 2)
    vh = v.reshape(b, v.shape[1], heads, e // heads).transpose(1, 2)
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(qh.shape[-1])
    if key_pad is not None:
        scores = scores.masked_fill(key_pad[:, None, None, :], mask_fill(scores.dtype))
    att = scores.softmax(dim=-1)
    return (att @ vh).transpose(1, 2).reshape(b, lq, e).contiguous()  # e, not MHAtt's -1: B = 0 works


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  key_pad: torch.Tensor | None) -> None:
    """One error line for inconsistent inputs: the kernel indexes raw pointers, so it must never see them."""
    def shapes() -> str:
        pad = None if key_pad is None else f"{tuple(key_pad.shape)} {key_pad.dtype}"
        return (f"got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}, "
                f"heads {heads}, key_pad {pad}")

    head = "pae_attention expects "
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(head + "q [B,Lq,E], k and v [B,Lk,E]; " + shapes())
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(head + "k and v of one shape [B,Lk,E] with q's B and E; " + shapes())
    if not isinstance(heads, int) or heads <= 0 or q.shape[2] % heads:
        raise ValueError(head + "a positive number of heads dividing E; " + shapes())
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(head + "q, k and v of one dtype; " + shapes())
    if key_pad is not None and (key_pad.dtype != torch.bool or key_pad.shape != (k.shape[0], k.shape[1])):
        raise ValueError(head + "key_pad [B,Lk] bool; " + shapes())


def _kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """The shapes the kernel is written for: a power-of-two head width from 16 to 128, short sequences (up to 256
    in half types, 128 in float32), rows read with stride 1 (the packed-projection views qualify)."""
    dh = q.shape[2] // heads
    max_len = MAX_LEN.get(q.dtype, 0)
    return (MIN_HEAD_DIM <= dh <= MAX_HEAD_DIM and dh & (dh - 1) == 0 and q.shape[1] <= max_len
            and k.shape[1] <= max_len and all(t.stride(2) == 1 for t in (q, k, v)))


def pae_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  key_pad: torch.Tensor | None = None, kernels: str = "auto") -> torch.Tensor:
    """Dispatcher with :func:`pae_attention_reference`'s signature and results: the fused Triton kernel where
    :func:`fused_enabled` and :func:`_kernel_supports` (the reference elsewhere; ``kernels="reference"`` forces it)."""
    _check_inputs(q, k, v, heads, key_pad)
    if not fused_enabled(q, k, v, kernels=kernels) or not _kernel_supports(q, k, v, heads):
        return pae_attention_reference(q, k, v, heads, key_pad)
    from priorclip.kernels.pae_attention_triton import pae_attention_op

    with kernel_failure_hint("pae_attention"):
        return pae_attention_op(q, k, v, int(heads), key_pad)


if torch.cuda.is_available() and _triton_importable():  # register the op outside any traced region
    importlib.import_module("priorclip.kernels.pae_attention_triton")
