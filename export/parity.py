"""Parity of an exported engine with the fp32 reference: per-item cosine, max abs difference, belief rank-flip rate,
top-10 agreement of the retrieval ranking, and R@1/5/10 / mR of both with their difference.

The comparison and the tolerance table are :mod:`priorclip.parity`'s, shared with ``priorclip-bench``'s recall
check; this module adds the export-side report (engine, set size and class coverage, pass/fail) and its Markdown
tables.
"""

from __future__ import annotations

from typing import Sequence

from priorclip.data import RetrievalSet
from priorclip.encoder import Encoder
from priorclip.parity import TOLERANCES, Tolerance, compare_embeddings, verdict
from priorclip.retrieval import METRIC_KEYS, embed_images_with_orders, embed_texts

__all__ = ["TOLERANCES", "Tolerance", "parity_report", "reference_embed", "format_parity_table", "format_recall_table"]


def parity_report(engine: Encoder, reference: Encoder | None, dataset: RetrievalSet, precision: str,
                  batch_size: int = 32, progress: bool = False, reference_embeddings=None) -> dict:
    """Embed ``dataset`` with both encoders (the same preprocessing) and compare; adds tolerance and pass/fail.

    ``reference_embeddings``: a cached :func:`reference_embed` result (image, text, belief order).
    """
    if reference_embeddings is None:
        reference_embeddings = reference_embed(reference, dataset, batch_size, progress)
    ref_img, ref_txt, ref_order = (tuple(reference_embeddings) + (None,))[:3]
    img, order = embed_images_with_orders(engine, dataset.images, batch_size, progress)
    txt = embed_texts(engine, dataset.captions, batch_size, progress)
    report = compare_embeddings(ref_img, ref_txt, img, txt, dataset.caption_image, ref_order=ref_order, order=order)
    v = verdict(report, precision)
    report.update({
        "engine": getattr(engine, "name", type(engine).__name__),
        "precision": precision,
        "dataset": dataset.describe(),
        "batch_size": batch_size,
        "tolerance": v["tolerance"],
        "passed": v["passed"],
        "failures": v["failures"],
        "notes": v["notes"],
    })
    return report


def reference_embed(reference: Encoder, dataset: RetrievalSet, batch_size: int = 32, progress: bool = False):
    """(image embeddings, text embeddings, belief orders or None) of the fp32 reference."""
    img, order = embed_images_with_orders(reference, dataset.images, batch_size, progress)
    return img, embed_texts(reference, dataset.captions, batch_size, progress), order


def _flips(r: dict) -> str:
    f = r.get("belief_order")
    return "—" if not f else f"{f['flipped']}/{f['n']}"


def format_parity_table(reports: dict[str, dict]) -> str:
    """Markdown table, one row per named parity report."""
    cols = ["img cos min", "img cos p1", "img cos mean", "img < tol", "rank flips", "txt cos min", "txt cos mean",
            "max |Δ|", "top10 i2t", "top10 t2i", "mR ref", "mR engine", "ΔmR", "ΔR@1 i2t", "ΔR@1 t2i", "verdict"]
    lines = ["| export | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in reports.items():
        d = r["recall_delta"]
        tol = r.get("tolerance", {})
        floor = str(tol.get("cosine_min", ""))
        below = r["image"].get("n_below", {}).get(floor)
        below_flipped = r["image"].get("n_below_flipped", {}).get(floor)
        below_s = "-" if below is None else f"{below}/{r['image'].get('n', '?')}"
        if below and below_flipped is not None:
            below_s += f" ({below_flipped} flipped)"
        dmr = f"{d['mR']:+.3f}" + ("" if tol.get("dmr_judged", True) else " (not judged)")
        vals = [f"{r['image']['cosine_min']:.6f}", f"{r['image'].get('cosine_p01', float('nan')):.6f}",
                f"{r['image']['cosine_mean']:.6f}", below_s, _flips(r),
                f"{r['text']['cosine_min']:.6f}", f"{r['text']['cosine_mean']:.6f}",
                f"{max(r['image']['max_abs_diff'], r['text']['max_abs_diff']):.2e}",
                f"{r['top10_agreement']['i2t']:.3f}", f"{r['top10_agreement']['t2i']:.3f}",
                f"{r['recall_reference']['mR']:.2f}", f"{r['recall_engine']['mR']:.2f}", dmr,
                f"{d['i2t_R@1']:+.2f}", f"{d['t2i_R@1']:+.2f}", "PASS" if r.get("passed") else "**FAIL**"]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    notes = [f"- {name}: " + "; ".join(r["failures"] + r.get("notes", []))
             for name, r in reports.items() if r.get("failures") or r.get("notes")]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def format_recall_table(reports: dict[str, dict], keys: Sequence[str] = METRIC_KEYS) -> str:
    lines = ["| export | side | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for name, r in reports.items():
        for side, m in (("reference", r["recall_reference"]), ("engine", r["recall_engine"]),
                        ("delta", r["recall_delta"])):
            fmt = "{:+.2f}" if side == "delta" else "{:.2f}"
            lines.append(f"| {name} | {side} | " + " | ".join(fmt.format(m[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"
