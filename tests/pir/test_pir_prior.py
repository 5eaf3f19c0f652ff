"""PIR's prior through train-prior and load_prior_weights: a pir-tiny scene classifier saved under conv_encoder.* and
loaded into the model, torchvision-named (RSP-style) files in their wrappers, one-line errors, the open-domain path."""

from __future__ import annotations

import json

import pytest
import torch

from priorclip.config import ResNetConfig
from priorclip.errors import CheckpointError
from priorclip.layers.tv_resnet import TorchvisionResNet
from priorclip.registry import create_model, get_config
from priorclip.synthetic import make_sample
from priorclip.training.prior import PRIOR_FORMAT, PriorClassifier, PriorTrainConfig, load_prior_weights, train_prior

TINY = get_config("pir-tiny").prior
# torchvision's child names by position in nn.Sequential(*resnet.children()[:-1]), written out here independently
TV_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """18 generated scenes (64 px, 6 classes): 12 train, 3 val, 3 test."""
    json_path, img_dir = make_sample(tmp_path_factory.mktemp("scenes"), n_images=18, size=64, seed=0, split="train")
    doc = json.loads(json_path.read_text())
    for i, e in enumerate(doc["images"]):
        e["split"] = "train" if i < 12 else ("val" if i < 15 else "test")
    json_path.write_text(json.dumps(doc))
    return json_path, img_dir


