"""The recall check: does an engine retrieve what the fp32 reference retrieves?

Each engine embeds the same evaluation set as the reference (eager PyTorch, fp32, TF32 off) and is compared on:

- R@1/5/10 both ways and mR (spec §6A) and their difference from the reference's;
- per-item cosine between the engine's and the reference's embeddings (min and mean, images and captions apart:
  one cosine over a flattened batch would hide one bad row);
- top-10 agreement: for every query, the share of the reference's top-10 that the engine also ranks top-10.

An engine is marked FAIL when its worst per-item cosine is below its precision's floor or its |ΔmR| is above its
precision's allowance. The allowance is the larger of the precision's base value and the mR change that a few
single-query flips cause on this set (``flips`` x 100 / (6 x N_images), the set's resolution), so that a 32-image
generated set is not judged at a resolution it cannot have. The table (:data:`TOLERANCES`):

========  ===========  ==============  ======  =====================================================================
precision cosine floor base |ΔmR| pp   flips   why
========  ===========  ==============  ======  =====================================================================
fp32      0.9995       0.1             1       same maths in another order; TF32 convolutions (cuDNN's default on
                                               GPU) cost the last digits
fp16      0.999        0.5             2       10-bit mantissa, fp32 accumulation and normalisation
bf16      0.995        0.5             3       7-bit mantissa: about 3 significant digits per activation
int8      0.99         1.0             4       calibrated Q/DQ: the loosest, but still retrieval-preserving
========  ===========  ==============  ======  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from priorclip.data import RetrievalSet
from priorclip.encoder import Encoder, TorchEncoder
from priorclip.retrieval import METRIC_KEYS, iter_image_batches, recall_metrics
from priorclip.tokenizer import get_tokenizer


@dataclass(frozen=True)
class Tolerance:
    cosine_min: float
    dmr_base: float
    flips: int


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(0.9995, 0.1, 1),
    "fp16": Tolerance(0.999, 0.5, 2),
    "bf16": Tolerance(0.995, 0.5, 3),
    "int8": Tolerance(0.99, 1.0, 4),
}


def dmr_allowance(precision: str, n_images: int) -> float:
    tol = TOLERANCES[precision]
    return max(tol.dmr_base, tol.flips * 100.0 / (6 * n_images))


@dataclass
class PreparedSet:
    """A retrieval set already preprocessed: pixels [N_img, 3, S, S] and tokens [N_txt, ctx] on the host."""

    pixels: torch.Tensor
    tokens: torch.Tensor
    caption_image: np.ndarray
    description: dict


def prepare(
    dataset: RetrievalSet, image_size: int, context_length: int, description: dict, workers: int = 4
) -> PreparedSet:
    pixels = torch.cat(list(iter_image_batches(dataset.images, image_size, 256, workers)))
    tokens = get_tokenizer(context_length)(list(dataset.captions))
    desc = {**description, "n_images": len(dataset.images), "n_captions": len(dataset.captions)}
    return PreparedSet(pixels, tokens, dataset.caption_image, desc)


def embed(encoder: Encoder, data: PreparedSet, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings [N, E] float32 on the host, in batches of ``batch``."""
    img = torch.cat(
        [encoder.encode_images(data.pixels[s : s + batch]).float().cpu() for s in range(0, len(data.pixels), batch)]
    )
    txt = torch.cat(
        [encoder.encode_texts(data.tokens[s : s + batch]).float().cpu() for s in range(0, len(data.tokens), batch)]
    )
    return img, txt


