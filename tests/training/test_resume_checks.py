"""Resuming a run only where it can go on exactly (geometry, data), the validations of every segment in the summary,
and the run folder a failed run leaves (issue 14)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from priorclip.errors import CheckpointError, DataError
from priorclip.training.common import TrainingInterrupted
from priorclip.training.trainer import Trainer, train
from tests.training.conftest import train_config


_cfg = train_config


def _stop(cfg) -> Trainer:
    t = Trainer(cfg)
    with pytest.raises(TrainingInterrupted):
        t.fit()
    return t


def _edit_state(path, **changes):
    """Rewrite the checkpoint's training state as another run (or an older version) would have saved it."""
    ckpt = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if v is None:
            ckpt["train_state"].pop(k)
        else:
            ckpt["train_state"][k] = v
    torch.save(ckpt, path)


# ------------------------------------------------------------------------------------------ validations


VAL = dict(epochs=2, batch_size=40, val_split="val")  # 80 pairs: 2 steps an epoch, validated at steps 2 and 4


@pytest.fixture(scope="module")
def uninterrupted_val(tiny_data, tmp_path_factory):
    return train(_cfg(tiny_data, tmp_path_factory.mktemp("whole") / "run", **VAL))["val"]


def test_a_run_stopped_on_an_epochs_last_step_validates_that_epoch_when_resumed(tiny_data, tmp_path,
                                                                               uninterrupted_val):
    """Catches: the resumed run skipping the end of the epoch it stopped in (no validation, no epoch checkpoint)."""
    assert [(v["epoch"], v["step"]) for v in uninterrupted_val] == [(1, 2), (2, 4)]
    out = tmp_path / "run"
    _stop(_cfg(tiny_data, out, stop_after=2, epoch_checkpoints=True, **VAL))
    assert not (out / "checkpoints" / "epoch_1.pt").exists()
    summary = train(_cfg(tiny_data, out, resume="auto", epoch_checkpoints=True, **VAL))
    assert summary["val"] == uninterrupted_val  # exactly: the resumed run is the same run
    assert (out / "checkpoints" / "epoch_1.pt").is_file()


def test_summary_after_resume_lists_every_validation(tiny_data, tmp_path, uninterrupted_val):
    """Catches: the summary of a resumed run holding only its own segment's validations. The epoch-end checkpoint
    is written before that epoch's validation, so here the checkpoint lacks it and metrics.jsonl has it; log lines
    past the checkpoint (from a segment that died without saving) and a line cut short are left out."""
    out = tmp_path / "run"
    _stop(_cfg(tiny_data, out, stop_after=3, **VAL))
    assert json.loads((out / "summary.json").read_text())["val"] == uninterrupted_val[:1]  # the stopped run's
    _edit_state(out / "checkpoints" / "latest.pt", val_history=[])
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"type": "val", "step": 4, "epoch": 2, "mR": 99.0}) + "\n")
        f.write('{"type": "val", "st')
    summary = train(_cfg(tiny_data, out, resume="auto", **VAL))
    assert summary["val"] == uninterrupted_val
    assert json.loads((out / "summary.json").read_text())["val"] == uninterrupted_val


# ------------------------------------------------------------------------------------------ geometry


def test_the_same_global_batch_split_otherwise_is_adapted_and_said(tiny_data, tmp_path, capsys):
    whole = _stop(_cfg(tiny_data, tmp_path / "whole", stop_after=4))
    _stop(_cfg(tiny_data, tmp_path / "run", stop_after=2))
    capsys.readouterr()
    resumed = _stop(_cfg(tiny_data, tmp_path / "run", resume="auto", stop_after=4, batch_size=4, accum_freq=2))
    note = ("global batch 8 split as 1 process x --batch-size 4 x --accum-freq 2 (the saved run: 1 process x "
            "--batch-size 8 x --accum-freq 1)")
    assert note in capsys.readouterr().err
    assert note in json.loads((tmp_path / "run" / "summary.json").read_text())["resume_notes"][0]
    # Same samples per step and, with accumulation, the big-batch loss (test_accumulation_gives_the_big_batch_
    # gradient: to fp32 rounding), so the steps after the resume follow the uninterrupted curve.
    assert [h["loss"] for h in resumed.history[:2]] == [h["loss"] for h in whole.history[:2]]
    assert [h["loss"] for h in resumed.history[2:]] == pytest.approx([h["loss"] for h in whole.history[2:]], rel=1e-5)


