"""PriorCLIP's training loss (spec §4A): symmetric CLIP InfoNCE plus the affiliation ("attribution") loss.

* Contrastive: L_c = ½[CE(s·I Tᵀ, diag) + CE(s·T Iᵀ, diag)] over the global batch (features all-gathered across
  processes, every process computes the whole loss, as open_clip does without ``--local-loss``).
* Affiliation: samples are grouped by a class label (the image name up to its first ``_``, numbered per local batch,
  see :func:`affiliation_labels`). Per sample the class centres Ī_i, T̄_i are the plain means of the normalised image /
  text features of its class in the local batch (not re-normalised); features and centres are gathered like the
  features, then L_a = ½[CE(s·I T̄ᵀ, diag) + CE(s·T Īᵀ, diag)] with the same logit scale s.
* Total L = L_c + L_a (weights 1); ``affiliation=False`` gives plain CLIP training.

The closed-domain PIR loss (spec §4B, :class:`PIRLoss`) differs in three ways: logits are divided by two learnable,
unclamped temperatures (``temp`` for the contrastive term, ``temp2`` for the affiliation term); several captions of one
image in the global batch are soft positives of each other (targets row-normalised over equal image ids); and the
second affiliation term ranks, for each image centre Ī_i, all texts T_j (the transpose of T Īᵀ).

Both losses run in float32 whatever the autocast state, because s can reach 100 and bf16 logits lose the ranking.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def class_of(name: str) -> str:
    """The affiliation class of an image name: its base name up to the first ``_`` (``airport_12.jpg`` -> ``airport``).

    A name without ``_`` is a class of its own, keyed by the whole name (so two captions of one image share it).
    """
    base = PurePosixPath(str(name).replace("\\", "/")).name
    head, sep, _ = base.partition("_")
    return head if sep else "\0" + base  # the prefix keeps a bare name from colliding with a class called the same


def affiliation_labels(names: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Class ids [N] int64, numbered in order of first appearance within ``names`` (one local batch)."""
    ids: dict[str, int] = {}
    out = [ids.setdefault(class_of(n), len(ids)) for n in names]
    return torch.tensor(out, dtype=torch.long, device=device)


