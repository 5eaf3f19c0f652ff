"""Parameter groups, schedule values and the logit-scale clamp."""

from __future__ import annotations

import math

import pytest
import torch

from priorclip import create_model
from priorclip.training.optim import LOGIT_SCALE_MAX, clamp_logit_scale, lr_at, make_optimizer, no_weight_decay, param_groups


def test_param_groups_follow_open_clip_rule():
    model = create_model("priorclip-tiny")
    decay, rest = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in rest["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert len(no) + len(yes) == len(list(model.parameters()))
    for n in ("logit_scale", "visual.ln_pre.weight", "visual.class_embedding", "res_visual.bn1.weight",
              "visual.transformer.resblocks.0.attn.in_proj_bias", "ln_final.bias", "res_visual.layer1.0.downsample.1.weight"):
        assert n in no, n
    for n in ("visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight", "positional_embedding",
              "res_visual.attnpool.positional_embedding", "vision_proj_res.weight", "visual.positional_embedding"):
        assert n in yes, n


def test_frozen_parameters_are_left_out():
    model = create_model("priorclip-tiny")
    for p in model.res_visual.parameters():
        p.requires_grad_(False)
    opt = make_optimizer(model, 1e-3, 0.1)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in model.res_visual.parameters())
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_no_weight_decay_rule_by_name_and_rank():
    assert no_weight_decay("x.weight", torch.zeros(3))
    assert no_weight_decay("blk.bn2.weight", torch.zeros(3, 3))
    assert not no_weight_decay("blk.fc.weight", torch.zeros(3, 3))


def test_schedule_values():
    base, warm, total = 1e-3, 10, 110
    assert lr_at(0, base, warm, total) == pytest.approx(base / 10)
    assert lr_at(9, base, warm, total) == pytest.approx(base)
    assert lr_at(10, base, warm, total) == pytest.approx(base)  # cosine starts at the peak
    assert lr_at(60, base, warm, total) == pytest.approx(base / 2)  # half-way through the decay
    assert lr_at(110, base, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(35, base, warm, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)) * base)
    assert lr_at(60, base, warm, total, "linear") == pytest.approx(base / 2)
    assert lr_at(100, base, warm, total, "const") == base
    assert lr_at(0, base, 0, total) == pytest.approx(base)
    with pytest.raises(ValueError):
        lr_at(0, base, warm, total, "step")


def test_logit_scale_clamped_to_100():
    model = create_model("clip-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == 0.0
