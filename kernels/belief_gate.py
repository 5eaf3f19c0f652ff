"""The soft belief gate of open-domain PriorCLIP (spec §2A.3-2A.5) and the ViT stem epilogue around it.

Two functions with the same signature sit here, as in flash-attention's ops: :func:`stem_gate_reference` (plain torch,
the contract, the one ONNX export traces) and the fused Triton kernel (``priorclip.kernels.belief_gate_triton``,
one launch per batch). :func:`stem_gate` is the dispatcher the model calls: fused on CUDA at inference, the reference
elsewhere (CPU, autograd, tracing, ONNX export, ``kernels="reference"``).

Gate math, for stem tokens x [B, T, D] (after ``ln_pre``) and the prior token y [B, 1, D]:

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

import contextlib
import importlib.util
import os
from typing import Callable

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


# ------------------------------------------------------------------------------------------- stem epilogue + gate


def stem_gate_reference(
    patches: torch.Tensor,
    class_embedding: torch.Tensor,
    positional_embedding: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    prior: torch.Tensor,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    variant: str = GATE_BELIEF_PLUS_RANK,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ViT stem epilogue and belief gate, plain torch: exactly the model's own sequence of ops.

    Args:
        patches: patch embeddings (``conv1`` output, flattened), [B, N, D], any strides.
        class_embedding [D], positional_embedding [N+1, D], ln_weight/ln_bias [D], ln_eps: ``ln_pre``.
        prior: the prior network's features [B, P] when ``proj_weight`` [D, P] (and ``proj_bias`` [D]) are given,
            else the projected prior token itself, [B, D].
        variant: the gate formula.
        out_dtype: dtype of the tokens returned (default: float32, or float64 for a float64 model).

    Returns:
        tokens [B, N+2, D]: row 0 the prior token y, rows 1.. the gated, token-axis-normalised stem tokens; and the
        belief order [B, N+1] int64 (``None`` for ``"2belief"``).
    """
    x = patches
    cls = class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
    x = torch.cat([cls, x], dim=1) + positional_embedding.to(x.dtype)  # [B, T, D]
    x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
    y = prior if proj_weight is None else F.linear(prior, proj_weight, proj_bias)  # [B, D]
    out, order = belief_gate(x, y.unsqueeze(1), variant, return_order=True)  # [B, T, D] float32, [B, T]
    tokens = torch.cat([y.unsqueeze(1).to(out.dtype), out], dim=1)  # [B, T+1, D]
    return (tokens if out_dtype is None else tokens.to(out_dtype)), order


