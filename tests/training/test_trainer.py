"""The trainer on CPU with tiny models: accumulation, resume, an end-to-end run, checkpoints and errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from priorclip.errors import CheckpointError, DataError, PriorCLIPError
from priorclip.training.common import TrainingInterrupted
from priorclip.training.trainer import TrainConfig, Trainer, TrainData, train


def _cfg(tiny_data, tmp_path, **kw):
    json_path, img_dir = tiny_data
    base = dict(data=str(json_path), images=str(img_dir), out=str(tmp_path / "run"), model="priorclip-tiny", epochs=1,
                batch_size=8, workers=0, progress=False, tensorboard=False, val_split=None, test_split=None, warmup=2,
                lr=1e-3, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _recall_by_hand(model_path, json_path, img_dir, split, device="cpu"):
    """R@1/5/10 both ways and mR of a saved model on one split, re-derived apart from priorclip.retrieval: the split
    read from the JSON here, images in name order (the protocol's), 0-based ranks with ties to the lower index."""
    from pathlib import Path

    from priorclip import create_model
    from priorclip.tokenizer import tokenize
    from priorclip.transforms import EvalTransform, open_image

    entries = sorted((e for e in json.loads(Path(json_path).read_text())["images"] if e["split"] == split),
                     key=lambda e: str(Path(e.get("filepath", "")) / e["filename"]))
    caps = [s["raw"] for e in entries for s in e["sentences"]]
    owner = [i for i, e in enumerate(entries) for _ in e["sentences"]]
    model = create_model(checkpoint=model_path).to(device).eval()
    with torch.no_grad():
        transform = EvalTransform(model.image_size)
        pix = torch.stack([transform(open_image(Path(img_dir) / e.get("filepath", "") / e["filename"])) for e in entries])
        img = model.encode_image(pix.to(device), kernels="reference").double().cpu()
        txt = model.encode_text(tokenize(caps).to(device)).double().cpu()
    scores = (img @ txt.T).tolist()  # [images][captions]

    def rank(row, j):
        return sum(1 for k, v in enumerate(row) if v > row[j] or (v == row[j] and k < j))

    i2t = [min(rank(scores[i], c) for c in range(len(caps)) if owner[c] == i) for i in range(len(entries))]
    t2i = [rank([scores[i][c] for i in range(len(entries))], owner[c]) for c in range(len(caps))]
    out = {f"{d}_R@{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for d, ranks in (("i2t", i2t), ("t2i", t2i))
           for k in (1, 5, 10)}
    out["mR"] = sum(out.values()) / 6.0
    return out


@pytest.mark.parametrize("model", ["clip-tiny", "priorclip-tiny"])
def test_accumulation_gives_the_big_batch_gradient(tiny_data, tmp_path, model):
    """accum 2 x batch 4 == batch 8 (to fp32 rounding), affiliation term included: labels span the whole batch."""
    big = Trainer(_cfg(tiny_data, tmp_path / "a", model=model, batch_size=8))
    acc = Trainer(_cfg(tiny_data, tmp_path / "b", model=model, batch_size=4, accum_freq=2))
    for t in (big, acc):
        if t.model.has_prior:  # BatchNorm batch statistics differ between 4 and 8 samples by construction
            t.model.res_visual.eval()
    data_big = TrainData(big.cfg, big.model.cfg, big.d, big.out)
    data_acc = TrainData(acc.cfg, acc.model.cfg, acc.d, acc.out)
    b = next(data_big.loader(0, 0))
    it = data_acc.loader(0, 0)
    micros = [next(it), next(it)]
    assert micros[0]["names"] + micros[1]["names"] == b["names"]
    assert len(set(n.split("_")[0] for n in b["names"])) < len(b["names"])  # repeated classes are in the batch
    lb = big.forward_backward([b])
    la = acc.forward_backward(micros)
    assert la["affiliation"] == pytest.approx(lb["affiliation"], rel=1e-5)
    assert la["contrastive"] == pytest.approx(lb["contrastive"], rel=1e-5)
    gb, ga = _grads(big.model), _grads(acc.model)
    assert gb.keys() == ga.keys() and "logit_scale" in gb
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step(tiny_data, tmp_path, precision):
    t = Trainer(_cfg(tiny_data, tmp_path, model="clip-tiny", precision=precision))
    data = TrainData(t.cfg, t.model.cfg, t.d, t.out)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    losses = t.train_step([next(data.loader(0, 0))])
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert t.model.visual.conv1.weight.dtype == torch.float32  # autocast, fp32 master weights
    assert t.scaler.is_enabled() == (precision == "fp16")
    # fp16: the scaler starts at 2^16 and skips a step whose scaled gradients overflow, lowering the scale instead
    stepped = not torch.equal(before["visual.proj"], t.model.visual.proj)
    assert stepped or (precision == "fp16" and t.scaler.get_scale() < 2.0**16)


def test_resumed_run_reproduces_the_uninterrupted_loss_curve(tiny_data, tmp_path):
    kw = dict(epochs=2, batch_size=16, precision="fp32")  # 5 steps per epoch, 10 in all
    whole = Trainer(_cfg(tiny_data, tmp_path / "whole", **kw))
    whole.fit()
    first = Trainer(_cfg(tiny_data, tmp_path / "split", stop_after=7, **kw))  # stops inside epoch 2
    with pytest.raises(TrainingInterrupted, match="--resume auto"):
        first.fit()
    assert len(first.history) == 7
    second = Trainer(_cfg(tiny_data, tmp_path / "split", resume="auto", **kw))
    second.fit()
    assert len(whole.history) == len(second.history) == 10
    assert [h["loss"] for h in second.history] == [h["loss"] for h in whole.history]  # exactly
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k


def test_end_to_end_loss_falls_and_outputs_are_usable(tiny_data, tmp_path):
    from priorclip import create_model

    cfg = _cfg(tiny_data, tmp_path, epochs=3, val_split="val", test_split="test", lr=2e-3, batch_size=16)
    summary = train(cfg)
    out = tmp_path / "run"
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert len(summary["val"]) == 3
    # the reported recalls are those of the saved model, recomputed here (the last val ran on the final weights too)
    json_path, img_dir = tiny_data
    for split, got in (("test", summary["test"]), ("val", summary["val"][-1])):
        want = _recall_by_hand(out / "model.pt", json_path, img_dir, split)
        assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9), split
    assert summary["samples_per_s"] > 0 and summary["skipped_images"] == 0
    types = {json.loads(l)["type"] for l in (out / "metrics.jsonl").read_text().splitlines()}
    assert types == {"train", "val", "test"}
    model = create_model(checkpoint=out / "model.pt")  # what `priorclip eval --checkpoint` does
    assert model.cfg.name == "priorclip-tiny"
    create_model(checkpoint=out / "checkpoints" / "latest.pt")  # the resume file is weights_only-loadable
    assert (out / "checkpoints" / "epoch_3.pt").is_file()


