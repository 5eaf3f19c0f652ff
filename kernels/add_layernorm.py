"""Residual add fused with the LayerNorm after it: ``s = x + delta; h = LayerNorm(s)``, both returned.

Every pre-LN block does this twice (``x + attn`` then ``ln_2``; ``x + mlp`` then the next block's ``ln_1``): eager
PyTorch reads and writes the [rows, D] stream once for the add and reads it again for the norm; the kernel reads x
and delta once and writes s and h. A candidate (spec §8B.2): the fused engine uses it only with ``fused_norms=True``
until the kernel benchmark shows it beating the library on the GPU.

``add_layernorm_reference`` (plain torch) and the Triton kernel (``add_layernorm_triton``) share one signature;
:func:`add_layernorm` dispatches (fused on CUDA at inference, the reference elsewhere). The sum is rounded to the
inputs' dtype before it is normalised, as the reference does.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from priorclip.kernels.belief_gate import _triton_importable, fused_enabled, kernel_failure_hint


def add_layernorm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, LayerNorm(x + delta)) over the last axis, in x's dtype."""
    s = x + delta
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def add_layernorm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher with :func:`add_layernorm_reference`'s signature and results."""
    if x.shape != delta.shape or x.dtype != delta.dtype or weight.shape != (x.shape[-1],):
        raise ValueError(f"add_layernorm expects x and delta of one shape and dtype and a [{x.shape[-1]}] weight, got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(delta.shape)} {delta.dtype}, {tuple(weight.shape)}")
    if not fused_enabled(x, delta, weight, bias):
        return add_layernorm_reference(x, delta, weight, bias, eps)
    from priorclip.kernels.add_layernorm_triton import add_layernorm_op

    with kernel_failure_hint("add_layernorm"):
        return add_layernorm_op(x, delta, weight, bias, float(eps))


if torch.cuda.is_available() and _triton_importable():  # register the op outside any traced region
    importlib.import_module("priorclip.kernels.add_layernorm_triton")
