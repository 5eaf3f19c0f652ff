"""Does an engine rank like the fp32 reference? The one comparator and tolerance table that the exporter's parity
report and the benchmark's recall check both use.

Compared on the same retrieval set: per-item cosine of the embeddings (min and mean, images and captions apart — one
cosine over a flattened batch would hide a bad row), max abs difference, top-10 agreement of the rankings both ways,
R@1/5/10 / mR of both sides with their difference, and — where the engine exposes it — the **belief rank-flip
rate**: the share of images whose 50-token belief order differs from the reference's. The gate's rank weights are a
step function of that order, so a flip moves an embedding by far more than rounding does; it is what explains an
fp16/int8 image whose cosine falls below the floor, and the report says how many of those flipped.

Tolerances per precision (the export issue's targets; bf16 is looser by its 8-bit mantissa; fp8, the fused engine's
e4m3 GEMMs, is held to int8's, the other 8-bit format):

=========  ===========  ===========  =====  ==================
precision  cosine min   |ΔmR| (pp)   flips  ΔmR judged from
=========  ===========  ===========  =====  ==================
fp32       0.99999      0.05         1      334 images
fp16       0.999        0.1          2      334 images
bf16       0.995        0.5          3      100 images
int8       0.99         0.5          4      134 images
fp8        0.99         0.5          4      134 images
=========  ===========  ===========  =====  ==================

The |ΔmR| tolerance never widens. One image→text query changing its rank moves mR by 100 / (6 · N_images) points,
so on a set where ``flips`` such changes already exceed the tolerance, ΔmR cannot tell a faithful engine from a
broken one: the report then says "too few items for a ΔmR verdict" and the verdict rests on the per-item checks
(cosine floor, finite values) alone. From :func:`min_images_for_dmr` images on, the table's value applies as written.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from priorclip.retrieval import METRIC_KEYS, recall_metrics


@dataclass(frozen=True)
class Tolerance:
    min_cosine: float  # per item, images and captions alike
    max_abs_delta_mR: float  # percentage points, on a large set
    flips: int = 0  # single-query rank changes always allowed, whatever the set size


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(0.99999, 0.05, 1),
    "fp16": Tolerance(0.999, 0.1, 2),
    "bf16": Tolerance(0.995, 0.5, 3),
    "int8": Tolerance(0.99, 0.5, 4),
    "fp8": Tolerance(0.99, 0.5, 4),
}


# The note verdict() writes when ΔmR is not judged; reports (priorclip-bench) quote it.
DMR_NOT_JUDGED = "too few items for a ΔmR verdict"


def min_images_for_dmr(precision: str) -> int:
    """Smallest set on which ``flips`` single-query rank changes stay within the ΔmR tolerance."""
    tol = TOLERANCES[precision]
    if tol.max_abs_delta_mR <= 0:  # no change allowed: no finite set can judge it
        return sys.maxsize
    return math.ceil(tol.flips * 100.0 / (6 * tol.max_abs_delta_mR) - 1e-9)


# The fewest images on which every precision's ΔmR is judged (334): the default parity/recall set where the whole
# split would cost minutes (CPU).
JUDGED_SET_IMAGES = max(min_images_for_dmr(p) for p in TOLERANCES)


def dmr_judged(precision: str, n_images: int) -> bool:
    return n_images >= min_images_for_dmr(precision)


def tolerance_record(precision: str, n_images: int) -> dict:
    """The tolerance applied to a set of ``n_images``, as reports record it."""
    tol = TOLERANCES[precision]
    judged = dmr_judged(precision, n_images)
    return {"precision": precision, "cosine_min": tol.min_cosine,
            "dmr_max": tol.max_abs_delta_mR if judged else None, "dmr_judged": judged,
            "dmr_min_images": min_images_for_dmr(precision)}


def embedding_agreement(ref: torch.Tensor, out: torch.Tensor, flipped: torch.Tensor | None = None) -> dict:
    """Per-row cosine (min, 1st percentile, mean, rows below each precision's floor) and max abs difference.

    ``flipped`` [N] bool (belief order differs from the reference's) adds, per floor, how many rows below it flipped.
    """
    ref, out = torch.as_tensor(ref).double(), torch.as_tensor(out).double()
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
    floors = sorted({t.min_cosine for t in TOLERANCES.values()}, reverse=True)
    res = {
        "cosine_min": float(cos.min()),
        "cosine_p01": float(torch.quantile(cos, 0.01)),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float((ref - out).abs().max()),
        "n_below": {str(t): int((cos < t).sum()) for t in floors},
        "n": int(cos.numel()),
    }
    if flipped is not None:
        res["n_below_flipped"] = {str(t): int(((cos < t) & flipped).sum()) for t in floors}
        res["cosine_min_unflipped"] = float(cos[~flipped].min()) if bool((~flipped).any()) else None
    return res


def rank_flips(ref_order, order) -> dict | None:
    """Images whose belief order [N, T] differs from the reference's: count, rate and the flag per image."""
    if ref_order is None or order is None:
        return None
    ref_order, order = torch.as_tensor(ref_order).long().cpu(), torch.as_tensor(order).long().cpu()
    if ref_order.shape != order.shape:
        raise ValueError(f"belief orders {tuple(order.shape)} differ in shape from the reference {tuple(ref_order.shape)}")
    flipped = (ref_order != order).any(dim=1)
    first = torch.where(flipped, (ref_order != order).int().argmax(dim=1), torch.full_like(flipped, -1, dtype=torch.long))
    return {"n": int(flipped.numel()), "flipped": int(flipped.sum()), "rate": float(flipped.double().mean()),
            "top1_flipped": int((ref_order[:, 0] != order[:, 0]).sum()),
            "first_slot_min": int(first[flipped].min()) if bool(flipped.any()) else None,
            "mask": flipped}


def topk_agreement(ref_scores: torch.Tensor, out_scores: torch.Tensor, k: int = 10) -> float:
    """Mean |top-k(ref) ∩ top-k(out)| / k over the rows (queries) of two [Q, N] score matrices."""
    k = min(k, ref_scores.shape[1])
    a = ref_scores.topk(k, dim=1).indices
    b = out_scores.topk(k, dim=1).indices
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)  # [Q]
    return float(hits.double().mean() / k)


def compare_embeddings(ref_img, ref_txt, img, txt, caption_image: np.ndarray, ref_metrics: dict | None = None,
                       ref_order=None, order=None) -> dict:
    """Compare an engine's image/text embeddings [N, E] with the reference's on one retrieval set.

    ``ref_order`` / ``order``: belief orders [N_img, T] of the reference and the engine (None where an engine or
    the model has none); the result's ``belief_order`` then holds the rank-flip rate.
    """
    ref_img, ref_txt, img, txt = (torch.as_tensor(t).float().cpu() for t in (ref_img, ref_txt, img, txt))
    if img.shape != ref_img.shape or txt.shape != ref_txt.shape:
        raise ValueError(
            f"embeddings {tuple(img.shape)}/{tuple(txt.shape)} differ in shape from the reference "
            f"{tuple(ref_img.shape)}/{tuple(ref_txt.shape)}"
        )
    flips = rank_flips(ref_order, order)
    mask = flips.pop("mask") if flips else None
    rec_ref = ref_metrics or recall_metrics(ref_img, ref_txt, caption_image)
    rec_out = recall_metrics(img, txt, caption_image)
    return {
        "image": embedding_agreement(ref_img, img, mask),
        "text": embedding_agreement(ref_txt, txt),
        "belief_order": flips,
        "top10_agreement": {
            "i2t": topk_agreement(ref_img @ ref_txt.T, img @ txt.T),
            "t2i": topk_agreement(ref_txt @ ref_img.T, txt @ img.T),
        },
        "recall_reference": rec_ref,
        "recall_engine": rec_out,
        "recall_delta": {k: rec_out[k] - rec_ref[k] for k in METRIC_KEYS},
        "finite": bool(torch.isfinite(img).all() and torch.isfinite(txt).all()),
        "n_images": int(img.shape[0]),
        "n_captions": int(txt.shape[0]),
    }


def verdict(comparison: dict, precision: str) -> dict:
    """Judge a :func:`compare_embeddings` result against its precision's tolerance.

    Returns ``{"passed", "failures", "notes", "tolerance"}``; ``notes`` says when ΔmR was not judged (too few images)
    and how many below-floor images had a flipped belief order.
    """
    tol = TOLERANCES[precision]
    n = comparison["n_images"]
    record = tolerance_record(precision, n)
    fails = [] if comparison["finite"] else ["non-finite embeddings"]
    notes = []
    for tower in ("image", "text"):
        c = comparison[tower]["cosine_min"]
        if not c >= tol.min_cosine:  # also catches NaN
            below = comparison[tower]["n_below"].get(str(tol.min_cosine))
            msg = f"{tower} cosine min {c:.6f} < {tol.min_cosine}" + (f" ({below}/{comparison[tower]['n']} items)"
                                                                      if below is not None else "")
            flipped = comparison[tower].get("n_below_flipped", {}).get(str(tol.min_cosine))
            if flipped is not None:
                msg += f", {flipped} of them with a flipped belief order"
            fails.append(msg)
    d = comparison["recall_delta"]["mR"]
    if record["dmr_judged"]:
        if not abs(d) <= tol.max_abs_delta_mR:
            fails.append(f"|ΔmR| {abs(d):.3f} > {tol.max_abs_delta_mR}")
    else:
        notes.append(f"{DMR_NOT_JUDGED} ({n} images < {record['dmr_min_images']}: "
                     f"{tol.flips} single-query flip(s) already exceed {tol.max_abs_delta_mR} pp); "
                     "judged on the per-item checks")
    flips = comparison.get("belief_order")
    if flips:
        notes.append(f"belief order flipped on {flips['flipped']}/{flips['n']} images ({100 * flips['rate']:.1f} %)")
    return {"passed": not fails, "failures": fails, "notes": notes, "tolerance": record}
