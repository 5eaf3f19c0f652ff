"""torchvision-layout bottleneck ResNet without fc: the frozen prior ("instruction encoder") of PIR, spec §1B.

The reference builds it as ``nn.Sequential(*children_of_resnet50[:-1])``, so the state-dict keys are child indices:
``0`` conv1, ``1`` bn1, ``4``-``7`` layer1-layer4 (``2`` ReLU, ``3`` max-pool and ``8`` average pool hold nothing).
Blocks are torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv and the shortcut is a strided 1x1 conv + BN.
The prior is frozen only through requires_grad, so in train mode its BatchNorm still updates running statistics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from priorclip.config import ResNetConfig
from priorclip.errors import CheckpointError


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            # Keys "downsample.0" (conv) and "downsample.1" (bn), as torchvision.
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class TorchvisionResNet(nn.Sequential):
    """images [B, 3, H, W] -> globally average-pooled features [B, cfg.out_dim] (2048 for ResNet-50)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        w = cfg.width
        stages, inplanes = [], w
        for i, blocks in enumerate(cfg.layers):
            planes = w * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        super().__init__(
            nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            *stages,
            nn.AdaptiveAvgPool2d(1),
        )
        self.out_dim = cfg.out_dim
        self.apply(_init_torchvision_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet prior expects images [B, 3, H, W], got {tuple(x.shape)}")
        # Flatten, never squeeze: a bare squeeze turns [1, C, 1, 1] into [C] and breaks batch 1 (spec §9.1).
        return super().forward(x).flatten(1)


def _init_torchvision_(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# torchvision child name -> index in the Sequential (relu, maxpool and avgpool carry no state).
_CHILD_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
_TV_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.(.+)$")


def torchvision_to_sequential(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A torchvision-named ResNet state dict -> (our Sequential-indexed keys, the dropped ``fc.*`` keys).

    Accepts a checkpoint wrapped in ``{"model": ...}`` or ``{"state_dict": ...}`` (the RSP release) and a
    ``module.`` (DataParallel) prefix. Keys already in index form, or unknown, pass through so a strict load
    reports what does not fit.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
            break
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in sd.items():
        k = key.removeprefix("module.")
        if k.startswith("fc."):
            dropped.append(key)
            continue
        m = _TV_KEY.match(k)
        out[f"{_CHILD_INDEX[m.group(1)]}.{m.group(2)}" if m else k] = value
    if "0.weight" not in out:
        raise CheckpointError("no ResNet weights found: expected torchvision keys like 'conv1.weight'")
    return out, dropped
