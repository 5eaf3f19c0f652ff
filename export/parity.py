"""Parity of an exported engine with the fp32 reference: per-item cosine, max abs difference, top-10 agreement of
the retrieval ranking, and R@1/5/10 / mR of both with their difference.

Tolerances are one table, :data:`TOLERANCES`, per precision (the issue's targets): fp16 cosine >= 0.999 and
|delta mR| <= 0.1 point; int8 cosine >= 0.99 and |delta mR| <= 0.5 point; fp32 cosine >= 0.99999 and |delta mR| <=
0.05 (one or two swapped near-ties on a 1,000-caption set; ONNX Runtime and eager torch sum in different orders).

With random weights recall is near chance and nearly every score is a near-tie, so delta mR is then noise-dominated;
the per-item cosine is the meaningful check until a trained checkpoint exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from priorclip.data import RetrievalSet
from priorclip.encoder import Encoder
from priorclip.retrieval import METRIC_KEYS, embed_images, embed_texts, recall_metrics


@dataclass(frozen=True)
class Tolerance:
    min_cosine: float  # per item, images and captions alike
    max_abs_delta_mR: float  # percentage points


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.99999, max_abs_delta_mR=0.05),
    "fp16": Tolerance(min_cosine=0.999, max_abs_delta_mR=0.1),
    "int8": Tolerance(min_cosine=0.99, max_abs_delta_mR=0.5),
}


def embedding_agreement(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Per-row cosine (min, mean) and the max abs difference of two [N, E] embedding sets."""
    ref, out = ref.double(), out.double()
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "cosine_p01": float(torch.quantile(cos, 0.01)), "max_abs_diff": float((ref - out).abs().max()),
            "n_below": {str(t): int((cos < t).sum()) for t in (0.99999, 0.999, 0.99)}, "n": int(cos.numel())}


def topk_agreement(ref_scores: torch.Tensor, out_scores: torch.Tensor, k: int = 10) -> float:
    """Mean |top-k(ref) ∩ top-k(out)| / k over the rows of two [Q, N] score matrices."""
    k = min(k, ref_scores.shape[1])
    a = ref_scores.topk(k, dim=1).indices
    b = out_scores.topk(k, dim=1).indices
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)  # [Q]
    return float(hits.double().mean() / k)


def compare_embeddings(ref_img, ref_txt, img, txt, caption_image) -> dict:
    ref_img, ref_txt, img, txt = (torch.as_tensor(t).float() for t in (ref_img, ref_txt, img, txt))
    rec_ref = recall_metrics(ref_img, ref_txt, caption_image)
    rec_out = recall_metrics(img, txt, caption_image)
    return {
        "image": embedding_agreement(ref_img, img),
        "text": embedding_agreement(ref_txt, txt),
        "top10_agreement": {"i2t": topk_agreement(ref_img @ ref_txt.T, img @ txt.T),
                            "t2i": topk_agreement(ref_txt @ ref_img.T, txt @ img.T)},
        "recall_reference": rec_ref,
        "recall_engine": rec_out,
        "recall_delta": {k: rec_out[k] - rec_ref[k] for k in METRIC_KEYS},
    }


def check(report: dict, precision: str) -> list[str]:
    """Failures of ``report`` against its precision's tolerance (empty list: within tolerance)."""
    tol = TOLERANCES[precision]
    fails = []
    for tower in ("image", "text"):
        c = report[tower]["cosine_min"]
        if not c >= tol.min_cosine:
            fails.append(f"{tower} cosine min {c:.6f} < {tol.min_cosine}")
    d = report["recall_delta"]["mR"]
    if not abs(d) <= tol.max_abs_delta_mR:
        fails.append(f"|delta mR| {abs(d):.3f} > {tol.max_abs_delta_mR}")
    return fails


def parity_report(engine: Encoder, reference: Encoder, dataset: RetrievalSet, precision: str,
                  batch_size: int = 32, progress: bool = False, reference_embeddings=None) -> dict:
    """Embed ``dataset`` with both encoders (the same preprocessing) and compare; adds tolerance and pass/fail."""
    if reference_embeddings is None:
        reference_embeddings = reference_embed(reference, dataset, batch_size, progress)
    ref_img, ref_txt = reference_embeddings
    img = embed_images(engine, dataset.images, batch_size, progress)
    txt = embed_texts(engine, dataset.captions, batch_size, progress)
    report = compare_embeddings(ref_img, ref_txt, img, txt, dataset.caption_image)
    fails = check(report, precision)
    report.update({
        "engine": getattr(engine, "name", type(engine).__name__),
        "precision": precision,
        "n_images": len(dataset.images),
        "n_captions": len(dataset.captions),
        "batch_size": batch_size,
        "tolerance": asdict(TOLERANCES[precision]),
        "passed": not fails,
        "failures": fails,
    })
    return report


def reference_embed(reference: Encoder, dataset: RetrievalSet, batch_size: int = 32, progress: bool = False):
    return (embed_images(reference, dataset.images, batch_size, progress),
            embed_texts(reference, dataset.captions, batch_size, progress))


def format_parity_table(reports: dict[str, dict]) -> str:
    """Markdown table, one row per named parity report."""
    cols = ["img cos min", "img cos p1", "img cos mean", "img < tol", "txt cos min", "txt cos mean", "max |Δ|",
            "top10 i2t", "top10 t2i",
            "mR ref", "mR engine", "ΔmR", "ΔR@1 i2t", "ΔR@1 t2i", "pass"]
    lines = ["| export | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in reports.items():
        d = r["recall_delta"]
        tol = str(r.get("tolerance", {}).get("min_cosine", ""))
        below = r["image"].get("n_below", {}).get(tol)
        vals = [f"{r['image']['cosine_min']:.6f}", f"{r['image'].get('cosine_p01', float('nan')):.6f}",
                f"{r['image']['cosine_mean']:.6f}", "-" if below is None else f"{below}/{r['image'].get('n', '?')}",
                f"{r['text']['cosine_min']:.6f}", f"{r['text']['cosine_mean']:.6f}",
                f"{max(r['image']['max_abs_diff'], r['text']['max_abs_diff']):.2e}",
                f"{r['top10_agreement']['i2t']:.3f}", f"{r['top10_agreement']['t2i']:.3f}",
                f"{r['recall_reference']['mR']:.2f}", f"{r['recall_engine']['mR']:.2f}", f"{d['mR']:+.3f}",
                f"{d['i2t_R@1']:+.2f}", f"{d['t2i_R@1']:+.2f}", "yes" if r.get("passed") else "NO"]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def format_recall_table(reports: dict[str, dict], keys: Sequence[str] = METRIC_KEYS) -> str:
    lines = ["| export | side | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for name, r in reports.items():
        for side, m in (("reference", r["recall_reference"]), ("engine", r["recall_engine"]),
                        ("delta", r["recall_delta"])):
            fmt = "{:+.2f}" if side == "delta" else "{:.2f}"
            lines.append(f"| {name} | {side} | " + " | ".join(fmt.format(m[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"
