"""The encoder interface that evaluation, export checks, benchmarks and the service all embed through.

An encoder maps a batch of preprocessed pixels [B, 3, S, S] float32 and token ids [B, L] int64 to L2-normalised
float32 embeddings. :class:`TorchEncoder` is the reference (eager PyTorch) one; exported engines implement the same
two methods, so what is evaluated is what is served.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol, runtime_checkable

import torch

from priorclip.config import AnyConfig
from priorclip.model import PriorCLIP
from priorclip.pir import PIR


@runtime_checkable
class Encoder(Protocol):
    image_size: int
    context_length: int
    config: AnyConfig  # the model's config: which tokenizer, transform and caption batching it needs (preprocess_for)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor: ...


def encode_images_with_order(encoder: Encoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings and, where the encoder exposes it (``encode_images_with_order``), the belief order; else None."""
    fn = getattr(encoder, "encode_images_with_order", None)
    if fn is None:
        return encoder.encode_images(pixels), None
    return fn(pixels)


class TorchEncoder:
    """Eager PyTorch encoder. ``dtype`` float32 is the reference path (plain-torch ops on every device, fused kernels
    pinned off); float16/bfloat16 run under autocast, with the fused kernels where they apply (CUDA)."""

    def __init__(self, model: PriorCLIP | PIR, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device).eval()
        self.config = model.cfg
        self.image_size = model.cfg.vision.image_size
        self.context_length = model.cfg.text.context_length
        self.kernels = "reference" if dtype == torch.float32 else "auto"

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.model.encode_image(pixels.to(self.device, torch.float32), kernels=self.kernels)
        return out.float()

    @torch.inference_mode()
    def encode_images_with_order(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings and the gate's belief order [B, T] (``None`` where the model has no ranking gate)."""
        with self._autocast():
            out, order = self.model.encode_image_with_order(pixels.to(self.device, torch.float32),
                                                            kernels=self.kernels)
        return out.float(), order

    @torch.inference_mode()
    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.model.encode_text(tokens.to(self.device))
        return out.float()
