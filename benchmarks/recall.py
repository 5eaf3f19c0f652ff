"""The recall check: does an engine retrieve what the fp32 reference retrieves?

Each engine embeds the same evaluation set as the reference (eager PyTorch, fp32, TF32 off) and is compared on:

- R@1/5/10 both ways and mR (spec §6A) and their difference from the reference's;
- per-item cosine between the engine's and the reference's embeddings (min and mean, images and captions apart:
  one cosine over a flattened batch would hide one bad row);
- top-10 agreement: for every query, the share of the reference's top-10 that the engine also ranks top-10.

An engine is marked FAIL when it is outside its precision's tolerance: the comparison and the table are
:mod:`priorclip.parity`'s, the same that ``priorclip-export`` enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from priorclip.data import RetrievalSet
from priorclip.encoder import Encoder, TorchEncoder
from priorclip.parity import TOLERANCES, check, compare_embeddings, dmr_allowance
from priorclip.retrieval import METRIC_KEYS, iter_image_batches
from priorclip.tokenizer import get_tokenizer


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


def compare(
    name: str,
    precision: str,
    ref: tuple[torch.Tensor, torch.Tensor],
    got: tuple[torch.Tensor, torch.Tensor],
    caption_image: np.ndarray,
    ref_metrics: dict[str, float] | None = None,
) -> dict:
    """The recall-check row of one engine against the reference embeddings (flat keys for the report schema)."""
    try:
        c = compare_embeddings(ref[0], ref[1], got[0], got[1], caption_image, ref_metrics)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    tol_prec = precision if precision in TOLERANCES else "int8"
    failures = check(c, tol_prec)
    return {
        "engine": name,
        "precision": precision,
        "metrics": c["recall_engine"],
        "delta": c["recall_delta"],
        "cosine_image_min": c["image"]["cosine_min"],
        "cosine_image_mean": c["image"]["cosine_mean"],
        "cosine_text_min": c["text"]["cosine_min"],
        "cosine_text_mean": c["text"]["cosine_mean"],
        "top10_agreement_i2t": c["top10_agreement"]["i2t"],
        "top10_agreement_t2i": c["top10_agreement"]["t2i"],
        "finite": c["finite"],
        "tolerance": {"cosine_min": TOLERANCES[tol_prec].min_cosine, "dmr_max": dmr_allowance(tol_prec, c["n_images"])},
        "failures": failures,
        "within_tolerance": not failures,
    }


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