def example_inputs(b: int, n: int, d: int, p: int | None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", seed: int = 0, param_dtype: torch.dtype | None = None,
                   logit_scale: float = 3.0) -> dict:
    """Random keyword arguments for the stem-gate functions, shared by the tests and the benchmark so they cannot
    drift apart: B samples of N patches of width D, a prior of P features (``None``: an already-projected [B, D]).

    Patches are a transposed view of a [B, D, N] buffer, as ``conv1`` leaves them. ``logit_scale`` is the std of the
    logits <ln_pre(x), y> (~3 keeps beliefs apart without underflow); parameters take ``param_dtype`` (default
    ``dtype``; float32 parameters with half patches are the autocast case)."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def r(*shape, std=1.0, dt=None):
        return (std * torch.randn(*shape, generator=g)).to(device=device, dtype=dt or param_dtype)

    patches = r(b, d, n, dt=dtype).transpose(1, 2)
    ystd = logit_scale / d**0.5
    if p is None:
        prior, w, bias = r(b, d, std=ystd), None, None
    else:
        prior, w, bias = r(b, p), r(d, p, std=ystd / p**0.5), r(d, std=0.1 * ystd)
    return dict(patches=patches, class_embedding=r(d), positional_embedding=r(n + 1, d, std=0.1),
                ln_weight=1 + r(d, std=0.1), ln_bias=r(d, std=0.1), ln_eps=1e-5, prior=prior, proj_weight=w,
                proj_bias=bias)


# The environment can pin every dispatcher to its reference (e.g. to bisect a numerical difference on a GPU).
KERNELS_ENV = "PRIORCLIP_KERNELS"
KERNEL_MODES = ("auto", "reference")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_enabled(x: torch.Tensor, *tensors: torch.Tensor | None, kernels: str = "auto") -> bool:
    """Whether a dispatcher may run the fused kernel on these inputs: CUDA, inference, not tracing/exporting."""
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}")
    if kernels == "reference" or os.environ.get(KERNELS_ENV, "auto") == "reference":
        return False
    if not x.is_cuda or x.dtype not in _FUSED_DTYPES or not _triton_importable():
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False  # exported graphs carry the reference's standard ops
    # No backward is written for the kernels: training runs the reference.
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)))


_TRITON: bool | None = None


@contextlib.contextmanager
def kernel_failure_hint(name: str):
    """A fused kernel that fails to compile or launch (a Triton or driver mismatch) fails loudly, not by quietly
    running the reference, so no measurement is mislabelled; the error says how to run without it."""
    try:
        yield
    except Exception as e:
        if torch.compiler.is_compiling():
            raise
        raise RuntimeError(f"the fused {name} kernel failed ({type(e).__name__}: {e}); set {KERNELS_ENV}=reference "
                           "to run the plain-torch reference instead") from e


def _triton_importable() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


# Where the fused op can run, register it now: an import inside a region torch.compile traces is best avoided.
if torch.cuda.is_available() and _triton_importable():
    importlib.import_module("priorclip.kernels.belief_gate_triton")  # defines torch.ops.priorclip.stem_gate


def _check_stem_gate_shapes(patches, class_embedding, positional_embedding, ln_weight, ln_bias, prior, proj_weight,
                            proj_bias) -> None:
    """One error line for inconsistent shapes: the kernel indexes raw pointers, so it must never see them."""
    b, n, d = patches.shape if patches.dim() == 3 else (None, None, None)
    p = prior.shape[-1] if proj_weight is not None else d
    ok = (b is not None and prior.dim() == 2 and prior.shape == (b, p) and positional_embedding.shape == (n + 1, d)
          and all(t.shape == (d,) for t in (class_embedding, ln_weight, ln_bias))
          and (proj_weight is None or (proj_weight.shape == (d, p) and (proj_bias is None or proj_bias.shape == (d,)))))
    if not ok:
        raise ValueError(
            "stem_gate expects patches [B,N,D], class_embedding/ln_weight/ln_bias [D], positional_embedding [N+1,D], "
            "prior [B,P] with proj_weight [D,P] (proj_bias [D]) or prior [B,D] without; got "
            + ", ".join(f"{k} {None if t is None else tuple(t.shape)}" for k, t in (
                ("patches", patches), ("positional_embedding", positional_embedding), ("prior", prior),
                ("proj_weight", proj_weight))))


def stem_gate(
    patches: torch.Tensor,
    class_embedding: torch.Tensor,
    positional_embedding: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    prior: torch.Tensor,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    variant: str = GATE_BELIEF_PLUS_RANK,
    out_dtype: torch.dtype | None = None,
    kernels: str = "auto",
    reference: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatcher: the fused Triton kernel where :func:`fused_enabled`, else :func:`stem_gate_reference`.

    Same arguments and results as the reference (``kernels="reference"`` forces it). The fused path goes through
    the ``priorclip::stem_gate`` op, so ``torch.compile`` and AOTInductor keep it whole. ``reference``: the caller's
    own computation of the same maths (the model runs it through its modules), used instead of
    :func:`stem_gate_reference` where the kernel does not apply.
    """
    _check_stem_gate_shapes(patches, class_embedding, positional_embedding, ln_weight, ln_bias, prior, proj_weight,
                            proj_bias)
    if variant not in (GATE_BELIEF_PLUS_RANK, GATE_DOUBLE_BELIEF):
        raise ValueError(f"unknown gate variant {variant!r}")
    if not fused_enabled(patches, prior, class_embedding, positional_embedding, ln_weight, ln_bias, proj_weight,
                         proj_bias, kernels=kernels):
        if reference is not None:
            return reference()
        return stem_gate_reference(patches, class_embedding, positional_embedding, ln_weight, ln_bias, ln_eps,
                                   prior, proj_weight, proj_bias, variant, out_dtype)
    from priorclip.kernels.belief_gate_triton import stem_gate_op

    out_dtype = out_dtype or torch.float32
    with kernel_failure_hint("stem_gate"):
        tokens, order = stem_gate_op(patches, class_embedding, positional_embedding, ln_weight, ln_bias,
                                     float(ln_eps), prior, proj_weight, proj_bias, variant == GATE_BELIEF_PLUS_RANK,
                                     out_dtype)
    return tokens, (order if variant == GATE_BELIEF_PLUS_RANK else None)
