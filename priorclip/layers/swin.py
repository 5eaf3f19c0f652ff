"""Swin Transformer image tower of the closed-domain PIR model (spec §1B, §5B).

``SwinTransformer(cfg)(pixels [B,3,S,S]) -> [B, 1 + grid*grid, width]``: the final-norm tokens of the last stage with
their mean prepended as token 0 (PIR's "CLS"). State-dict keys, shapes and persistent buffers are those of the
official PIR checkpoint's ``vision_encoder.*`` (Microsoft's Swin layout): ``relative_position_index`` is saved for
every block and ``attn_mask`` only for shifted blocks.

Export: every reshape keeps the batch as ``-1`` and the masks are buffers, so the graph has a symbolic batch axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from priorclip.config import SwinConfig

LN_EPS = 1e-5
MASK_VALUE = -100.0  # the reference's value for cross-region pairs (not -inf), kept for bitwise-close parity


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window*window, C], windows in row-major order per image."""
    _, h, w, c = x.shape
    x = x.reshape(-1, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window*window, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """int64 [w*w, w*w]: row of the (2w-1)^2 bias table for each query/key pair, (dy, dx) flattened dy-major."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dy = rows[:, None] - rows[None, :] + window - 1
    dx = cols[:, None] - cols[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """float [nW, w*w, w*w]: 0 within a region of the cyclically shifted grid, ``MASK_VALUE`` across regions.

    Each axis of the shifted grid has three regions, [0, R-w), [R-w, R-s) and [R-s, R); a token pair may attend only
    when both lie in the same region on both axes, which stops tokens that the roll wrapped round from mixing."""
    bounds = torch.tensor([resolution - window, resolution - shift])
    band = torch.bucketize(torch.arange(resolution), bounds, right=True)  # region of each row/column: 0, 1 or 2
    region = (band[:, None] * 3 + band[None, :]).to(torch.float32)[None, :, :, None]  # [1, R, R, 1]
    labels = window_partition(region, window).squeeze(-1)  # [nW, w*w]
    differ = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(differ.shape).masked_fill(differ, MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability ``p``, scale kept ones."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias per head."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))  # persistent: in the ckpt
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """[heads, w*w, w*w]."""
        n = self.window * self.window
        return self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1).permute(
            2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B*nW, N, C]; ``mask`` [nW, N, N] added per window (the batch is the outer factor of B*nW)."""
        _, n, c = x.shape
        q, k, v = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias()  # [B*nW, heads, N, N]
        if mask is not None:
            attn = attn.reshape(-1, mask.shape[0], self.heads, n, n) + mask[:, None]
            attn = attn.reshape(-1, self.heads, n, n)
        out = attn.softmax(dim=-1) @ v  # [B*nW, heads, N, hd]
        return self.proj(out.transpose(1, 2).reshape(-1, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # erf GELU


class SwinBlock(nn.Module):
    """Pre-LN (shifted-)window attention then MLP, each residual. Tokens [B, R*R, C] in row-major grid order.

    A grid no larger than the window is one window without shift (the last Swin-T stage)."""

    def __init__(self, dim: int, heads: int, resolution: int, window: int, shift: int, mlp_ratio: float,
                 drop_path: float) -> None:
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        if resolution % window:
            raise ValueError(f"swin grid {resolution} is not a multiple of the window {window}")
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # A None buffer is left out of the state dict, as in the checkpoint, where unshifted blocks have no mask.
        self.register_buffer("attn_mask", shifted_window_mask(resolution, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, w, s = self.resolution, self.window, self.shift
        c = x.shape[-1]
        y = self.norm1(x).reshape(-1, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, w), self.attn_mask), w, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y.reshape(-1, r * r, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, window={self.window}, shift={self.shift}"


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: [B, R*R, C] -> [B, (R/2)^2, 2C]."""

    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)  # registered first: the checkpoint's key order
        self.norm = nn.LayerNorm(4 * dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.resolution, x.shape[-1]
        x = x.reshape(-1, r, r, c)
        # Channel order (row offset, column offset): (0,0), (1,0), (0,1), (1,1), as the reduction weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(-1, (r // 2) ** 2, 4 * c)))


class SwinStage(nn.Module):
    """One resolution: blocks alternating plain and shifted windows, then patch merging (not after the last stage).
    :class:`SwinTransformer` runs the blocks one by one, so that each can be checkpointed."""

    def __init__(self, dim: int, depth: int, heads: int, resolution: int, window: int, mlp_ratio: float,
                 drop_paths: list[float], downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, resolution, window, window // 2 if i % 2 else 0, mlp_ratio, drop_paths[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim, resolution) if downsample else None


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pixels).flatten(2).transpose(1, 2))  # [B, g*g, C]


class SwinTransformer(nn.Module):
    """PIR's Swin image tower. Set ``grad_checkpointing = True`` to recompute each block in the backward pass."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        # Stochastic depth, linear over all blocks; on the CPU, so that a model can be built under torch.device("meta").
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths), device="cpu").tolist()
        stages, first = [], 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.heads)):
            stages.append(SwinStage(
                cfg.embed_dim * 2**i, depth, heads, cfg.image_size // cfg.patch_size // 2**i, cfg.window_size,
                cfg.mlp_ratio, rates[first:first + depth], downsample=i < len(cfg.depths) - 1))
            first += depth
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.apply(_init_weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s) or not pixels.is_floating_point():
            raise ValueError(f"SwinTransformer expects float pixels [B, 3, {s}, {s}], got {pixels.dtype} "
                             f"{list(pixels.shape)}")
        x = self.patch_embed(pixels)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.layers:
            for block in stage.blocks:
                x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


def _init_weights(m: nn.Module) -> None:
    # Swin's initialisation (trunc-normal 0.02 linears, zero biases); the PIR model then loads pretrained weights.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
