"""PIR in the trainer: the step's loss and gradient against spec §4B written out in float64 here (soft same-image
targets, the affiliation term with its transposed second term and its own temperature), batches padded to their
longest caption, the family's recipe (AdamW groups, schedule, no temperature clamp), and a short run end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from priorclip.registry import create_model
from priorclip.training import data as tdata
from priorclip.training.trainer import Trainer, TrainData, train
from tests.training.conftest import make_tiny, train_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _trainer(tiny_data, tmp_path, **kw):
    cfg = train_config(tiny_data, tmp_path / "run", **({"model": "pir-tiny", "lr": None, "warmup": None} | kw))
    t = Trainer(cfg)
    return t, TrainData(t.cfg, t.model.cfg, t.d, t.out)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(dim=1)).sum(1).mean()


def _pir_loss64(img, txt, temps, names):
    """Spec §4B by hand: targets spread over all pairs of the same image; class centres (not re-normalised) against
    temp2, the second term over texts for each image centre (a transpose)."""
    image = [n.rsplit("/", 1)[-1] for n in names]
    cls = [n.split("_", 1)[0] for n in image]
    same_img = torch.tensor([[float(a == b) for b in image] for a in image], dtype=torch.float64)
    p = same_img / same_img.sum(1, keepdim=True)
    logits = img @ txt.T / temps[0]
    contrastive = 0.5 * (_nll(logits, p) + _nll(logits.T, p))
    same_cls = torch.tensor([[float(a == b) for b in cls] for a in cls], dtype=torch.float64)
    img_c, txt_c = same_cls @ img / same_cls.sum(1, keepdim=True), same_cls @ txt / same_cls.sum(1, keepdim=True)
    eye = torch.eye(len(names), dtype=torch.float64)
    affiliation = 0.5 * (_nll(img @ txt_c.T / temps[1], eye) + _nll((txt @ img_c.T / temps[1]).T, eye))
    return contrastive, affiliation


def test_step_loss_and_gradient_are_spec_4b(tiny_data, tmp_path):
    """Catches: image ids not passed (one-hot targets), the transpose dropped, the temperatures swapped or clamped,
    padding not cut to the batch's longest caption."""
    t, data = _trainer(tiny_data, tmp_path)
    t.model.eval()  # no dropout / drop-path, BatchNorm on its statistics: the float64 copy sees the same function
    src = data.dataset
    # two captions each of three images, two single ones: shared images and shared classes in one batch
    by_image: dict[int, list[int]] = {}
    for i in range(len(src)):
        by_image.setdefault(int(src.source.caption_image[src.index[i]]), []).append(i)
    imgs = sorted(by_image)[:5]
    chosen = by_image[imgs[0]][:2] + by_image[imgs[1]][:2] + by_image[imgs[2]][:2] + [by_image[imgs[3]][0],
                                                                                       by_image[imgs[4]][0]]
    micro = tdata.collate([src[(0, p)] for p in chosen])
    names = micro["names"]
    assert len(set(names)) == 5

    ref = copy.deepcopy(t.model).double()
    seen = []
    encode_text = t.model.encode_text
    t.model.encode_text = lambda tokens, **kw: seen.append(tokens.shape[1]) or encode_text(tokens, **kw)
    losses = t.forward_backward([micro])
    longest = int((micro["tokens"] != 0).sum(1).max())
    assert seen == [longest] and micro["tokens"].shape[1] >= longest

    pixels = tdata.normalize_on_device(micro["pixels"]).double()
    img, txt, temps = ref(pixels, micro["tokens"][:, :longest])
    lc, la = _pir_loss64(img, txt, temps, names)
    (lc + la).backward()
    assert losses["contrastive"] == pytest.approx(lc.item(), rel=1e-5)
    assert losses["affiliation"] == pytest.approx(la.item(), rel=1e-5)
    got = {n: p.grad for n, p in t.model.named_parameters() if p.grad is not None}
    want = dict(ref.named_parameters())
    assert {"temp", "temp2"} <= got.keys() and not any(n.startswith("conv_encoder.") for n in got)  # frozen prior
    for n, g in got.items():
        w = want[n].grad
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-4 * float(w.abs().max()) + 1e-7, msg=n)  # key biases: exactly 0


