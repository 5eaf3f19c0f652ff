"""VIR's hard belief filter of the closed-domain PIR model (spec §2B step 4, §8B.5 "Hard filter").

For vision tokens V [B, T, E] and the prior's instruction c [B, E]: belief = softmax_t(<V_t, c>) in float32, the
tokens ranked by descending belief (equal beliefs lower index first), and the ``keep`` of highest belief gathered in
that order. :func:`vir_filter_reference` is the model's own sequence of ops (plain torch: the contract, what ONNX
export traces); the Triton kernel (``priorclip.kernels.vir_filter_triton``, one program per sample) computes the
same in one launch; :func:`vir_filter` dispatches (fused on CUDA at inference, the reference elsewhere).

Numerical contract: the logits are rounded once to the tokens' dtype (as torch's half matmuls do), the softmax is
float32, and the ranking is on the softmax, not the logits, so beliefs that underflow to exactly 0 tie and go lower
index first, as in the reference. Kept rows are bit-identical copies of the input rows.
"""

from __future__ import annotations

import importlib
import numbers

import torch

from priorclip.kernels.belief_gate import _triton_importable, fused_enabled, kernel_failure_hint
from priorclip.layers.pae import descending_order

# The kernel holds the [T, T] rank comparison in registers: beyond this, the reference runs.
MAX_FUSED_TOKENS = 256


def vir_filter_reference(tokens: torch.Tensor, instr: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [B, keep, E] in tokens' dtype and belief order, order [B, T] int64: token index at each rank)."""
    belief = (tokens @ instr.to(tokens.dtype).unsqueeze(-1)).squeeze(-1).float().softmax(dim=-1)  # [B, T]
    order = descending_order(belief)
    kept = tokens.gather(1, order[:, :keep, None].expand(-1, -1, tokens.shape[-1]))
    return kept, order


def _check_shapes(tokens: torch.Tensor, instr: torch.Tensor, keep: int) -> None:
    """One error line for inconsistent inputs: the kernel indexes raw pointers, so it must never see them."""
    ok = (tokens.dim() == 3 and instr.dim() == 2 and instr.shape == (tokens.shape[0], tokens.shape[2])
          and instr.device == tokens.device)
    int_keep = isinstance(keep, numbers.Integral) and not isinstance(keep, bool)
    if not ok or not int_keep or not 1 <= keep <= (tokens.shape[1] if tokens.dim() == 3 else 0):
        raise ValueError(f"vir_filter expects tokens [B,T,E], instr [B,E] on the same device and an integer keep in "
                         f"1..T, got {tuple(tokens.shape)} on {tokens.device}, {tuple(instr.shape)} on "
                         f"{instr.device}, keep={keep!r}")


def vir_filter(tokens: torch.Tensor, instr: torch.Tensor, keep: int,
               kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher with :func:`vir_filter_reference`'s signature and results (``kernels="reference"`` forces it).

    The fused path (``priorclip::vir_filter``, so torch.compile keeps it whole) runs where :func:`fused_enabled`
    and T <= :data:`MAX_FUSED_TOKENS`; anything else runs the reference.
    """
    _check_shapes(tokens, instr, keep)
    if not fused_enabled(tokens, instr, kernels=kernels) or tokens.shape[1] > MAX_FUSED_TOKENS:
        return vir_filter_reference(tokens, instr, int(keep))
    from priorclip.kernels.vir_filter_triton import vir_filter_op

    with kernel_failure_hint("vir_filter"):
        return vir_filter_op(tokens, instr, int(keep))


if torch.cuda.is_available() and _triton_importable():  # register the op outside any traced region
    importlib.import_module("priorclip.kernels.vir_filter_triton")