def test_corrupt_training_images_are_skipped_and_counted(tiny_data, tmp_path):
    json_path, img_dir = tiny_data
    bad_dir = tmp_path / "imgs"
    shutil.copytree(img_dir, bad_dir)
    from priorclip.training.data import load_karpathy_pairs

    names = [p.name for p in load_karpathy_pairs(json_path, img_dir, "train").images]
    (bad_dir / names[0]).write_bytes(b"not a jpeg")
    (bad_dir / names[1]).unlink()
    cfg = _cfg(tiny_data, tmp_path, images=str(bad_dir), stop_after=1)
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg).fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == 2
    listed = (tmp_path / "run" / "skipped_images.txt").read_text()
    assert names[0] in listed and names[1] in listed


def test_clear_errors(tiny_data, tmp_path):
    json_path, img_dir = tiny_data
    with pytest.raises(DataError, match="image folder not found"):
        train(_cfg(tiny_data, tmp_path, images=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="none of the 16 images .* could be read"):
        empty = tmp_path / "empty"
        empty.mkdir()
        train(_cfg(tiny_data, tmp_path / "e", images=str(empty)))
    with pytest.raises(DataError, match="fewer than one global batch"):
        train(_cfg(tiny_data, tmp_path / "b", batch_size=500))
    with pytest.raises(CheckpointError, match="not found"):
        Trainer(_cfg(tiny_data, tmp_path / "r", resume=str(tmp_path / "nothing.pt")))
    run = _cfg(tiny_data, tmp_path / "x", stop_after=1)
    with pytest.raises(TrainingInterrupted):
        train(run)
    with pytest.raises(PriorCLIPError, match="already holds a run"):
        train(_cfg(tiny_data, tmp_path / "x"))
    with pytest.raises(CheckpointError, match="batch-size"):
        train(_cfg(tiny_data, tmp_path / "x", resume="auto", batch_size=4))
    with pytest.raises(CheckpointError, match="no prior network"):
        Trainer(_cfg(tiny_data, tmp_path / "p", model="clip-tiny", prior_checkpoint=str(tmp_path / "x" / "run" / "checkpoints" / "latest.pt")))


def test_prior_training_and_loading(tiny_data, tmp_path):
    from priorclip.training.prior import PriorTrainConfig, train_prior

    json_path, img_dir = tiny_data
    s = train_prior(PriorTrainConfig(data=str(json_path), images=str(img_dir), out=str(tmp_path / "prior"),
                                     model="priorclip-tiny", epochs=2, batch_size=8, workers=0, warmup=1, progress=False))
    assert len(s["classes"]) == 6 and set(s["metrics"]) == {"val_top1", "test_top1"}
    prior = tmp_path / "prior" / "prior.pt"
    t = Trainer(_cfg(tiny_data, tmp_path / "t", prior_checkpoint=str(prior), lock_prior=True))
    saved = torch.load(prior, weights_only=True)["state_dict"]
    for k, v in t.model.state_dict().items():
        if k.startswith("res_visual."):
            assert torch.equal(v, saved[k]), k
    assert not any(p.requires_grad for p in t.model.res_visual.parameters())
    assert not t.model.res_visual.training
    # a prior for another config is refused with the keys named
    s2 = tmp_path / "wrong.pt"
    sd = {k: v for k, v in saved.items() if k != "res_visual.conv1.weight"}
    torch.save({"state_dict": sd}, s2)
    with pytest.raises(CheckpointError, match="1 missing: res_visual.conv1.weight"):
        Trainer(_cfg(tiny_data, tmp_path / "w", prior_checkpoint=str(s2)))


def test_cli_train_and_one_line_errors(tiny_data, tmp_path):
    from click.testing import CliRunner

    from priorclip.cli import main

    json_path, img_dir = tiny_data
    r = CliRunner().invoke(main, ["train", "--data", str(json_path), "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error: image folder not found")
    r = CliRunner().invoke(main, ["train", "--data", str(json_path), "--images", str(img_dir), "--model", "clip-tiny",
                                  "--out", str(tmp_path / "o"), "--batch-size", "16", "--epochs", "1", "--workers", "0", "--no-progress",
                                  "--val-split", "none", "--test-split", "none", "--no-aff-loss",
                                  "--stop-after", "2"])
    assert r.exit_code == 1 and "Error: stopped by --stop-after 2 at step 2/5;" in r.output, r.output
    r = CliRunner().invoke(main, ["train", "--data", str(json_path), "--images", str(img_dir), "--model", "clip-tiny",
                                  "--out", str(tmp_path / "o"), "--batch-size", "16", "--epochs", "1", "--workers", "0", "--no-progress",
                                  "--val-split", "none", "--test-split", "none", "--no-aff-loss",
                                  "--resume", "auto"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["affiliation_loss"] is False and summary["steps"] == 5
    assert "affiliation" not in summary["final_loss"]
    r = CliRunner().invoke(main, ["train-prior", "--help"])
    assert r.exit_code == 0 and "scene classifier" in r.output


def test_webdataset_and_csv_training(tiny_data, tmp_path):
    """The other two input forms through the whole trainer (a couple of steps each)."""
    import io
    import tarfile

    from priorclip.training.data import load_karpathy_pairs

    json_path, img_dir = tiny_data
    src = load_karpathy_pairs(json_path, img_dir, "train")
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(2):
        with tarfile.open(shard_dir / f"{s:03d}.tar", "w") as tar:
            for k in range(s, len(src.captions), 2):
                img = src.images[src.caption_image[k]]
                for ext, data in (("img_content", img.read_bytes()), ("caption", src.captions[k].encode()),
                                  ("img_name", img.name.encode())):
                    info = tarfile.TarInfo(f"{k:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    s = train(_cfg(tiny_data, tmp_path / "w", data=str(shard_dir / "{000..001}.tar"), images=None, val_data=str(json_path),
                   val_images=str(img_dir), val_split="val", test_split=None, stop_after=None, epochs=1, batch_size=40))
    assert s["train_samples"] == 80 and s["steps"] == 2 and len(s["val"]) == 1
    rows = "filepath,caption\n" + "".join(f"{src.images[i].name},\"{c}\"\n" for c, i in zip(src.captions, src.caption_image))
    (tmp_path / "pairs.csv").write_text(rows)
    s = train(_cfg(tiny_data, tmp_path / "c", data=str(tmp_path / "pairs.csv"), images=str(img_dir), model="clip-tiny",
                   val_data=str(json_path), val_split="val", batch_size=40, precision="fp16", grad_checkpointing=True))
    assert s["steps"] == 2 and s["val"] and s["precision"] == "fp16"


def test_sigterm_stops_resumably(tiny_data, tmp_path):
    """An interrupted run (SIGTERM, as a scheduler sends) writes a resumable checkpoint and says how to go on."""
    import signal
    import subprocess
    import sys
    import time

    json_path, img_dir = tiny_data
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "priorclip.cli", "train", "--data", str(json_path), "--images", str(img_dir),
           "--model", "clip-tiny", "--epochs", "50", "--batch-size", "8", "--workers", "0", "--no-progress",
           "--val-split", "none", "--test-split", "none", "--log-every", "1", "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: stopped by SIGTERM at step") and "--resume auto" in last
    from priorclip.checkpoint import read_checkpoint

    state = read_checkpoint(out / "checkpoints" / "latest.pt").extra["train_state"]
    assert state["step"] >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_training_steps(tiny_data, tmp_path, precision):
    """On a GPU: pinned uint8 batches, on-device normalisation, autocast, fused AdamW, a few steps, then eval."""
    cfg = _cfg(tiny_data, tmp_path, device="cuda", precision=precision, workers=2, epochs=2, batch_size=16,
               val_split="val", test_split="test", accum_freq=2)
    s = train(cfg)
    assert s["steps"] == 4 and s["samples_per_s"] > 0
    want = _recall_by_hand(tmp_path / "run" / "model.pt", *tiny_data, "test", device="cuda")
    assert {k: s["test"][k] for k in want} == pytest.approx(want, abs=1e-9)
    assert all(math.isfinite(v) for v in s["final_loss"].values())


def test_uncached_corrupt_images_are_dropped_from_batches_and_listed(tiny_data, tmp_path):
    from priorclip.training.data import load_karpathy_pairs

    json_path, img_dir = tiny_data
    bad_dir = tmp_path / "imgs"
    shutil.copytree(img_dir, bad_dir)
    name = load_karpathy_pairs(json_path, img_dir, "train").images[3].name
    (bad_dir / name).write_bytes(b"\xff\xd8 truncated")
    s = train(_cfg(tiny_data, tmp_path, images=str(bad_dir), cache="no", batch_size=16, model="clip-tiny"))
    assert s["skipped_images"] == 5  # its five captions' samples, each dropped from its batch and counted
    lines = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert len(lines) == 5 and all(line.split("\t")[0].endswith(name) for line in lines)


def test_lock_text_freezes_the_text_tower(tiny_data, tmp_path):
    t = Trainer(_cfg(tiny_data, tmp_path, model="clip-tiny", lock_text=True))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    data = TrainData(t.cfg, t.model.cfg, t.d, t.out)
    t.train_step([next(data.loader(0, 0))])
    for n, p in t.model.named_parameters():
        text = n.startswith(("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection"))
        assert torch.equal(before[n], p) == text or n == "logit_scale", n


def test_max_steps_is_a_budget_that_ends_normally(tiny_data, tmp_path):
    """--max-steps ends training like a finished run (test split, model.pt), with the LR annealed over the budget."""
    cfg = _cfg(tiny_data, tmp_path, epochs=5, max_steps=5, test_split="test", val_split="val", val_limit=3,
               warmup=1, lr=1e-3)
    summary = train(cfg)
    out = tmp_path / "run"
    assert summary["steps"] == 5 and summary["planned_steps"] == 5 and summary["stopped"] == "--max-steps 5"
    assert "test" in summary and (out / "model.pt").is_file()
    assert summary["val_set"]["n_images"] == 3 and summary["val_set"]["selection"]["method"] == "class-spread"
    lrs = [json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert lrs[-1] < 0.2 * max(lrs)  # cosine over 5 steps reaches near zero at the last one