def test_recipe_and_optimiser_groups(tiny_data, tmp_path):
    t, data = _trainer(tiny_data, tmp_path, lr=None, wd=None, beta2=None, schedule=None)
    assert (t.cfg.lr, t.cfg.wd, t.cfg.beta2, t.cfg.schedule) == (6e-5, 0.01, 0.98, "hf_linear")
    names = {id(p): n for n, p in t.model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in t.optimizer.param_groups}
    decay, no_decay = groups[0.01], groups[0.0]
    assert "img_sa.0.ffn.1.weight" in decay and "temp" in decay and "text_encoder.encoder.layer.0.output.dense.weight" in decay
    assert {"text_encoder.encoder.layer.0.attention.output.LayerNorm.weight", "vision_encoder.norm.weight",
            "vision_encoder.layers.0.blocks.0.norm1.weight", "img_ca.1.norm2.weight", "head_txt.bias"} <= no_decay
    assert not any(n.startswith("conv_encoder.") for n in decay | no_decay)  # frozen, left out
    # an explicit option wins over the recipe
    t2, _ = _trainer(tiny_data, tmp_path / "b", lr=1e-4, schedule="cosine")
    assert (t2.cfg.lr, t2.cfg.schedule, t2.cfg.wd) == (1e-4, "cosine", 0.01)


def test_short_run_end_to_end(tiny_data, tmp_path):
    """Two epochs: the recipe's warm-up is 10% of the run, the temperatures move unclamped, validation and test use
    PIR's protocol, and model.pt rebuilds the PIR model by itself."""
    out = tmp_path / "run"
    cfg = train_config(tiny_data, out, model="pir-tiny", lr=1e-3, warmup=None, epochs=2, val_split="val",
                       test_split="test")
    summary = train(cfg)
    saved = json.loads((out / "config.json").read_text())
    steps = summary["steps"]
    assert steps == 2 * (16 * 5 // 8) and saved["warmup"] == int(0.1 * steps) and saved["schedule"] == "hf_linear" and saved["wd"] == 0.01
    model = create_model(checkpoint=out / "model.pt")
    assert model.cfg.family == "pir" and model.cfg.name == "pir-tiny"
    assert model.temp.item() != pytest.approx(0.07) and model.temp2.item() != pytest.approx(0.07)
    assert set(summary["test"]) >= {"mR", "i2t_R@1"}


def test_captions_empty_after_cleaning_are_left_out():
    """PIR's cleaning refuses a caption with no words (the reference crashes on AID/RSICD's two in train): the pair
    is left out and counted; CLIP's tokenizer takes every caption. Each distinct caption is tokenised as its own."""
    import numpy as np

    from priorclip.tokenizer import clip_tokenizer
    from priorclip.training.data import PairSource, tokenize_pairs
    from priorclip.wordpiece import pir_tokenizer

    caps = ["a river", "", "...", "a lake", "a river"]
    src = PairSource([tdata.Path("a.png"), tdata.Path("b.png")], caps, np.array([0, 0, 1, 1, 1]))
    kept, ids, n = tokenize_pairs(src, pir_tokenizer())
    assert (kept.captions, kept.caption_image.tolist(), n) == (["a river", "a lake", "a river"], [0, 1, 1], 2)
    tok = pir_tokenizer()
    assert ids.dtype == torch.int32 and [r[r != 0].tolist() for r in ids] == [tok([c])[0].tolist() for c in kept.captions]
    kept, ids, n = tokenize_pairs(src, clip_tokenizer(77))
    assert kept is src and n == 0 and torch.equal(ids.long(), clip_tokenizer(77)(caps))
