"""CLIP ViT image tower with PriorCLIP's prior token and belief gate (spec §2A.2-2A.8).

Keys match open_clip's ``VisionTransformer`` (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.*``, ``ln_post``, ``proj``). Without a prior token it is exactly open_clip's ViT with
``pool_type='tok'``.
"""

from __future__ import annotations

import torch
from torch import nn

from priorclip.config import GATE_BELIEF_PLUS_RANK, VisionConfig
from priorclip.layers.gate import belief_gate
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

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS, add positions, ``ln_pre``: [B, 3, H, W] -> [B, T, D]."""
        x = self.conv1(pixels)  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, T, D]
        return self.ln_pre(x)

    def forward(self, pixels: torch.Tensor, prior_token: torch.Tensor | None = None,
                return_order: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled image features [B, output_dim] (not normalised); with ``return_order`` also the belief order.

        With ``prior_token`` [B, 1, D] the stem tokens are gated by it, the token is prepended (no positional embedding,
        no ``ln_pre``) and position 0, the prior token, is pooled. Without it the CLS token is pooled (order None).
        """
        x = self.stem(pixels)  # [B, T, D]
        order = None
        if prior_token is not None:
            x, order = belief_gate(x, prior_token, self.gate, return_order=True)  # [B, T, D] float32, [B, T]
            x = torch.cat([prior_token.to(x.dtype), x], dim=1)  # [B, T+1, D]
            if not _autocast_enabled(x.device.type):
                # Under autocast the fp32 residual stream is what the reference runs; otherwise follow the weights.
                x = x.to(self.conv1.weight.dtype)
        x = self.transformer(x)
        pooled = self.ln_post(x[:, 0])  # ln_post is per token, so only token 0 needs it
        feats = pooled @ self.proj
        return (feats, order) if return_order else feats
