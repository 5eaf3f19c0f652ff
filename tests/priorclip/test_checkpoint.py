"""Strict, safe checkpoint loading in the official layouts, our own saves, and one-line errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from priorclip import create_model
from priorclip.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from priorclip.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("priorclip-tiny")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["bare", "wrapped", "ddp"])
def test_official_layouts_load_strictly(tmp_path, tiny, layout):
    sd = tiny.state_dict()
    if layout == "wrapped":  # open_clip's epoch_K.pt
        obj = {"epoch": 3, "name": "PIR", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    elif layout == "ddp":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = sd
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = create_model("priorclip-tiny", checkpoint=tmp_path / "ckpt.pt")
    assert same_weights(loaded, tiny)
    assert not loaded.training


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_checkpoint_carries_config(tmp_path, suffix):
    torch.manual_seed(1)
    m = create_model("priorclip-tiny", gate="2belief")
    path = save_checkpoint(m, tmp_path / f"m{suffix}", epoch=2)
    loaded = create_model(checkpoint=path)  # no name: the embedded config decides
    assert loaded.cfg == m.cfg and loaded.cfg.gate == "2belief"
    assert same_weights(loaded, m)
    assert not list(tmp_path.glob(".*.tmp"))


def test_errors_name_missing_unexpected_and_shapes(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    del sd["visual.proj"]
    sd["visual.extra_thing"] = torch.zeros(1)
    sd["vision_proj_res.bias"] = torch.zeros(7)
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        create_model("priorclip-tiny", checkpoint=tmp_path / "bad.pt")
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing keys: visual.proj" in msg
    assert "1 unexpected keys: visual.extra_thing" in msg
    assert "vision_proj_res.bias [7] vs model [64]" in msg


def test_wrong_model_for_checkpoint(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"does not fit model 'clip-tiny'.*unexpected keys: .*res_visual"):
        create_model("clip-tiny", checkpoint=tmp_path / "t.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_arbitrary_pickles(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Payload()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="refused to unpickle|not a readable"):
            read_checkpoint(tmp_path / name)
    assert "must never run" not in capsys.readouterr().out


def test_unreadable_files(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "notensor.pt")
    with pytest.raises(CheckpointError, match="not tensors"):
        read_checkpoint(tmp_path / "notensor.pt")
    torch.save({"config": {"name": "x", "bogus": 1}, "state_dict": tiny.state_dict()}, tmp_path / "badcfg.pt")
    with pytest.raises(CheckpointError, match="config is invalid"):
        read_checkpoint(tmp_path / "badcfg.pt")


def test_load_checkpoint_into_existing_model(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path / "x.pt")
    fresh = create_model("priorclip-tiny")
    load_checkpoint(fresh, tmp_path / "x.pt")
    assert same_weights(fresh, tiny)