def test_world_size_and_global_batch_are_checked(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    _stop(_cfg(tiny_data, out, stop_after=1))
    latest = out / "checkpoints" / "latest.pt"
    # saved by 2 processes x batch 4: the same global batch of 8 -> adapted
    saved_config = torch.load(latest, weights_only=True)["train_state"]["train_config"]
    _edit_state(latest, world_size=2, train_config={**saved_config, "batch_size": 4})
    t = _stop(_cfg(tiny_data, out, resume="auto", stop_after=2))
    assert t.resume_notes == ["global batch 8 split as 1 process x --batch-size 8 x --accum-freq 1 (the saved run: 2 "
                              "processes x --batch-size 4 x --accum-freq 1); every step sees the same samples "
                              "(BatchNorm statistics and per-process class centres follow the new split)"]
    # saved by 2 processes x batch 8: global batch 16 -> refused, one line naming both and the way out; nothing lost
    _edit_state(latest, world_size=2)
    before = latest.read_bytes(), (out / "metrics.jsonl").read_bytes()
    from click.testing import CliRunner

    from priorclip.cli import main

    json_path, img_dir = tiny_data
    r = CliRunner().invoke(main, ["train", "--data", str(json_path), "--images", str(img_dir), "--model", "clip-tiny",
                                  "--out", str(out), "--batch-size", "8", "--epochs", "1", "--workers", "0",
                                  "--no-progress", "--val-split", "none", "--test-split", "none", "--resume", "auto"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(
        f"Error: {latest}: the saved run's global batch was 16 (2 processes x --batch-size 8 x --accum-freq 1), this "
        f"run's is 8 (1 process x --batch-size 8 x --accum-freq 1); a resumed run must keep it"), r.output
    assert f"--init-checkpoint {latest} and another --out" in r.output
    assert (latest.read_bytes(), (out / "metrics.jsonl").read_bytes()) == before
    # a checkpoint from before world size and data were recorded still resumes, unchanged geometry, no notes
    _edit_state(latest, world_size=None, data=None, global_batch=None, val_history=None)
    t = _stop(_cfg(tiny_data, out, resume="auto", stop_after=3))
    assert t.step == 3 and t.resume_notes == []


# ------------------------------------------------------------------------------------------ data


def test_changed_training_data_are_refused_unless_accepted(tiny_data, tmp_path):
    json_path, img_dir = tiny_data
    out = tmp_path / "run"
    _stop(_cfg(tiny_data, out, stop_after=1))
    latest = out / "checkpoints" / "latest.pt"
    doc = json.loads(json_path.read_text())
    train_entries = [e for e in doc["images"] if e["split"] == "train"]

    moved = tmp_path / "moved"  # the same images in another folder: the same data
    shutil.copytree(img_dir, moved)
    t = _stop(_cfg(tiny_data, out, images=str(moved), resume="auto", stop_after=2))
    assert t.step == 2 and t.resume_notes == []
    before = latest.read_bytes()

    one_caption = json.loads(json_path.read_text())
    next(e for e in one_caption["images"] if e["split"] == "train")["sentences"][0]["raw"] = "a different caption"
    (tmp_path / "caption.json").write_text(json.dumps(one_caption))
    with pytest.raises(CheckpointError, match=r"the training data differ from the saved run's \(the same 80 samples in "
                                              r"number, but other images or captions\).*--accept-new-data"):
        Trainer(_cfg(tiny_data, out, data=str(tmp_path / "caption.json"), resume="auto")).fit()
    assert latest.read_bytes() == before

    fewer = dict(doc, images=[e for e in doc["images"] if e is not train_entries[0]])  # its 5 captions go
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    with pytest.raises(CheckpointError, match=r"\(80 samples then, 75 now\)"):
        Trainer(_cfg(tiny_data, out, data=str(tmp_path / "fewer.json"), resume="auto")).fit()
    t = _stop(_cfg(tiny_data, out, data=str(tmp_path / "fewer.json"), resume="auto", accept_new_data=True,
                   stop_after=3))
    assert t.step == 3 and t.resume_notes == [
        "training data changed (80 samples then, 75 now); going on with the new data (--accept-new-data)"]


# ------------------------------------------------------------------------------------------ the run folder


def test_a_run_that_fails_early_leaves_no_folder_behind(tiny_data, tmp_path):
    from click.testing import CliRunner

    from priorclip.cli import main

    _, img_dir = tiny_data
    out = tmp_path / "runs" / "exp1"  # neither folder exists yet
    r = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "missing.json"), "--images", str(img_dir),
                                  "--model", "clip-tiny", "--out", str(out), "--workers", "0", "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "runs").exists() and tmp_path.is_dir()
    r = CliRunner().invoke(main, ["train-prior", "--data", str(tmp_path / "missing.json"), "--images", str(img_dir),
                                  "--model", "priorclip-tiny", "--out", str(out), "--workers", "0", "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "runs").exists()

    kept = tmp_path / "mine"  # a folder that was there before is left, and left as it was
    kept.mkdir()
    with pytest.raises(DataError):
        train(_cfg(tiny_data, kept, data=str(tmp_path / "missing.json")))
    assert list(kept.iterdir()) == []

    # failing on the first batch, after config.json was written: still nothing useful, so removed
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in img_dir.iterdir():
        (bad / p.name).write_bytes(b"not an image")
    with pytest.raises(DataError, match="every image of a batch failed"):
        train(_cfg(tiny_data, tmp_path / "new", images=str(bad), cache="no"))
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_after_saving_keeps_its_folder(tiny_data, tmp_path, monkeypatch):
    real = Trainer.train_step
    calls = []

    def second_step_fails(self, micros):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, micros)

    monkeypatch.setattr(Trainer, "train_step", second_step_fails)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        train(_cfg(tiny_data, out, save_every=1))
    assert (out / "checkpoints" / "latest.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_overwrite_keeps_the_old_run_until_the_new_one_starts(tiny_data, tmp_path):
    out = tmp_path / "run"
    _stop(_cfg(tiny_data, out, stop_after=1))
    logs = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}
    with pytest.raises(DataError, match="image folder not found"):
        train(_cfg(tiny_data, out, overwrite=True, images=str(tmp_path / "nope")))
    assert {f: (out / f).read_bytes() for f in logs} == logs
    _stop(_cfg(tiny_data, out, overwrite=True, stop_after=2))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the new run's lines only
