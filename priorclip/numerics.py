"""Numerics shared by the model's users: precision names, and the switches of the reference paths (export parity,
benchmark recall)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Precision names of the CLIs and engines -> torch dtypes (int8/fp8 are quantisation schemes, not tensor dtypes).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def fp32_matmuls() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block, restored after (even on error).

    torch's defaults let cuDNN convolutions run TF32 (``cudnn.allow_tf32`` is True), so an "fp32" reference on an
    Ampere+ GPU would otherwise carry ~1e-3 relative error of its own. Use it around the reference only, never
    around the engine under test: that would measure the engine in a mode it is not served in.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
