"""Static-scale FP8 (e4m3) quantisation of an activation, the input side of the fused engine's FP8 GEMMs.

``quantize_fp8_reference`` (plain torch: divide in float32, saturate at ±448, cast) and a one-pass Triton kernel
with the same signature; :func:`quantize_fp8` dispatches (fused on CUDA at inference, the reference elsewhere).

NOTE on why a kernel: the reference is three elementwise launches (divide into a float32 temporary, clamp, cast),
about 11 bytes of traffic per element against the kernel's 3 (bf16 in, e4m3 out). At batch 256 the prior's first
1x1 convolutions see 0.4 GB activations, where that difference is larger than the FP8 GEMM's own time.
"""

from __future__ import annotations

import importlib

import torch

from priorclip.kernels.belief_gate import _triton_importable, fused_enabled, kernel_failure_hint

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (any float dtype, contiguous) / scale (fp32, one element) -> e4m3 of x's shape, saturated at ±448.

    The division is in float32 and the cast rounds to nearest even (torch's), so values past ±448 saturate rather
    than turn into NaN on torch versions whose cast does not saturate."""
    return (x.float() / scale.float().reshape(())).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dispatcher: the one-pass kernel where :func:`~priorclip.kernels.belief_gate.fused_enabled`, else the
    reference. Same arguments and result as :func:`quantize_fp8_reference`."""
    if scale.numel() != 1:
        raise ValueError(f"quantize_fp8 takes one per-tensor scale, got a scale of shape {tuple(scale.shape)}")
    if not x.is_contiguous() or not fused_enabled(x, scale):
        return quantize_fp8_reference(x, scale)
    from priorclip.kernels.fp8_quant_triton import quantize_fp8_op

    with kernel_failure_hint("quantize_fp8"):
        return quantize_fp8_op(x, scale)


if torch.cuda.is_available() and _triton_importable():  # register the op outside any traced region
    importlib.import_module("priorclip.kernels.fp8_quant_triton")
