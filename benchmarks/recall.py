"""The recall check: does an engine retrieve what the fp32 reference retrieves?

Each engine embeds the same evaluation set as the reference (eager PyTorch, fp32, TF32 off) and is compared on:

- R@1/5/10 both ways and mR (spec §6A) and their difference from the reference's;
- per-item cosine between the engine's and the reference's embeddings (min and mean, images and captions apart:
  one cosine over a flattened batch would hide one bad row);
- the belief rank-flip rate: images whose 50-token belief order differs from the reference's (the gate is a step
  function of that order, so it explains every fp16/int8 outlier); "n/a" where an engine does not expose the order;
- top-10 agreement: for every query, the share of the reference's top-10 that the engine also ranks top-10.

An engine is marked FAIL when it is outside its precision's tolerance: the comparison, the table and the verdict are
:mod:`priorclip.parity`'s, the same that ``priorclip-export`` enforces. ΔmR is not judged on a set smaller than
:func:`priorclip.parity.min_images_for_dmr` ("too few items for a ΔmR verdict"); the verdict then rests on the
per-item checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from priorclip.data import RetrievalSet
from priorclip.encoder import Encoder, TorchEncoder, encode_images_with_order
from priorclip.parity import (
    DMR_NOT_JUDGED,
    TOLERANCES,
    compare_embeddings,
    min_images_for_dmr,
    tolerance_record,
    verdict,
)
from priorclip.numerics import fp32_matmuls
from priorclip.preprocess import preprocess_for
from priorclip.retrieval import METRIC_KEYS, iter_image_batches


@dataclass
class PreparedSet:
    """A retrieval set already preprocessed: pixels [N_img, 3, S, S] and tokens [N_txt, ctx] on the host.

    ``text_batches``: for a model that attends to padding (PIR), the caption batches exactly as its tokenizer made
    them (chunks of 128, each padded to its longest caption), the only way its texts are embedded; ``tokens`` then
    holds the same rows padded to the context (for drawing timed captions). None: any row slice of ``tokens``."""

    pixels: torch.Tensor
    tokens: torch.Tensor
    caption_image: np.ndarray
    description: dict  # name, path, split, generated + RetrievalSet.describe() (size and class coverage)
    dataset: RetrievalSet | None = None  # the set itself: exporting engines get it as their parity set
    text_batches: list[torch.Tensor] | None = None

    def token_batches(self, batch: int) -> list[torch.Tensor]:
        """The caption batches an encoder embeds, in caption order."""
        if self.text_batches is not None:
            return self.text_batches
        return [self.tokens[s : s + batch] for s in range(0, len(self.tokens), batch)]


def prepare(dataset: RetrievalSet, config, description: dict, workers: int = 4) -> PreparedSet:
    """Pixels and token ids of ``dataset`` through ``config``'s preprocessing (:func:`preprocess_for`: its image
    transform, tokenizer and caption batching)."""
    pre = preprocess_for(config)
    ctx = config.text.context_length
    pixels = torch.cat(list(iter_image_batches(dataset.images, pre.transform, 256, workers)))
    chunks = list(pre.text_batches(list(dataset.captions), len(dataset.captions) or 1))
    tokens = torch.cat([torch.nn.functional.pad(c, (0, ctx - c.shape[1])) for c in chunks]) if chunks else \
        torch.zeros(0, ctx, dtype=torch.long)
    desc = {**description, **dataset.describe()}
    return PreparedSet(pixels, tokens, dataset.caption_image, desc, dataset,
                       text_batches=chunks if pre.text_chunk else None)


def embed(encoder: Encoder, data: PreparedSet, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Image and text embeddings [N, E] float32 on the host, and belief orders [N, T] (None where the encoder does
    not expose them), in batches of ``batch``."""
    imgs, orders = [], []
    for s in range(0, len(data.pixels), batch):
        emb, order = encode_images_with_order(encoder, data.pixels[s : s + batch])
        imgs.append(emb.float().cpu())
        orders.append(None if order is None else order.long().cpu())
    txt = torch.cat([encoder.encode_texts(t).float().cpu() for t in data.token_batches(batch)])
    order = torch.cat(orders) if orders and all(o is not None for o in orders) else None
    return torch.cat(imgs), txt, order


