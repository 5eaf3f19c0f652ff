"""AdamW with open_clip's parameter groups, the learning-rate schedules, and the logit-scale clamp (spec §5A)."""

from __future__ import annotations

import math

import torch
from torch import nn

LOGIT_SCALE_MAX = math.log(100.0)  # s = exp(logit_scale) is clamped to at most 100 after every step
SCHEDULES = ("cosine", "linear", "const")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """open_clip's rule: no decay for parameters with ndim < 2 or with bn, ln, bias or logit_scale in the name."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: [decayed (weights of matrices/convs), not decayed]; frozen parameters are left out."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused CUDA kernel when the parameters live on a GPU."""
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True if on_cuda else None)


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate at 0-based ``step`` (open_clip's ``cosine_lr``: warm-up lr·(step+1)/warmup, then the decay).

    cosine: ½(1 + cos(π e / E))·lr with e = step - warmup, E = total - warmup; linear: (1 - e/E)·lr; const: lr.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
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
