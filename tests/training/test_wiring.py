"""Wiring of the trainer, each part checked against a value computed apart from it (issue 14).

Each test names the mistake it exists to catch; every one was checked to fail with that mistake put in:
the affiliation term left out of the backward, the LR schedule spanning one epoch instead of the whole run, no
logit-scale clamp after the step, the GradScaler state not restored on resume, BatchNorm statistics updated twice
per micro-batch under accumulation, a sampler (or loader) that shuffles the same way every epoch, and an fp16 backward
that is not loss-scaled (or scaled twice).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from priorclip.training import data as tdata
from priorclip.training.trainer import Trainer, TrainData
from tests.training.conftest import train_config


def _cfg(tiny_data, tmp_path, **kw):
    return train_config(tiny_data, tmp_path / "run", **kw)


def _trainer_and_data(tiny_data, tmp_path, **kw):
    t = Trainer(_cfg(tiny_data, tmp_path, **kw))
    return t, TrainData(t.cfg, t.model.cfg, t.d, t.out)


def _ce_diag(logits: torch.Tensor) -> torch.Tensor:
    return (logits.logsumexp(dim=1) - logits.diagonal()).mean()


def _loss64(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, names: list[str]):
    """Spec §4A by hand in float64: ½ symmetric InfoNCE, plus the same against per-class mean features."""
    cls = [n.rsplit("/", 1)[-1].split("_", 1)[0] for n in names]
    same = torch.tensor([[float(a == b) for b in cls] for a in cls], dtype=torch.float64)
    img_c, txt_c = same @ img / same.sum(1, keepdim=True), same @ txt / same.sum(1, keepdim=True)
    contrastive = 0.5 * (_ce_diag(scale * img @ txt.T) + _ce_diag(scale * txt @ img.T))
    affiliation = 0.5 * (_ce_diag(scale * img @ txt_c.T) + _ce_diag(scale * txt @ img_c.T))
    return contrastive, affiliation


@pytest.mark.parametrize("accum", [1, 2])
def test_step_gradient_is_that_of_contrastive_plus_affiliation(tiny_data, tmp_path, accum):
    """Catches: the affiliation term dropped from the backward (it is ~half of every parameter's gradient here)."""
    t, data = _trainer_and_data(tiny_data, tmp_path, batch_size=8 // accum, accum_freq=accum)
    ref = copy.deepcopy(t.model).double()  # clip-tiny: no BatchNorm, so one big float64 batch is the reference
    it = data.loader(0, 0)
    micros = [next(it) for _ in range(accum)]
    names = [n for m in micros for n in m["names"]]
    assert all("_" in n for n in names) and len({n.split("_")[0] for n in names}) < len(names)  # shared classes

    losses = t.forward_backward(micros)

    pixels = tdata.normalize_on_device(torch.cat([m["pixels"] for m in micros])).double()
    img, txt, scale = ref(pixels, torch.cat([m["tokens"] for m in micros]))
    lc, la = _loss64(img, txt, scale, names)
    (lc + la).backward()
    assert losses["contrastive"] == pytest.approx(lc.item(), rel=1e-5)
    assert losses["affiliation"] == pytest.approx(la.item(), rel=1e-5)
    assert losses["loss"] == pytest.approx(lc.item() + la.item(), rel=1e-5)
    got = {n: p.grad for n, p in t.model.named_parameters() if p.grad is not None}
    want = dict(ref.named_parameters())
    assert got.keys() == {n for n, p in want.items() if p.requires_grad} and "logit_scale" in got
    for n, g in got.items():  # fp32 vs fp64 differs by ~1e-6 relative here; the affiliation share is ~0.5
        w = want[n].grad
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-4 * float(w.abs().max()), msg=n)


def test_lr_schedule_spans_every_epoch_and_each_epoch_gets_its_own_shuffle(tiny_data, tmp_path, monkeypatch):
    """Catches: the schedule's total computed for one epoch, and fit asking the loader for the wrong epoch.

    The optimiser math is stubbed out: this checks what ``fit`` feeds each step (its LR and its batches)."""
    epochs, warmup, lr = 3, 2, 1e-3
    t, data = _trainer_and_data(tiny_data, tmp_path, model="clip-tiny", epochs=epochs, batch_size=16, warmup=warmup,
                                lr=lr)
    steps = data.steps_per_epoch
    assert steps == 5  # 16 training images x 5 captions / 16
    seen: list[tuple[float, list[str]]] = []

    def step(micros):
        seen.append((t.optimizer.param_groups[0]["lr"], [n for m in micros for n in m["names"]]))
        return {"contrastive": 1.0, "loss": 1.0}

    monkeypatch.setattr(t, "train_step", step)
    t.fit()
    total = epochs * steps
    decay = total - warmup  # open_clip's linear warm-up, then the cosine over the rest of the run, written out
    want = [lr * (s + 1) / warmup if s < warmup else 0.5 * lr * (1 + math.cos(math.pi * (s - warmup) / decay))
            for s in range(total)]
    got = [lr_s for lr_s, _ in seen]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    per_epoch = [[n for _, names in seen[e * steps : (e + 1) * steps] for n in names] for e in range(epochs)]
    for e in range(epochs):  # what fit trained on is what the loader yields for that epoch
        it = data.loader(e, 0)
        assert per_epoch[e] == [n for _ in range(steps) for n in next(it)["names"]], e
    assert per_epoch[0] != per_epoch[1] != per_epoch[2] != per_epoch[0]


class _Recording(torch.utils.data.Dataset):
    """Wraps the training dataset and records the (epoch, index) key of every item the loader asks for."""

    def __init__(self, inner):
        self.inner, self.keys = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        self.keys.append(tuple(key))
        return self.inner[key]


def test_loader_shuffles_differently_each_epoch_and_reproducibly(tiny_data, tmp_path):
    """Catches: a sampler (or TrainData.loader) that ignores the epoch, or a shuffle that is not seeded."""
    t, data = _trainer_and_data(tiny_data, tmp_path, batch_size=8)
    n = len(data.dataset)
    data.dataset = rec = _Recording(data.dataset)

    def epoch_keys(epoch):
        rec.keys = []
        for _ in data.loader(epoch, 0):
            pass
        return rec.keys

    e0, e1, e1_again = epoch_keys(0), epoch_keys(1), epoch_keys(1)
    for e, keys in ((0, e0), (1, e1)):
        assert {k[0] for k in keys} == {e}  # the augmentation is keyed by the epoch too
        idx = [k[1] for k in keys]
        assert len(idx) == data.steps_per_epoch * 8 == n and sorted(idx) == list(range(n))  # each pair once
        assert idx != sorted(idx)  # shuffled
    assert [k[1] for k in e0] != [k[1] for k in e1]  # a new order each epoch
    assert e1 == e1_again  # and the same order when the epoch is replayed (resume)
    other_seed = TrainData(_cfg(tiny_data, tmp_path / "s", seed=1), t.model.cfg, t.d, t.out)
    other_seed.dataset = rec
    rec.keys = []
    for _ in other_seed.loader(1, 0):
        pass
    assert [k[1] for k in rec.keys] != [k[1] for k in e1]  # the order comes from the seed, not a fixed table


def test_logit_scale_is_clamped_after_the_optimiser_step(tiny_data, tmp_path):
    """Catches: the clamp to [0, ln 100] not applied, or applied before the step (the step then moves it off)."""
    t, data = _trainer_and_data(tiny_data, tmp_path, batch_size=8, lr=1e-3, warmup=1)
    batch = next(data.loader(0, 0))
    for start, want in ((7.0, math.log(100.0)), (-1.0, 0.0)):
        with torch.no_grad():
            t.model.logit_scale.fill_(start)
        t.train_step([batch])  # AdamW moves it by about lr, which leaves it far outside [0, ln 100] unclamped
        assert t.model.logit_scale.item() == pytest.approx(want, abs=1e-6), start


def test_resume_restores_the_grad_scaler(tiny_data, tmp_path):
    """Catches: the fp16 GradScaler (loss scale and growth tracker) left at its defaults on resume."""
    first = Trainer(_cfg(tiny_data, tmp_path, precision="fp16"))
    state = {"scale": 128.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}
    first.scaler.load_state_dict(state)  # what some steps with overflows would leave (the default scale is 2^16)
    first.save(first.ckpt_dir / "latest.pt", epoch=0, step_in_epoch=1)
    resumed = Trainer(_cfg(tiny_data, tmp_path, precision="fp16", resume="auto"))
    assert resumed.scaler.get_scale() == 2.0**16  # before loading: the default, so the check below can fail
    resumed.load_state(resumed.resume_path)
    assert resumed.scaler.state_dict() == state


def test_accumulation_updates_batchnorm_statistics_once_per_micro_batch(tiny_data, tmp_path):
    """Catches: the no-grad feature pass of accumulation moving the BatchNorm running statistics as well as the
    gradient pass (twice per micro-batch), or the stats restored over the gradient pass's update.

    Wanted (``preserved_bn_stats``): the running statistics a plain train-mode forward of each micro-batch in turn
    leaves, i.e. one update per micro-batch."""
    accum = 2
    t, data = _trainer_and_data(tiny_data, tmp_path, model="priorclip-tiny", batch_size=4, accum_freq=accum)
    bns = {n: m for n, m in t.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bns and all(m.training and m.momentum is not None for m in bns.values())
    ref = copy.deepcopy(t.model)
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    it = data.loader(0, 0)
    micros = [next(it) for _ in range(accum)]

    t.forward_backward(micros)

    with torch.no_grad():
        for m in micros:
            ref(tdata.normalize_on_device(m["pixels"]), m["tokens"])
    ref_bns = dict(ref.named_modules())
    for n, m in bns.items():
        assert int(m.num_batches_tracked) == accum, n
        torch.testing.assert_close(m.running_mean, ref_bns[n].running_mean, rtol=1e-6, atol=1e-7, msg=n)
        torch.testing.assert_close(m.running_var, ref_bns[n].running_var, rtol=1e-6, atol=1e-7, msg=n)
    assert any(not torch.equal(before[n], m.running_mean) for n, m in bns.items())  # the stats did move


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_losses_and_unscaled_gradient_match_float64(tiny_data, tmp_path, precision):
    """Catches: loss terms reported scaled (or from the low-precision towers' rounding gone wrong), and an fp16 backward
    not loss-scaled, or scaled twice. Tolerances: 5x the bf16 error seen here (losses ~2e-3, gradients ~2e-2)."""
    t, data = _trainer_and_data(tiny_data, tmp_path, precision=precision)
    if precision == "fp16":  # 2^16 overflows this model's fp16 gradients (the scaler would skip the step); 2^10 fits
        t.scaler.load_state_dict({"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                                  "_growth_tracker": 0})
    ref = copy.deepcopy(t.model).double()
    batch = next(data.loader(0, 0))
    losses = t.forward_backward([batch])
    img, txt, scale = ref(tdata.normalize_on_device(batch["pixels"]).double(), batch["tokens"])
    lc, la = _loss64(img, txt, scale, batch["names"])
    (lc + la).backward()
    assert losses["contrastive"] == pytest.approx(lc.item(), rel=1e-2)
    assert losses["affiliation"] == pytest.approx(la.item(), rel=1e-2)
    loss_scale = 1024.0 if precision == "fp16" else 1.0
    want = dict(ref.named_parameters())
    for n, p in t.model.named_parameters():
        w = want[n].grad
        assert float((p.grad.double() / loss_scale - w).norm() / w.norm()) < 0.1, n