@pytest.fixture(scope="module")
def pir_prior(scenes, tmp_path_factory):
    """``priorclip train-prior --model pir-tiny`` for two steps; returns the prior.pt path."""
    from click.testing import CliRunner

    from priorclip.cli import main

    json_path, img_dir = scenes
    out = tmp_path_factory.mktemp("pir_prior") / "run"
    r = CliRunner().invoke(main, ["train-prior", "--model", "pir-tiny", "--data", str(json_path), "--images", str(img_dir),
                                  "--out", str(out), "--epochs", "1", "--batch-size", "6", "--workers", "0",
                                  "--warmup", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out / "prior.pt"


def _randomised(cfg: ResNetConfig, seed: int) -> TorchvisionResNet:
    """A prior with random weights and non-trivial BatchNorm statistics (so eval mode is not an identity BN)."""
    torch.manual_seed(seed)
    net = TorchvisionResNet(cfg)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(seed + 7)
    return net


def _torchvision_names(net: TorchvisionResNet) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in net.state_dict().items():
        head, rest = k.split(".", 1)
        out[f"{TV_NAMES[head]}.{rest}"] = v.clone()
    return out


def _prior_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.conv_encoder.state_dict().items()}


def _one_line_error(model, path, match: str) -> str:
    before = _prior_state(model)
    with pytest.raises(CheckpointError, match=match) as e:
        load_prior_weights(model, path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    after = _prior_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused file must leave the prior untouched"
    return msg


def test_train_prior_pir_tiny_writes_conv_encoder_and_loads_into_pir(pir_prior):
    obj = torch.load(pir_prior, weights_only=True)
    assert set(obj) == {"state_dict", "config", "format", "classes", "metrics"} and obj["format"] == PRIOR_FORMAT
    assert obj["config"]["family"] == "pir" and obj["config"]["name"] == "pir-tiny"
    assert len(obj["classes"]) == 6 and set(obj["metrics"]) == {"val_top1", "test_top1"}
    sd = obj["state_dict"]
    assert {k.split(".")[0] for k in sd} == {"conv_encoder", "head"}
    assert sd["head.weight"].shape == (6, TINY.out_dim)

    model = create_model("pir-tiny")
    fresh = _prior_state(model)
    others = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("conv_encoder.")}
    info = load_prior_weights(model, pir_prior)
    assert info == {"path": str(pir_prior), "source": "train-prior", "module": "conv_encoder", "dropped": [],
                    "classes": obj["classes"], "metrics": obj["metrics"]}
    loaded = model.conv_encoder.state_dict()
    assert set(loaded) == {k.removeprefix("conv_encoder.") for k in sd if k.startswith("conv_encoder.")}
    for k, v in loaded.items():
        assert torch.equal(v, sd["conv_encoder." + k]), k
    assert any(not torch.equal(fresh[k], loaded[k]) for k in fresh), "the trained prior equals a fresh one"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items()), "only conv_encoder may change"
    assert not any(p.requires_grad for p in model.conv_encoder.parameters())  # still frozen, as PIR builds it

    # the model's prior computes the classifier's trunk features (batch 1 and 3)
    clf = PriorClassifier(get_config("pir-tiny"), len(obj["classes"]))
    clf.load_state_dict(sd, strict=True)
    clf.eval(), model.conv_encoder.eval()
    for b in (1, 3):
        x = torch.randn(b, 3, 56, 56, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            assert torch.equal(model.conv_encoder(x), clf.trunk(x))


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict+module", "sequential"])
def test_torchvision_resnet_file_loads_into_pir(tmp_path, wrap):
    src = _randomised(TINY, seed=1)
    tv = _torchvision_names(src)
    fc = {"fc.weight": torch.randn(30, TINY.out_dim), "fc.bias": torch.randn(30)}
    if wrap == "bare":
        obj, dropped = tv | fc, ["fc.weight", "fc.bias"]
    elif wrap == "model":  # the RSP / Swin-codebase layout: {'model': weights, 'epoch': ..., 'max_accuracy': ...}
        obj, dropped = {"model": tv | fc, "epoch": 99, "max_accuracy": 98.5}, ["fc.weight", "fc.bias"]
    elif wrap == "state_dict+module":
        obj, dropped = {"state_dict": {"module." + k: v for k, v in (tv | fc).items()}}, ["fc.weight", "fc.bias"]
    else:  # already re-saved with the Sequential's index keys
        obj, dropped = src.state_dict(), []
    path = tmp_path / "aid_28-rsp-resnet-50-ckpt.pth"
    torch.save(obj, path)

    model = create_model("pir-tiny")
    info = load_prior_weights(model, path)
    assert info["source"] == "torchvision" and info["dropped"] == dropped and info["module"] == "conv_encoder"
    assert info["classes"] is None and info["metrics"] is None
    for k, v in src.state_dict().items():
        assert torch.equal(model.conv_encoder.state_dict()[k], v), k
    src.eval(), model.conv_encoder.eval()
    for b in (1, 2):
        x = torch.randn(b, 3, 56, 56, generator=torch.Generator().manual_seed(10 + b))
        with torch.no_grad():
            assert torch.equal(model.conv_encoder(x), src(x))


def test_files_that_do_not_fit_give_one_line(tmp_path, pir_prior):
    model = create_model("pir-tiny")
    tv = _torchvision_names(_randomised(TINY, seed=2))

    p = tmp_path / "missing.pth"
    torch.save({"model": {k: v for k, v in tv.items() if k != "layer4.0.bn3.running_var"}}, p)
    msg = _one_line_error(model, p, "torchvision ResNet weights do not fit model 'pir-tiny': 1 missing: "
                                    r"conv_encoder\.7\.0\.bn3\.running_var")
    assert "conv_encoder.0 is conv1, .1 bn1, .4-.7 layer1-layer4" in msg

    deeper = _torchvision_names(_randomised(ResNetConfig(layers=(1, 1, 2, 1), width=TINY.width), seed=3))
    p = tmp_path / "deeper.pth"
    torch.save(deeper, p)
    msg = _one_line_error(model, p, r"18 unexpected: conv_encoder\.6\.1\.conv1\.weight")
    assert "missing" not in msg and "shape" not in msg

    wide = _torchvision_names(_randomised(ResNetConfig(layers=TINY.layers, width=2 * TINY.width), seed=4))
    p = tmp_path / "wide.pth"
    torch.save({"model": wide}, p)
    _one_line_error(model, p, r"shape mismatches: conv_encoder\.0\.weight \[16, 3, 7, 7\] vs \[8, 3, 7, 7\]")

    # a train-prior file for another PIR config: its conv_encoder.* keys are checked the same way
    other = {"conv_encoder." + k: v for k, v in _randomised(ResNetConfig(layers=TINY.layers, width=16), 5).state_dict().items()}
    p = tmp_path / "other_prior.pt"
    torch.save({"state_dict": other, "format": PRIOR_FORMAT}, p)
    _one_line_error(model, p, r"^\S+: prior weights do not fit model 'pir-tiny': \d+ shape mismatches: "
                              r"conv_encoder\.0\.weight \[16, 3, 7, 7\] vs \[8, 3, 7, 7\]")

    p = tmp_path / "unrelated.pt"
    torch.save({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, p)
    _one_line_error(model, p, r"neither conv_encoder\.\* weights .* nor a torchvision ResNet state dict .*; "
                              r"its keys begin foo\.weight, bar\.bias$")

    open_domain = tmp_path / "open_domain_prior.pt"
    torch.save({"state_dict": {"res_visual.conv1.weight": torch.zeros(1)}, "config": get_config("priorclip-tiny").to_dict(),
                "format": PRIOR_FORMAT}, open_domain)
    _one_line_error(model, open_domain, r"neither .*\(it was saved for model 'priorclip-tiny'\)")

    # a PIR prior into the open-domain model: named as such
    with pytest.raises(CheckpointError, match=r"no res_visual\.\* weights in it \(it was saved for model 'pir-tiny'\)"):
        load_prior_weights(create_model("priorclip-tiny"), pir_prior)
    with pytest.raises(CheckpointError, match="has no prior network"):
        load_prior_weights(create_model("clip-tiny"), pir_prior)


class PickledConfig(dict):
    """Stands in for a training-config object (e.g. yacs' CfgNode) pickled beside the weights."""


def test_file_that_pickles_code_is_refused(tmp_path):
    p = tmp_path / "with_config_object.pth"
    torch.save({"model": _torchvision_names(_randomised(TINY, seed=6)), "config": PickledConfig(a=1)}, p)
    msg = _one_line_error(create_model("pir-tiny"), p, "refused: loading it would run code")
    assert "PickledConfig" in msg


def test_open_domain_prior_unchanged(scenes, tmp_path):
    json_path, img_dir = scenes
    s = train_prior(PriorTrainConfig(data=str(json_path), images=str(img_dir), out=str(tmp_path / "prior"),
                                     model="priorclip-tiny", epochs=1, batch_size=6, workers=0, warmup=1,
                                     progress=False, val_split=None, test_split=None))
    assert s["metrics"] == {} and s["steps"] == 2
    path = tmp_path / "prior" / "prior.pt"
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"state_dict", "config", "format", "classes", "metrics"} and obj["format"] == PRIOR_FORMAT
    assert "family" not in obj["config"] and {k.split(".")[0] for k in obj["state_dict"]} == {"res_visual", "head"}
    model = create_model("priorclip-tiny")
    info = load_prior_weights(model, path)
    assert info["source"] == "train-prior" and info["module"] == "res_visual" and info["dropped"] == []
    for k, v in model.res_visual.state_dict().items():
        assert torch.equal(v, obj["state_dict"]["res_visual." + k]), k
    # open-domain models take no torchvision file: their prior is a ModifiedResNet
    tv = tmp_path / "tv.pth"
    torch.save(_torchvision_names(_randomised(TINY, seed=8)), tv)
    with pytest.raises(CheckpointError, match=r"no res_visual\.\* weights in it \(is it a prior checkpoint"):
        load_prior_weights(model, tv)
    sd = {k: v for k, v in obj["state_dict"].items() if k != "res_visual.conv1.weight"}
    torch.save({"state_dict": sd}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"prior weights do not fit model 'priorclip-tiny': 1 missing: "
                                              r"res_visual\.conv1\.weight$"):
        load_prior_weights(model, tmp_path / "wrong.pt")
