"""The serving tests' tiny model: seed 0, with non-trivial BatchNorm statistics so that folding is really exercised."""

from __future__ import annotations

import pytest
import torch

from priorclip.registry import create_model


def randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial eval statistics and affine parameters in every BatchNorm (seeded)."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model("priorclip-tiny")
    randomise_bn(model)
    return model
