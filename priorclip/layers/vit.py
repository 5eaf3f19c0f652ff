"""CLIP ViT image tower with PriorCLIP's prior token and belief gate (spec §2A.2-2A.8).

Keys match open_clip's ``VisionTransformer`` (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.*``, ``ln_post``, ``proj``). Without a prior token it is exactly open_clip's ViT with
``pool_type='tok'``.
"""

from __future__ import annotations

import torch
from torch import nn

from priorclip.config import GATE_BELIEF_PLUS_RANK, VisionConfig
from priorclip.kernels.belief_gate import belief_gate, stem_gate
from priorclip.layers.transformer import Transformer


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast (meta)
        return False


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, gate: str = GATE_BELIEF_PLUS_RANK) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = gate
        width = cfg.width
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, 3, H, W] -> [B, g*g, D] (a strided view of ``conv1``'s output)."""
        return self.conv1(pixels).flatten(2).transpose(1, 2)

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS, add positions, ``ln_pre``: [B, 3, H, W] -> [B, T, D]."""
        return self._embed(self.patch_tokens(pixels))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, g*g, D] -> CLS prepended, positions added, ``ln_pre``: [B, T, D]."""
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, T, D]
        return self.ln_pre(x)

    def forward(self, pixels: torch.Tensor, prior_token: torch.Tensor | None = None, return_order: bool = False, *,
                prior_features: torch.Tensor | None = None, prior_proj: nn.Linear | None = None,
                kernels: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled image features [B, output_dim] (not normalised); with ``return_order`` also the belief order.

        With a prior, given as the token ``prior_token`` [B, 1, D] or as ``prior_features`` [B, P] and their
        projection ``prior_proj`` (which the fused kernel applies in the same launch), the stem tokens are gated by
        it, the token is prepended (no positional embedding, no ``ln_pre``) and position 0, the prior token, is
        pooled. Without one the CLS token is pooled (order None). ``kernels="reference"`` pins the plain-torch gate.
        """
        order = None
        if prior_token is None and prior_features is None:
            x = self.stem(pixels)  # [B, T, D]
        else:
            x, order = self._gated_stem(pixels, prior_token, prior_features, prior_proj, kernels)  # [B, T+1, D]
        x = self.transformer(x)
        pooled = self.ln_post(x[:, 0])  # ln_post is per token, so only token 0 needs it
        feats = pooled @ self.proj
        return (feats, order) if return_order else feats

    def _gated_stem(self, pixels, prior_token, prior_features, prior_proj, kernels):
        """The prior token, then the gated stem tokens [B, T+1, D], and the belief order.

        Through the dispatcher: the fused kernel (``priorclip.kernels.belief_gate``) where it runs; otherwise the
        reference through this model's own modules, so ``ln_pre`` and ``vision_proj_res`` keep their hooks and their
        scopes in exported graphs (INT8 keep-float patterns name them). Both compute ``stem_gate_reference``'s maths
        (tested)."""
        patches = self.patch_tokens(pixels)  # [B, g*g, D]
        # Under autocast the fp32 residual stream is what the reference runs; otherwise follow the weights.
        out_dtype = None if _autocast_enabled(pixels.device.type) else self.conv1.weight.dtype
        if prior_token is not None:
            prior, w, b = prior_token[:, 0], None, None
        else:
            prior, w, b = prior_features, prior_proj.weight, prior_proj.bias

        def through_modules():
            y = prior_token if prior_token is not None else prior_proj(prior_features).unsqueeze(1)  # [B, 1, D]
            x, order = belief_gate(self._embed(patches), y, self.gate, return_order=True)  # [B, T, D] float32
            x = torch.cat([y.to(x.dtype), x], dim=1)
            return (x if out_dtype is None else x.to(out_dtype)), order

        return stem_gate(patches, self.class_embedding, self.positional_embedding, self.ln_pre.weight,
                         self.ln_pre.bias, self.ln_pre.eps, prior, w, b, self.gate, out_dtype, kernels,
                         reference=through_modules)
