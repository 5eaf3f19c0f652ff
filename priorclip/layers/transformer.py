"""Pre-LN transformer blocks with open_clip's parameter names (``attn.in_proj_weight``, ``mlp.c_fc``, ...).

Layout is batch-first [B, L, D]; open_clip 2.24 ran its blocks sequence-first, which changes no parameter and no
result. Attention goes through ``F.scaled_dot_product_attention`` so the backend picks a fused kernel where one
exists, and ONNX export decomposes it into standard ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s packed parameters, so checkpoints load as is."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, L, hd]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # [B, H, L, hd]
        out = out.transpose(1, 2).reshape(b, n, d)  # [B, L, D]
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()  # exact erf GELU: PIR.json does not set quick_gelu
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)); no LayerScale, no dropout (spec §2A.7)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def init_clip_(self) -> None:
        """open_clip's initialisation of the blocks (std scaled by width and depth)."""
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
