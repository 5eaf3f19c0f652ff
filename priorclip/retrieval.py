"""Retrieval evaluation exactly as the reference computes it (spec §6A).

scores = T Iᵀ of L2-normalised embeddings. Image→text R@K: an image counts if ANY of its captions is in the top K of
all captions. Text→image R@K: a caption counts if its image is in the top K of all images. Both are averaged over
queries, in percent; mR is the mean of the six numbers.

Ranks break score ties lower-index-first (as a stable top-k would), so a degenerate encoder that outputs constant
embeddings gets chance-level recall, never a perfect score.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from priorclip.data import RetrievalSet
from priorclip.encoder import Encoder, encode_images_with_order
from priorclip.preprocess import preprocess_for
from priorclip.transforms import EvalTransform

KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS) + ("mR",)


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of column ``target[i]`` within row i of ``scores`` [Q, N], ties lower-index-first."""
    gt = scores.gather(1, target.unsqueeze(1))  # [Q, 1]
    cols = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > gt) | ((scores == gt) & (cols.unsqueeze(0) < target.unsqueeze(1)))
    return ahead.sum(dim=1)


def recall_metrics(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray, caption_image: np.ndarray, chunk: int = 1024) -> dict[str, float]:
    """R@1/5/10 both ways and mR (percent) from embeddings [N_img, E] and [N_txt, E]."""
    img = torch.as_tensor(image_emb, dtype=torch.float32)
    txt = torch.as_tensor(text_emb, dtype=torch.float32)
    owner = torch.as_tensor(np.asarray(caption_image), dtype=torch.long)
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"embeddings must be [N, E] with equal E, got {tuple(img.shape)} and {tuple(txt.shape)}")
    if len(owner) != len(txt):
        raise ValueError("caption_image needs one entry per text embedding")
    # text -> image: rank of each caption's own image among all images
    t2i = torch.cat([_ranks(txt[s : s + chunk] @ img.T, owner[s : s + chunk]) for s in range(0, len(txt), chunk)])
    # image -> text: best (lowest) rank over the image's captions among all captions
    best = torch.full((len(img),), len(txt), dtype=torch.long)
    for s in range(0, len(txt), chunk):
        own = owner[s : s + chunk]
        r = _ranks(img[own] @ txt.T, torch.arange(s, s + len(own)))  # rank of caption c in its image's row
        best.scatter_reduce_(0, own, r, reduce="amin")
    out = {}
    for k in KS:
        out[f"i2t_R@{k}"] = 100.0 * (best < k).double().mean().item()
    for k in KS:
        out[f"t2i_R@{k}"] = 100.0 * (t2i < k).double().mean().item()
    out["mR"] = sum(out[key] for key in METRIC_KEYS[:-1]) / 6.0
    return out


def chance_metrics(caption_image: np.ndarray, n_images: int) -> dict[str, float]:
    """Expected recall of a random ranking: t2i R@K = K/N_img; i2t R@K = 1 - C(N_txt - p, K)/C(N_txt, K) for p captions."""
    n_txt = len(caption_image)
    per_image = np.bincount(np.asarray(caption_image), minlength=n_images)
    out = {}
    for k in KS:
        kk = min(k, n_txt)
        miss = [math.comb(n_txt - p, kk) / math.comb(n_txt, kk) for p in per_image]
        out[f"i2t_R@{k}"] = 100.0 * (1.0 - float(np.mean(miss)))
    for k in KS:
        out[f"t2i_R@{k}"] = 100.0 * min(k, n_images) / n_images
    out["mR"] = sum(out[key] for key in METRIC_KEYS[:-1]) / 6.0
    return out


def iter_image_batches(paths: Sequence, transform: EvalTransform, batch_size: int, workers: int = 4):
    """Yield pixel batches [B, 3, S, S] preprocessed by ``transform`` (the model's: :func:`preprocess_for`); decoding
    runs in threads (PIL releases the GIL).

    Each image is read with :meth:`EvalTransform.load` (pixel limit from the header, large JPEGs decoded at reduced
    scale); the first unreadable one raises :class:`~priorclip.errors.DataError` naming it.
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for s in range(0, len(paths), batch_size):
            yield torch.stack(list(pool.map(transform.load, paths[s : s + batch_size])))


def embed_images(encoder: Encoder, paths: Sequence, batch_size: int = 64, progress: bool = True, workers: int = 4) -> torch.Tensor:
    return embed_images_with_orders(encoder, paths, batch_size, progress, workers, with_orders=False)[0]


def embed_images_with_orders(encoder: Encoder, paths: Sequence, batch_size: int = 64, progress: bool = True,
                             workers: int = 4, with_orders: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image embeddings [N, E] and belief orders [N, T] (None where the encoder does not expose them, or without
    ``with_orders``)."""
    embs, orders = [], []
    with tqdm(total=len(paths), desc="images", unit="img", disable=not progress) as bar:
        for pixels in iter_image_batches(paths, preprocess_for(encoder).transform, batch_size, workers):
            if with_orders:
                emb, order = encode_images_with_order(encoder, pixels)
            else:
                emb, order = encoder.encode_images(pixels), None
            embs.append(emb.float().cpu())
            orders.append(None if order is None else order.long().cpu())
            bar.update(len(pixels))
    have = [o is not None for o in orders]
    return torch.cat(embs), (torch.cat(orders) if all(have) and have else None)


def embed_texts(encoder: Encoder, captions: Sequence[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Caption embeddings [N, E] in order; a model that attends to padding (PIR) is fed the reference's chunks."""
    chunks = []
    with tqdm(total=len(captions), desc="captions", unit="cap", disable=not progress) as bar:
        for tokens in preprocess_for(encoder).text_batches(captions, batch_size):
            chunks.append(encoder.encode_texts(tokens).cpu())
            bar.update(len(tokens))
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    chance: dict[str, float]
    n_images: int
    n_captions: int
    image_emb: torch.Tensor
    text_emb: torch.Tensor


def evaluate(encoder: Encoder, dataset: RetrievalSet, batch_size: int = 64, progress: bool = True, workers: int = 4) -> Evaluation:
    """Embed a retrieval set with ``encoder`` and score it."""
    img = embed_images(encoder, dataset.images, batch_size, progress, workers)
    txt = embed_texts(encoder, dataset.captions, max(batch_size, 256), progress)
    return Evaluation(
        recall_metrics(img, txt, dataset.caption_image),
        chance_metrics(dataset.caption_image, len(dataset.images)),
        len(dataset.images),
        len(dataset.captions),
        img,
        txt,
    )


def format_table(rows: dict[str, dict[str, float]], keys: Sequence[str] = METRIC_KEYS, fmt: Callable[[float], str] = "{:.2f}".format) -> str:
    """Markdown table: one row per named metrics dict."""
    head = "| | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(fmt(m[k]) for k in keys) + " |\n" for name, m in rows.items())
