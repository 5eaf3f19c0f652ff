"""PIR's optimiser recipe (spec §5B): the decay rule by parameter name, the AdamW settings, and the warm-up + linear
decay schedule (hand-computed values and transformers' own scheduler)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from priorclip.training.optim import (
    lr_at, make_optimizer, param_groups, pir_no_weight_decay, pir_warmup_steps, set_lr,
)

DECAYED = [
    "text_encoder.encoder.layer.0.attention.output.dense.weight",
    "img_sa.0.ffn.1.weight",  # the LayerNorm inside the FFN: its name matches none of the keys
    "vision_encoder.layers.0.blocks.0.mlp.fc1.weight",
    "conv_proj.weight",
    "temp",
    "temp2",
    "txt_ln.weight",  # open_clip's "ln" rule does not apply here
    "head.GroupNorm.weight",  # the substrings are case-sensitive: "Norm.weight" is not "norm.weight"
]
NOT_DECAYED = [
    "text_encoder.encoder.layer.0.attention.output.LayerNorm.weight",
    "text_encoder.embeddings.LayerNorm.bias",
    "vision_encoder.layers.0.blocks.0.norm1.weight",
    "vision_encoder.layers.0.blocks.0.norm2.weight",
    "vision_encoder.layers.0.downsample.norm.weight",
    "vision_encoder.patch_embed.norm.weight",
    "vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table",  # 2-D, but "bias" is in its name
    "img_sa.0.ffn.1.bias",
    "x.bias",
]
FROZEN = ["conv_encoder.0.weight", "conv_encoder.1.bias"]


def _model() -> nn.Module:
    """A module whose parameters carry exactly the given dotted names (1-D, 2-D and scalar shapes mixed)."""
    root = nn.Module()
    for k, name in enumerate(DECAYED + NOT_DECAYED + FROZEN):
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if part not in m._modules:
                m.add_module(part, nn.Module())
            m = m._modules[part]
        shape = [(), (3,), (3, 3)][k % 3]
        m.register_parameter(leaf, nn.Parameter(torch.full(shape, 1.0 + k), requires_grad=name not in FROZEN))
    return root


def test_decay_rule_by_name():
    model = _model()
    decay, rest = param_groups(model, 0.01, pir_no_weight_decay)
    assert decay["weight_decay"] == 0.01 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(DECAYED)
    assert sorted(names[id(p)] for p in rest["params"]) == sorted(NOT_DECAYED)  # frozen ones are in neither


def test_pir_optimizer_settings_and_one_step():
    model = _model()
    opt = make_optimizer(model, 6e-5, 0.01, (0.9, 0.98), 1e-8, no_decay=pir_no_weight_decay)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 6e-5 and g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 for g in opt.param_groups)
    # a step with zero gradients moves nothing but the decayed weights, each by the factor (1 - lr·wd)
    set_lr(opt, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.01 if n in DECAYED else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-7, atol=0, msg=n)


def test_default_rule_is_unchanged():
    model = _model()
    decay, rest = make_optimizer(model, 1e-3, 0.2).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert "temp" in {names[id(p)] for p in rest["params"]}  # open_clip's rule: ndim < 2 is not decayed
    assert "txt_ln.weight" in {names[id(p)] for p in rest["params"]}


def test_warmup_steps_are_ten_percent_rounded_down():
    assert [pir_warmup_steps(t) for t in (0, 9, 10, 105, 1000, 8850)] == [0, 0, 1, 10, 100, 885]


def test_hf_linear_schedule_by_hand():
    base, total = 6e-5, 100
    warm = pir_warmup_steps(total)
    expected = {0: 0.0, 1: 0.1, 5: 0.5, 9: 0.9, 10: 1.0, 11: 89 / 90, 55: 0.5, 99: 1 / 90, 100: 0.0, 150: 0.0}
    for step, frac in expected.items():
        assert lr_at(step, base, warm, total, "hf_linear") == pytest.approx(base * frac, rel=1e-12, abs=1e-20), step
    assert lr_at(0, base, 0, total, "hf_linear") == base  # no warm-up: the decay starts at the peak
    assert lr_at(3, base, 5, 5, "hf_linear") == pytest.approx(0.6 * base)  # warm-up only: no division by zero
    # the existing linear schedule keeps open_clip's warm-up, one step ahead
    assert lr_at(0, base, warm, total, "linear") == pytest.approx(0.1 * base)
    assert lr_at(55, base, warm, total, "linear") == pytest.approx(0.5 * base)


@pytest.mark.parametrize("total", [1, 37, 200])
def test_hf_linear_matches_transformers_scheduler(total):
    """PIR steps transformers' linear schedule once per iteration after optimizer.step(): iteration k uses lr(k)."""
    from transformers import get_linear_schedule_with_warmup

    warm = pir_warmup_steps(total)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=6e-5)
    sched = get_linear_schedule_with_warmup(opt, warm, total)
    for step in range(total + 5):
        assert lr_at(step, 6e-5, warm, total, "hf_linear") == pytest.approx(opt.param_groups[0]["lr"], abs=1e-18)
        opt.step()
        sched.step()
