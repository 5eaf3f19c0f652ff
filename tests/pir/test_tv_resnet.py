"""PIR's torchvision-layout ResNet prior against a float64 re-derivation with F.conv2d / F.batch_norm / F.max_pool2d,
its BatchNorm train-mode updates, the torchvision -> Sequential key map and the full ResNet-50 counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from priorclip.errors import CheckpointError
from priorclip.layers.tv_resnet import TorchvisionResNet, torchvision_to_sequential
from priorclip.registry import get_config

TINY = get_config("pir-tiny").prior
FULL = get_config("pir-swin-t-bert").prior
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine and statistics, so eval-mode BN is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def _reference(sd: dict[str, torch.Tensor], x: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """torchvision ResNet v1.5 forward from the Sequential-indexed state dict, eval-mode BN (eps 1e-5)."""

    def bn(y, prefix):
        return F.batch_norm(y, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                            sd[f"{prefix}.bias"], training=False, eps=1e-5)

    y = F.relu(bn(F.conv2d(x, sd["0.weight"], stride=2, padding=3), "1"))
    y = F.max_pool2d(y, kernel_size=3, stride=2, padding=1)
    for stage, blocks in enumerate(layers):
        for j in range(blocks):
            p = f"{4 + stage}.{j}"
            stride = 2 if stage > 0 and j == 0 else 1
            out = F.relu(bn(F.conv2d(y, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            # The first block of every stage changes width (64 -> 256 in stage 1), so it always has a projection.
            short = bn(F.conv2d(y, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") if j == 0 else y
            y = F.relu(out + short)
    return y.mean(dim=(2, 3))


@pytest.mark.parametrize("batch, size", [(1, 64), (2, 45)])
def test_matches_float64_rederivation(batch, size):
    torch.manual_seed(0)
    model = TorchvisionResNet(TINY)
    _randomise_bn(model)
    model = model.double().eval()
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
    ref = _reference(model.state_dict(), x, TINY.layers)
    assert got.shape == (batch, TINY.out_dim) == (batch, 256)
    assert (got - ref).abs().max().item() <= 1e-10


def test_train_mode_updates_running_stats_of_a_frozen_prior():
    torch.manual_seed(0)
    model = TorchvisionResNet(TINY).requires_grad_(False).train()  # frozen the reference way: requires_grad only
    x = torch.randn(4, 3, 32, 32)
    old_mean, old_var = model[1].running_mean.clone(), model[1].running_var.clone()
    with torch.no_grad():
        model(x)
        stem = F.conv2d(x, model[0].weight, stride=2, padding=3)
    mean, var = stem.mean(dim=(0, 2, 3)), stem.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(model[1].running_mean, 0.9 * old_mean + 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, 0.9 * old_var + 0.1 * var, rtol=1e-5, atol=1e-6)
    counts = [b.item() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts == [1] * 17  # stem + 4 blocks x (3 + downsample)


def _torchvision_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    out = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        out[f"{names[head]}.{rest}"] = v.clone()
    return out


def test_torchvision_key_map_with_wrapper_prefix_and_fc():
    torch.manual_seed(0)
    source = TorchvisionResNet(TINY).eval()
    _randomise_bn(source)
    tv = _torchvision_names(source.state_dict())
    assert "layer1.0.downsample.1.running_var" in tv and "bn1.num_batches_tracked" in tv
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(30, TINY.out_dim), torch.zeros(30)
    checkpoint = {"model": {"module." + k: v for k, v in tv.items()}, "epoch": 100}

    mapped, dropped = torchvision_to_sequential(checkpoint)
    assert sorted(dropped) == ["module.fc.bias", "module.fc.weight"]
    assert list(mapped) == list(source.state_dict())
    target = TorchvisionResNet(TINY).eval()
    target.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))

    for plain in ({"state_dict": tv}, tv, source.state_dict()):  # other wrapper, none, already indexed
        mapped, dropped = torchvision_to_sequential(plain)
        assert set(mapped) == set(source.state_dict())
    with pytest.raises(CheckpointError, match="no ResNet weights"):
        torchvision_to_sequential({"model": {"backbone.conv1.weight": torch.zeros(1)}})


def test_full_resnet50_counts_and_keys():
    model = TorchvisionResNet(FULL)
    assert sum(p.numel() for p in model.parameters()) == 23_508_032
    buffers = [n for n, _ in model.named_buffers()]
    assert len(buffers) == 159 and all(n.rsplit(".", 1)[1] in BN_BUFFERS for n in buffers)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 53
    keys = model.state_dict()
    for k in ("0.weight", "1.num_batches_tracked", "4.0.conv1.weight", "4.0.downsample.0.weight", "4.2.bn3.bias",
              "5.3.conv3.weight", "6.5.bn2.running_var", "7.0.downsample.1.running_mean", "7.2.conv3.weight"):
        assert k in keys, k
    assert keys["7.0.conv2.weight"].shape == (512, 512, 3, 3) and keys["7.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert [type(m).__name__ for m in model][:4] + [type(model[8]).__name__] == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d"]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 2048)  # flatten, not squeeze


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (1, 3, 32, 32, 1)])
def test_bad_inputs(shape):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        TorchvisionResNet(TINY)(torch.zeros(shape))
