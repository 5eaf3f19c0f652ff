"""CLIP-style ModifiedResNet: the PriorCLIP visual prior ("instruction encoder"), spec §2A.1.

Parameter names match open_clip's ``ModifiedResNet`` (``conv1..3``, ``bn1..3``, ``layer1..4``, ``attnpool.*``) so the
``res_visual.*`` keys of an official checkpoint load strictly.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Anti-aliased stride: every conv has stride 1 and an average pool follows the 3x3 conv when stride > 1.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys "downsample.0" (conv) and "downsample.1" (bn); the pool "-1" has no parameters.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention over the flattened feature map with its mean prepended; only query 0 is kept.

    The reference computes all ``HW + 1`` queries and keeps the first. Rows of attention are independent, so computing
    query 0 alone is exact and saves about 0.53 GFLOP per 224 px image (spec §8B.3).
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C]
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"prior feature map {h}x{w} does not match its positional embedding "
                f"({self.positional_embedding.shape[0] - 1} positions): wrong input image size"
            )
        x = x + self.positional_embedding.to(x.dtype)
        hd = c // self.num_heads
        q = self.q_proj(x[:, :1]).view(b, 1, self.num_heads, hd).transpose(1, 2)  # [B, H, 1, hd]
        k = self.k_proj(x).view(b, h * w + 1, self.num_heads, hd).transpose(1, 2)  # [B, H, HW+1, hd]
        v = self.v_proj(x).view(b, h * w + 1, self.num_heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
        return self.c_proj(out.transpose(1, 2).reshape(b, c))  # [B, output_dim]

    def init_clip_(self) -> None:
        std = self.c_proj.in_features**-0.5
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(lin.weight, std=std)


class ModifiedResNet(nn.Module):
    """Three-conv stem, anti-aliased strided bottlenecks and an attention-pool head."""

    def __init__(self, layers: tuple[int, ...], output_dim: int, heads: int, image_size: int = 224, width: int = 64):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)
        self.init_clip_()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_clip_(self) -> None:
        self.attnpool.init_clip_()
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # [B, width, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 32*width, H/32, W/32]
        return self.attnpool(x)  # [B, output_dim]
