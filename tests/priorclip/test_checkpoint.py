"""Strict, safe checkpoint loading in the official layouts, our own saves, and one-line errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

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


def _touch(path):
    """What a malicious checkpoint would run on load: here it only creates a marker file."""
    Path(path).write_text("code from the checkpoint ran")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


TOUCH = f"{_touch.__module__}._touch"  # the global the pickles below reference


def refusal(path, name):
    return (f"{path}: refused: loading it would run code (it references {name}); priorclip loads only tensors and "
            "plain containers: re-save the weights with torch.save(model.state_dict(), PATH)")


def test_payload_is_live(tmp_path):
    # the refusal tests below mean something only because an ordinary unpickle of the same object does run the code
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").is_file()


@pytest.mark.parametrize("layout", ["zip", "cut-zip", "legacy", "plain-pickle", "plain-pickle-protocol-2"])
def test_code_in_a_checkpoint_is_refused_by_name_and_never_run(tmp_path, layout):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if layout == "zip":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}, path)
    elif layout == "cut-zip":  # a download cut short: no zip directory, but the pickle is there, first
        torch.save({"state_dict": {"w": torch.zeros(256)}, "hook": Payload(marker)}, path)
        path.write_bytes(path.read_bytes()[:-300])
    elif layout == "legacy":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}, path,
                   _use_new_zipfile_serialization=False)
    else:  # no tensors: pickle itself would reference torch.storage._load_from_bytes (which runs torch.load) first
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"w": [0.0, 1.0]}, "hook": Payload(marker)}, f,
                        protocol=2 if layout.endswith("2") else pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(e.value) == refusal(path, TOUCH)
    assert not marker.exists()


def test_refusal_does_not_depend_on_torchs_error_text(tmp_path, monkeypatch):
    """Another torch version words its weights-only failure differently: the reason comes from the file itself."""
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}, tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "good.pt")

    def other_torch(*a, **k):
        raise pickle.UnpicklingError("Weights only load failed. Something else entirely.")

    monkeypatch.setattr(torch, "load", other_torch)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "evil.pt")
    assert str(e.value) == refusal(tmp_path / "evil.pt", TOUCH)
    with pytest.raises(CheckpointError) as e:  # a file with only tensors is not called code, whatever torch says
        read_checkpoint(tmp_path / "good.pt")
    assert "not a readable PyTorch checkpoint" in str(e.value) and "refused" not in str(e.value)
    assert not marker.exists()


def _stack_global_pickle(module_via_memo: bool) -> bytes:
    """Protocol 4 by hand: ``posix.getcwd`` named through STACK_GLOBAL; the module string either pushed directly or
    fetched back from the memo with BINGET after something else was pushed."""
    def s(text):  # SHORT_BINUNICODE + MEMOIZE
        b = text.encode()
        return b"\x8c" + bytes([len(b)]) + b + b"\x94"

    body = s("posix")  # memo 0
    body += b"0"  # POP: the stack is empty again
    body += (b"h\x00" if module_via_memo else s("posix")) + s("getcwd") + b"\x93"  # BINGET 0 | push, name, STACK_GLOBAL
    body += b")R"  # EMPTY_TUPLE, REDUCE: the call itself
    return b"\x80\x04" + body + b"."


@pytest.mark.parametrize("via_memo", [False, True])
def test_pickle_scan_reads_stack_global_names_without_running_them(tmp_path, via_memo):
    import pickletools

    from priorclip.checkpoint import code_references

    data = _stack_global_pickle(via_memo)
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert "STACK_GLOBAL" in ops and ("BINGET" in ops) == via_memo  # the stream is what the test says it is
    assert pickle.loads(data) == os.getcwd()  # a real pickle: loading it calls os.getcwd
    (tmp_path / "p.pt").write_bytes(data)
    assert code_references(tmp_path / "p.pt") == ["posix.getcwd"]
    # the two strings under STACK_GLOBAL are not known (a POP in between): named as unresolved, never guessed
    (tmp_path / "q.pt").write_bytes(b"\x80\x04\x8c\x05posix\x94\x8c\x06getcwd\x94\x8c\x01x0\x93)R.")
    assert code_references(tmp_path / "q.pt") == ["a global named at load time"]


def test_plain_tensor_files_reference_no_code(tmp_path, tiny, monkeypatch):
    """What torch.save writes for weights (tensors, Parameters, OrderedDict, sets, complex numbers) is never called
    code, with torch's own allowlist and with the built-in fallback used when torch's private module is missing."""
    from priorclip import checkpoint

    obj = {"state_dict": tiny.state_dict(), "p": torch.nn.Parameter(torch.ones(2)), "tags": {1, 2}, "z": 1 + 2j,
           "dtype": torch.float16, "half": torch.zeros(3, dtype=torch.bfloat16)}
    torch.save(obj, tmp_path / "zip.pt")
    torch.save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert checkpoint.code_references(tmp_path / name) == []
    monkeypatch.setattr(checkpoint, "_weights_only_globals", set)
    for name in ("zip.pt", "legacy.pt"):
        assert checkpoint.code_references(tmp_path / name) == []
    torch.save({"hook": Payload(tmp_path / "ran")}, tmp_path / "evil.pt")
    assert checkpoint.code_references(tmp_path / "evil.pt") == [TOUCH]


@pytest.mark.parametrize("damage", ["junk", "cut-zip", "cut-legacy", "empty"])
def test_damaged_files_are_reported_as_damaged(tmp_path, damage):
    path = tmp_path / "bad.pt"
    if damage == "junk":
        path.write_bytes(b"\x00garbage" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"w": torch.arange(64.0)}, tmp_path / "ok.pt", _use_new_zipfile_serialization=damage == "cut-zip")
        data = (tmp_path / "ok.pt").read_bytes()
        path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(e.value).startswith(f"{path}: not a readable PyTorch checkpoint (") and "\n" not in str(e.value)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    path = save_checkpoint(tiny, tmp_path / "m.pt", epoch=1)
    before = path.read_bytes()

    def dies_halfway(obj, f, *a, **k):
        Path(f).write_bytes(before[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny, path, epoch=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


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
