"""Does an engine rank like the fp32 reference? The one comparator and tolerance table that the exporter's parity
report and the benchmark's recall check both use.

Compared on the same retrieval set: per-item cosine of the embeddings (min and mean, images and captions apart — one
cosine over a flattened batch would hide a bad row), max abs difference, top-10 agreement of the rankings both ways,
and R@1/5/10 / mR of both sides with their difference.

Tolerances per precision (the export issue's targets; bf16 is looser by its 8-bit mantissa):

=========  ===========  ===========  =====
precision  cosine min   |ΔmR| (pp)   flips
=========  ===========  ===========  =====
fp32       0.9999       0.05         1
fp16       0.999        0.1          2
bf16       0.995        0.5          3
int8       0.99         0.5          4
=========  ===========  ===========  =====

The |ΔmR| allowance is never finer than ``flips`` single-query rank changes on the set (each worth
100 / (6 · N_images) points), so a 32-image smoke set is not judged at a resolution it cannot have; on a 1,000-image
set the table's value applies. With random weights recall sits at chance and nearly every score is a near-tie, and
the gate's rank weights jump when two beliefs swap, so the per-item cosine minimum is the meaningful check there.
"""

from __future__ import annotations

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
    "fp32": Tolerance(0.9999, 0.05, 1),
    "fp16": Tolerance(0.999, 0.1, 2),
    "bf16": Tolerance(0.995, 0.5, 3),
    "int8": Tolerance(0.99, 0.5, 4),
}


def dmr_allowance(precision: str, n_images: int) -> float:
    tol = TOLERANCES[precision]
    return max(tol.max_abs_delta_mR, tol.flips * 100.0 / (6 * max(n_images, 1)))


def embedding_agreement(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """Per-row cosine (min, 1st percentile, mean, rows below each precision's floor) and max abs difference."""
    ref, out = torch.as_tensor(ref).double(), torch.as_tensor(out).double()
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
    floors = sorted({t.min_cosine for t in TOLERANCES.values()}, reverse=True)
    return {
        "cosine_min": float(cos.min()),
        "cosine_p01": float(torch.quantile(cos, 0.01)),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float((ref - out).abs().max()),
        "n_below": {str(t): int((cos < t).sum()) for t in floors},
        "n": int(cos.numel()),
    }


def topk_agreement(ref_scores: torch.Tensor, out_scores: torch.Tensor, k: int = 10) -> float:
    """Mean |top-k(ref) ∩ top-k(out)| / k over the rows (queries) of two [Q, N] score matrices."""
    k = min(k, ref_scores.shape[1])
    a = ref_scores.topk(k, dim=1).indices
    b = out_scores.topk(k, dim=1).indices
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)  # [Q]
    return float(hits.double().mean() / k)


def compare_embeddings(ref_img, ref_txt, img, txt, caption_image: np.ndarray, ref_metrics: dict | None = None) -> dict:
    """Compare an engine's image/text embeddings [N, E] with the reference's on one retrieval set."""
    ref_img, ref_txt, img, txt = (torch.as_tensor(t).float().cpu() for t in (ref_img, ref_txt, img, txt))
    if img.shape != ref_img.shape or txt.shape != ref_txt.shape:
        raise ValueError(
            f"embeddings {tuple(img.shape)}/{tuple(txt.shape)} differ in shape from the reference "
            f"{tuple(ref_img.shape)}/{tuple(ref_txt.shape)}"
        )
    rec_ref = ref_metrics or recall_metrics(ref_img, ref_txt, caption_image)
    rec_out = recall_metrics(img, txt, caption_image)
    return {
        "image": embedding_agreement(ref_img, img),
        "text": embedding_agreement(ref_txt, txt),
        "top10_agreement": {
            "i2t": topk_agreement(ref_img @ ref_txt.T, img @ txt.T),
            "t2i": topk_agreement(ref_txt @ ref_img.T, txt @ img.T),
        },
        "recall_reference": rec_ref,
        "recall_engine": rec_out,
        "recall_delta": {k: rec_out[k] - rec_ref[k] for k in METRIC_KEYS},
        "finite": bool(torch.isfinite(img).all() and torch.isfinite(txt).all()),
        "n_images": int(img.shape[0]),
    }


def check(comparison: dict, precision: str) -> list[str]:
    """Failures of a :func:`compare_embeddings` result against its precision's tolerance (empty: within)."""
    tol = TOLERANCES[precision]
    fails = [] if comparison["finite"] else ["non-finite embeddings"]
    for tower in ("image", "text"):
        c = comparison[tower]["cosine_min"]
        if not c >= tol.min_cosine:  # also catches NaN
            fails.append(f"{tower} cosine min {c:.6f} < {tol.min_cosine}")
    d, allow = comparison["recall_delta"]["mR"], dmr_allowance(precision, comparison["n_images"])
    if not abs(d) <= allow:
        fails.append(f"|ΔmR| {abs(d):.3f} > {allow:.3f}")
    return fails
