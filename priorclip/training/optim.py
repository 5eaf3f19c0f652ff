"""AdamW with open_clip's parameter groups, the learning-rate schedules, and the logit-scale clamp (spec §5A); the
closed-domain PIR recipe's decay rule and warm-up (spec §5B).

PIR-pytorch trains with ``transformers.AdamW``; :func:`make_optimizer` builds ``torch.optim.AdamW``, which differs
from it in two small ways: the decay multiplies the weight before rather than after the Adam update (a relative
difference of lr·wd = 6e-7 of the update), and transformers adds eps before the bias correction of the second moment,
so its eps acts like torch's eps/sqrt(1 - β₂ᵗ) at step t (7x at the first step, under 1.1x after 100 steps), which
only matters for gradient entries within a few orders of magnitude of eps = 1e-8.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

LOGIT_SCALE_MAX = math.log(100.0)  # s = exp(logit_scale) is clamped to at most 100 after every step
SCHEDULES = ("cosine", "linear", "const", "hf_linear")
# PIR-pytorch (X-VLM's optimiser set-up): no decay for names containing any of these; "bias" covers the norms' biases.
# The LayerNorm of the FFNs (``ffn.1``) and the temperatures match none, so they are decayed.
PIR_NO_DECAY = ("bias", "LayerNorm.weight", "norm.weight", "norm1.weight", "norm2.weight")
PIR_WARMUP_FRACTION = 0.1  # of the total steps


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """open_clip's rule: no decay for parameters with ndim < 2 or with bn, ln, bias or logit_scale in the name."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def pir_no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """PIR-pytorch's rule: no decay for names containing ``bias`` or the weight of a ``LayerNorm``/``norm``/``norm1``/
    ``norm2`` module (case-sensitive substrings; the parameter's shape plays no part)."""
    return any(key in name for key in PIR_NO_DECAY)


DecayRule = Callable[[str, torch.Tensor], bool]  # (name, parameter) -> True when it gets no weight decay


def param_groups(model: nn.Module, weight_decay: float, no_decay: DecayRule = no_weight_decay) -> list[dict]:
    """Two AdamW groups: [decayed, not decayed by ``no_decay``]; frozen parameters are left out."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    no_decay: DecayRule = no_weight_decay,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused CUDA kernel when the parameters live on a GPU.

    PIR (spec §5B): ``make_optimizer(model, 6e-5, 0.01, (0.9, 0.98), 1e-8, no_decay=pir_no_weight_decay)``.
    """
    on_cuda = next(model.parameters()).is_cuda
    groups = param_groups(model, weight_decay, no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if on_cuda else None)


def pir_warmup_steps(total: int) -> int:
    """PIR-pytorch's warm-up length: the first 10% of the total steps, rounded down."""
    return int(total * PIR_WARMUP_FRACTION)


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate at 0-based ``step`` (open_clip's ``cosine_lr``: warm-up lr·(step+1)/warmup, then the decay).

    cosine: ½(1 + cos(π e / E))·lr with e = step - warmup, E = total - warmup; linear: (1 - e/E)·lr; const: lr.
    hf_linear (PIR-pytorch, transformers' linear schedule with warm-up): lr·step/warmup during the warm-up (so the
    first step has lr 0), then lr·max(0, (total - step)/(total - warmup)), which equals linear's decay.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "hf_linear":
        if step < warmup:
            return base_lr * step / max(1, warmup)
        return base_lr * max(0.0, (total - step) / max(1, total - warmup))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "const":
        return base_lr
    e, es = step - warmup, max(1, total - warmup)
    frac = min(1.0, e / es)
    if schedule == "linear":
        return base_lr * (1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * frac)) * base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the logit-scale parameter in [0, ln 100] (open_clip clamps after every optimiser step)."""
    model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