def reference_embeddings(
    model, device: str | torch.device, data: PreparedSet, batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fp32 eager reference (image, text, belief order), with TF32 off (the reference numbers are plain fp32)."""
    with fp32_matmuls():
        return embed(TorchEncoder(model, device, torch.float32), data, batch)


def _row(name: str, precision: str, c: dict, v: dict, source: str) -> dict:
    flips = c.get("belief_order")
    return {
        "engine": name,
        "precision": precision,
        "source": source,
        "n_images": c["n_images"],
        "n_captions": c["n_captions"],
        "metrics": c["recall_engine"],
        "delta": c["recall_delta"],
        "cosine_image_min": c["image"]["cosine_min"],
        "cosine_image_mean": c["image"]["cosine_mean"],
        "cosine_text_min": c["text"]["cosine_min"],
        "cosine_text_mean": c["text"]["cosine_mean"],
        "top10_agreement_i2t": c["top10_agreement"]["i2t"],
        "top10_agreement_t2i": c["top10_agreement"]["t2i"],
        "rank_flips": None
        if not flips
        else {k: flips[k] for k in ("n", "flipped", "rate", "top1_flipped", "first_slot_min") if k in flips},
        "finite": c["finite"],
        "tolerance": v["tolerance"],
        "dmr_judged": v["tolerance"]["dmr_judged"],
        "failures": list(v["failures"]),
        "notes": list(v["notes"]),
        "within_tolerance": bool(v["passed"]),
    }


def compare(
    name: str,
    precision: str,
    ref: Sequence,
    got: Sequence,
    caption_image: np.ndarray,
    ref_metrics: dict[str, float] | None = None,
) -> dict:
    """The recall-check row of one engine against the reference embeddings (flat keys for the report schema).

    ``ref`` / ``got``: (image, text) or (image, text, belief order or None)."""
    ref_img, ref_txt, ref_order = (tuple(ref) + (None,))[:3]
    img, txt, order = (tuple(got) + (None,))[:3]
    try:
        c = compare_embeddings(ref_img, ref_txt, img, txt, caption_image, ref_metrics, ref_order, order)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return _row(name, precision, c, verdict(c, precision), "benchmark")


def row_from_export_parity(name: str, precision: str, report: dict) -> dict:
    """The recall-check row from an export's own parity report on the same set (no second embedding pass)."""
    v = {k: report[k] for k in ("tolerance", "failures", "notes")}
    v["passed"] = report["passed"]
    return _row(name, precision, report, v, "export parity (same set and reference)")


def same_set(report: dict, data: PreparedSet) -> bool:
    """Whether an export parity report was computed on exactly this recall set."""
    if data.dataset is None or not isinstance(report, dict):
        return False
    return report.get("dataset") == data.dataset.describe()  # describe() holds n_images and n_captions too


def fmt_flips(f: dict | None) -> str:
    return "n/a" if not f else f"{f['flipped']}/{f['n']} ({100 * f['rate']:.1f} %)"


def fmt_dmr(r: dict) -> str:
    """ΔmR of a recall row (``delta.mR``) or a summary row (``dmr``), in parentheses when the set is too small for
    it to be judged."""
    d = f"{r['dmr'] if 'dmr' in r else r['delta']['mR']:+.2f}"
    return d if r.get("dmr_judged", True) else f"({d})"


def dmr_note(precisions: Sequence[str], n_images: int) -> str | None:
    """The report line for precisions whose ΔmR is not judged on ``n_images`` images, or None."""
    short = [p for p in dict.fromkeys(precisions) if p in TOLERANCES and n_images < min_images_for_dmr(p)]
    if not short:
        return None
    need = ", ".join(f"{p} {min_images_for_dmr(p)}" for p in short)
    return (
        f"ΔmR in parentheses: {DMR_NOT_JUDGED} on {n_images} images (needed: {need}); "
        "those verdicts rest on the per-item checks (cosine floor, finite values)."
    )


def recall_table(reference: dict[str, float], rows: Sequence[dict], labels: dict[str, str] | None = None) -> str:
    """Markdown: the reference's metrics, each engine's with Δ, cosines, rank flips, top-10 agreement and a verdict."""
    keys = METRIC_KEYS
    labels = labels or {}
    head = (
        "| engine | "
        + " | ".join(keys)
        + " | ΔmR | cos min (img/txt) | cos mean (img/txt) | rank flips | top-10 agr. (i2t/t2i) | verdict |\n"
    )
    head += "|---|" + "---:|" * len(keys) + "---:|---:|---:|---:|---:|---|\n"
    lines = [
        "| reference torch/fp32 | "
        + " | ".join(f"{reference[k]:.2f}" for k in keys)
        + " | — | — | — | — | — | reference |"
    ]
    for r in rows:
        verdict_cell = "PASS" if r["within_tolerance"] else "**FAIL**: " + "; ".join(r["failures"])
        lines.append(
            f"| {labels.get(r['engine'], r['engine'])} | "
            + " | ".join(f"{r['metrics'][k]:.2f}" for k in keys)
            + f" | {fmt_dmr(r)} | {r['cosine_image_min']:.6f} / {r['cosine_text_min']:.6f}"
            + f" | {r['cosine_image_mean']:.6f} / {r['cosine_text_mean']:.6f}"
            + f" | {fmt_flips(r.get('rank_flips'))}"
            + f" | {r['top10_agreement_i2t']:.3f} / {r['top10_agreement_t2i']:.3f} | {verdict_cell} |"
        )
    return head + "\n".join(lines) + "\n"


def tolerances_for(n_images: int) -> dict[str, dict]:
    """Every precision's tolerance record on a set of ``n_images`` (what the report's JSON keeps)."""
    return {p: tolerance_record(p, n_images) for p in TOLERANCES}