def reference_embeddings(
    model, device: str | torch.device, data: PreparedSet, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 eager reference, with TF32 off (the reference numbers are plain fp32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return embed(TorchEncoder(model, device, torch.float32), data, batch)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _topk_sets(q: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, keys.shape[0])
    return (q @ keys.T).topk(k, dim=1).indices  # [Q, k]


def top10_agreement(
    q_ref: torch.Tensor, k_ref: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, k: int = 10
) -> float:
    """Mean over queries of |top-k(reference) ∩ top-k(engine)| / k."""
    a, b = _topk_sets(q_ref, k_ref, k), _topk_sets(q, keys, k)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).float().sum(dim=1)  # [Q]
    return float((hits / a.shape[1]).mean())


def compare(
    name: str,
    precision: str,
    ref: tuple[torch.Tensor, torch.Tensor],
    got: tuple[torch.Tensor, torch.Tensor],
    caption_image: np.ndarray,
    ref_metrics: dict[str, float] | None = None,
) -> dict:
    """The recall-check row of one engine against the reference embeddings."""
    (ri, rt), (gi, gt) = ref, got
    if gi.shape != ri.shape or gt.shape != rt.shape:
        raise ValueError(f"{name}: embeddings {tuple(gi.shape)}/{tuple(gt.shape)} differ in shape from the reference")
    ref_metrics = ref_metrics or recall_metrics(ri, rt, caption_image)
    metrics = recall_metrics(gi, gt, caption_image)
    delta = {k: metrics[k] - ref_metrics[k] for k in METRIC_KEYS}
    cos_i = torch.nn.functional.cosine_similarity(gi, ri, dim=1)
    cos_t = torch.nn.functional.cosine_similarity(gt, rt, dim=1)
    finite = bool(torch.isfinite(gi).all() and torch.isfinite(gt).all())
    row = {
        "engine": name,
        "precision": precision,
        "metrics": metrics,
        "delta": delta,
        "cosine_image_min": float(cos_i.min()),
        "cosine_image_mean": float(cos_i.mean()),
        "cosine_text_min": float(cos_t.min()),
        "cosine_text_mean": float(cos_t.mean()),
        "top10_agreement_i2t": top10_agreement(ri, rt, gi, gt),
        "top10_agreement_t2i": top10_agreement(rt, ri, gt, gi),
        "finite": finite,
    }
    return judge(row, len(ri))


def judge(row: dict, n_images: int) -> dict:
    """Add ``tolerance``, ``failures`` and ``within_tolerance`` to a comparison row."""
    prec = row["precision"]
    tol = TOLERANCES.get(prec, TOLERANCES["int8"])
    allow = dmr_allowance(prec if prec in TOLERANCES else "int8", n_images)
    failures = []
    if not row["finite"]:
        failures.append("non-finite embeddings")
    cos_min = min(row["cosine_image_min"], row["cosine_text_min"])
    if not cos_min >= tol.cosine_min:  # also catches NaN
        failures.append(f"min cosine {cos_min:.6f} < {tol.cosine_min}")
    dmr = row["delta"]["mR"]
    if not abs(dmr) <= allow:
        failures.append(f"|ΔmR| {abs(dmr):.3f} > {allow:.3f}")
    row["tolerance"] = {"cosine_min": tol.cosine_min, "dmr_max": allow}
    row["failures"] = failures
    row["within_tolerance"] = not failures
    return row


def recall_table(reference: dict[str, float], rows: Sequence[dict]) -> str:
    """Markdown: the reference's metrics, each engine's with Δ, cosines, top-10 agreement and a verdict."""
    keys = METRIC_KEYS
    head = (
        "| engine | "
        + " | ".join(keys)
        + " | ΔmR | cos min (img/txt) | cos mean (img/txt) | top-10 agr. (i2t/t2i) | verdict |\n"
    )
    head += "|---|" + "---:|" * len(keys) + "---:|---:|---:|---:|---|\n"
    lines = [
        "| reference torch/fp32 | " + " | ".join(f"{reference[k]:.2f}" for k in keys) + " | — | — | — | — | reference |"
    ]
    for r in rows:
        verdict = "ok" if r["within_tolerance"] else "**FAIL**: " + "; ".join(r["failures"])
        lines.append(
            f"| {r['engine']} | "
            + " | ".join(f"{r['metrics'][k]:.2f}" for k in keys)
            + f" | {r['delta']['mR']:+.2f} | {r['cosine_image_min']:.6f} / {r['cosine_text_min']:.6f}"
            + f" | {r['cosine_image_mean']:.6f} / {r['cosine_text_mean']:.6f}"
            + f" | {r['top10_agreement_i2t']:.3f} / {r['top10_agreement_t2i']:.3f} | {verdict} |"
        )
    return head + "\n".join(lines) + "\n"
