"""GEMM with the PIR PAE blocks' epilogues (spec §2B, §8B.5-6): ``Linear`` + bias, a residual (optionally one source
row broadcast to ``rep`` residual rows), LayerNorm and GELU in one pass.

The MHSA / CroSA blocks run five of these: the fused QKV GEMM (512 -> 1536 + bias); merge GEMM + residual + LN1;
FFN GEMM1 + bias + LayerNorm(1024) + GELU; FFN GEMM2 + residual + LN2; and CroSA's single-query merge, where one
context vector per sample (x [B, 512]) is added to that sample's 40 tokens (residual [B*40, 512], rep=40) before LN1.
Eager PyTorch writes and re-reads the [rows, N] activation between each step; the kernel writes it once.

``pae_linear_reference`` (plain torch: the contract, what ONNX export traces) and the Triton kernel
(``priorclip.kernels.pae_linear_triton``) share one signature; :func:`pae_linear` dispatches (fused on CUDA at
inference, the reference elsewhere). The reference rounds to x's dtype after every op, as torch does; the kernel
keeps the whole epilogue in float32 and rounds once at the store.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from priorclip.kernels.belief_gate import _triton_importable, fused_enabled, kernel_failure_hint

MAX_LN_N = 2048  # LayerNorm needs the whole row in one program: wider rows run the reference


def pae_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         residual: torch.Tensor | None = None, rep: int = 1, ln_weight: torch.Tensor | None = None,
                         ln_bias: torch.Tensor | None = None, ln_eps: float = 1e-5, gelu: bool = False) -> torch.Tensor:
    """``gelu?(LayerNorm?(repeat_interleave(x @ weight.T + bias, rep) + residual))``, [M * rep, N] in x's dtype.

    Output row ``m * rep + j`` comes from source row m of x. Every optional step is skipped when its argument is
    None / False; ``rep > 1`` only makes sense with a residual.
    """
    h = F.linear(x, weight, bias)
    if rep > 1:
        h = h.repeat_interleave(rep, dim=0)
    if residual is not None:
        h = h + residual
    if ln_weight is not None:
        h = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, ln_eps)
    if gelu:
        h = F.gelu(h)
    return h


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


def _check_shapes(x, weight, bias, residual, rep, ln_weight, ln_bias) -> None:
    """One error line for inconsistent inputs: the kernel indexes raw pointers, so it must never see them."""
    ok = x.dim() == 2 and weight.dim() == 2 and x.is_floating_point() and isinstance(rep, int) and rep >= 1
    if ok:
        m, k = x.shape
        n = weight.shape[0]
        ok = (weight.shape[1] == k and (bias is None or bias.shape == (n,))
              and (residual is None or residual.shape == (m * rep, n)) and (rep == 1 or residual is not None)
              and (ln_weight is None) == (ln_bias is None)
              and (ln_weight is None or ln_weight.shape == ln_bias.shape == (n,))
              and all(t is None or t.dtype == x.dtype for t in (weight, bias, residual, ln_weight, ln_bias)))
    if not ok:
        raise ValueError(
            "pae_linear expects floating x [M,K], weight [N,K], bias [N], residual [M*rep,N] (rep >= 1; rep > 1 only "
            "with a residual), ln_weight and ln_bias both [N] or both None, all of x's dtype; got "
            f"x {_shape(x)}, weight {_shape(weight)}, bias {_shape(bias)}, residual {_shape(residual)}, rep={rep!r}, "
            f"ln_weight {_shape(ln_weight)}, ln_bias {_shape(ln_bias)}")


def pae_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, rep: int = 1, ln_weight: torch.Tensor | None = None,
               ln_bias: torch.Tensor | None = None, ln_eps: float = 1e-5, gelu: bool = False,
               kernels: str = "auto") -> torch.Tensor:
    """Dispatcher with :func:`pae_linear_reference`'s signature and results: the fused kernel (through the
    ``priorclip::pae_linear`` op) where :func:`fused_enabled` and the row fits (LayerNorm over N <= ``MAX_LN_N``),
    else the reference (``kernels="reference"`` forces it)."""
    _check_shapes(x, weight, bias, residual, rep, ln_weight, ln_bias)
    fits = ln_weight is None or weight.shape[0] <= MAX_LN_N
    if not (fused_enabled(x, weight, bias, residual, ln_weight, ln_bias, kernels=kernels) and fits):
        return pae_linear_reference(x, weight, bias, residual, rep, ln_weight, ln_bias, ln_eps, gelu)
    from priorclip.kernels.pae_linear_triton import pae_linear_op

    with kernel_failure_hint("pae_linear"):
        return pae_linear_op(x, weight, bias, residual, rep, ln_weight, ln_bias, float(ln_eps), bool(gelu))


if torch.cuda.is_available() and _triton_importable():  # register the op outside any traced region
    importlib.import_module("priorclip.kernels.pae_linear_triton")