def class_centres(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, E] features -> [N, E]: row i is the mean of the rows of i's class (not re-normalised)."""
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(feats.dtype)  # [N, N] M[i, j]
    return (same @ feats) / same.sum(dim=1, keepdim=True)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (sizes may differ per process); backward sums the gradient of every process's copy of
    the loss and returns this process's slice, so DDP's gradient averaging yields exactly the single-process gradient
    of the global-batch loss. Built on all_gather + all_reduce, which every backend (gloo included) supports."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes_t = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes_t, n)
        sizes = [int(s.item()) for s in sizes_t]
        m = max(sizes)
        padded = x.new_zeros((m, *x.shape[1:]))
        padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(bufs, padded.contiguous())
        ctx.rank, ctx.sizes = rank, sizes
        return torch.cat([b[:s] for b, s in zip(bufs, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process in rank order, with gradients; identity without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class ClipAffLoss(nn.Module):
    """Contrastive + affiliation loss of PriorCLIP; returns a dict of the terms (sum them for the total)."""

    def __init__(self, affiliation: bool = True) -> None:
        super().__init__()
        self.affiliation = affiliation

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            image, text: L2-normalised local features [N, E].
            logit_scale: the scale s = exp(logit_scale parameter), a scalar.
            labels: [N] class ids of the local batch (needed when ``affiliation``).
        """
        with torch.autocast(image.device.type, enabled=False):
            image, text, scale = image.float(), text.float(), logit_scale.float()
            all_image, all_text = gather_features(image), gather_features(text)
            target = torch.arange(all_image.shape[0], device=image.device)
            logits = scale * all_image @ all_text.T  # [N_all, N_all]
            out = {"contrastive": 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))}
            if self.affiliation:
                if labels is None:
                    raise ValueError("the affiliation loss needs class labels")
                labels = labels.to(image.device)
                image_c = gather_features(class_centres(image, labels))  # [N_all, E]
                text_c = gather_features(class_centres(text, labels))
                out["affiliation"] = 0.5 * (
                    F.cross_entropy(scale * all_image @ text_c.T, target)
                    + F.cross_entropy(scale * all_text @ image_c.T, target)
                )
        return out


class PIRLoss(nn.Module):
    """PIR-pytorch's contrastive + ``center_factor`` x affiliation loss (spec §4B); returns a dict of the terms
    ("contrastive", and "affiliation" already weighted), so their sum is the total, as with :class:`ClipAffLoss`.

    Features, centres and image ids are all-gathered with :func:`gather_features`: every process computes the whole
    global-batch loss, and gradients follow the gather-with-grad convention documented there.
    """

    def __init__(self, affiliation: bool = True, center_factor: float = 1.0) -> None:
        super().__init__()
        self.affiliation, self.center_factor = affiliation, float(center_factor)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, temps: torch.Tensor, labels: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            image, text: L2-normalised local features [N, E].
            temps: [temp, temp2], the model's two temperatures (logits are divided by them).
            labels: [N] class ids of the local batch (needed when ``affiliation``); only equality matters.
            image_ids: [N] global image ids (equal ids are positives of each other); None: each sample its own image.
        """
        n = _check_pir_inputs(image, text, temps, labels, image_ids, self.affiliation)
        with torch.autocast(image.device.type, enabled=False):
            image, text, temps = image.float(), text.float(), temps.float()
            temp, temp2 = temps[0], temps[1]
            all_image, all_text = gather_features(image), gather_features(text)
            logits = all_image @ all_text.T / temp  # [N_all, N_all]
            if image_ids is None:
                target: torch.Tensor = torch.arange(all_image.shape[0], device=image.device)
            else:
                all_ids = gather_features(image_ids.to(image.device).reshape(n))  # integer: no gradient to carry
                same = (all_ids.unsqueeze(0) == all_ids.unsqueeze(1)).float()
                target = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
            out = {"contrastive": 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))}
            if self.affiliation:
                labels = labels.to(image.device).reshape(n)
                image_c = gather_features(class_centres(image, labels))  # [N_all, E]
                text_c = gather_features(class_centres(text, labels))
                diag = torch.arange(all_image.shape[0], device=image.device)
                i2tc = all_image @ text_c.T / temp2  # row i: image i against every text centre
                ic2t = image_c @ all_text.T / temp2  # row i: image centre i against every text (= (T Īᵀ)ᵀ)
                out["affiliation"] = self.center_factor * 0.5 * (
                    F.cross_entropy(i2tc, diag) + F.cross_entropy(ic2t, diag)
                )
        return out


def _check_pir_inputs(
    image: torch.Tensor, text: torch.Tensor, temps: torch.Tensor, labels: torch.Tensor | None,
    image_ids: torch.Tensor | None, affiliation: bool,
) -> int:
    """The local batch size N, after checking the shapes :class:`PIRLoss` needs (ValueError otherwise)."""
    if image.dim() != 2 or image.shape != text.shape or image.shape[0] == 0:
        raise ValueError(f"image and text features must both be [N, E] with N >= 1, got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    n = image.shape[0]
    if not torch.is_tensor(temps) or temps.shape != (2,):
        got = f"shape {tuple(temps.shape)}" if torch.is_tensor(temps) else type(temps).__name__
        raise ValueError(f"temps must be a 1-D tensor [temp, temp2], got {got}")
    if affiliation and labels is None:
        raise ValueError("the affiliation loss needs class labels")
    for what, t in (("labels", labels), ("image_ids", image_ids)):
        if t is not None and (t.numel() != n or t.dim() > 1 or t.is_floating_point()):
            raise ValueError(f"{what} must be an integer tensor [N] = [{n}], got {t.dtype} {tuple(t.shape)}")
    return n
