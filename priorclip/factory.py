"""open_clip's entry points, for people who come from it: ``create_model_and_transforms``,
``create_model_from_pretrained`` and ``get_tokenizer(name)`` (``tokenize`` is :func:`priorclip.tokenizer.tokenize`).

They take the same arguments in the same order as open_clip's (``model_name``, ``pretrained``, ``precision``,
``device``) and return the same things, built on :func:`priorclip.create_model`; ``checkpoint=`` is accepted as the
name this package uses for ``pretrained``. Differences a user should know: weights come only from a local file (nothing
is downloaded), the model is returned in eval mode, and ``encode_image``/``encode_text`` return L2-normalised features
unless ``normalize=False`` (open_clip's default is the opposite; normalising twice is harmless).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from priorclip.config import FAMILY_PIR
from priorclip.errors import PriorCLIPError
from priorclip.numerics import DTYPES
from priorclip.registry import DEFAULT_MODEL, get_config
from priorclip.preprocess import preprocess_for
from priorclip.tokenizer import clip_tokenizer
from priorclip.transforms import EvalTransform



def get_tokenizer(model_name: str = "", context_length: int | None = None) -> Callable[[Sequence[str]], torch.Tensor]:
    """The tokenizer of a registered model: CLIP's BPE for the open-domain models (77 tokens), BERT's WordPiece with
    PIR-pytorch's caption cleaning for PIR (47 tokens, padded to the call's longest caption)."""
    if not model_name:
        return clip_tokenizer(context_length or 77)
    cfg = get_config(model_name)
    if context_length:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, context_length=context_length))
    return preprocess_for(cfg).tokenizer


class TrainPreprocess:
    """The trainer's augmentation as an open_clip-style callable: PIL image -> normalised float tensor [3, S, S].

    Random resized crop (scale 0.5-1, bicubic) + horizontal flip, drawn from its own seeded generator, then the OpenAI
    mean/std; the trainer itself draws per-sample generators so runs repeat across workers.
    """

    def __init__(self, image_size: int, seed: int | None = None, randaugment: bool = False) -> None:
        from priorclip.training.data import TrainTransform

        self.image_size = image_size
        self._augment = TrainTransform(image_size, randaugment=randaugment)
        self._rng = np.random.default_rng(seed)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from priorclip.training.data import normalize_on_device

        return normalize_on_device(self._augment(img, self._rng)[None])[0]  # the trainer's own normalisation

    def __repr__(self) -> str:
        extra = " + RandAugment(2, 7)" if self._augment.randaugment is not None else ""
        return f"TrainPreprocess(image_size={self.image_size}, random resized crop 0.5-1 + flip{extra}, OpenAI mean/std)"


def _build(model_name: str | None, checkpoint, pretrained, precision: str, device, overrides: dict[str, Any]):
    from priorclip.registry import create_model

    if checkpoint is not None and pretrained is not None:
        raise PriorCLIPError("give the weights as checkpoint= or pretrained=, not both")
    weights = checkpoint if checkpoint is not None else pretrained
    if isinstance(weights, str) and not Path(weights).exists() and "/" not in weights and not weights.endswith(
        (".pt", ".pth", ".bin", ".safetensors")
    ):  # open_clip tags such as 'openai' or 'laion2b_s34b_b79k' name downloads; nothing is downloaded here
        raise PriorCLIPError(f"pretrained={weights!r}: no such file; priorclip loads weights only from a local "
                             "checkpoint file (open_clip's download tags are not available)")
    if precision not in DTYPES:
        raise PriorCLIPError(f"precision={precision!r}: expected one of {', '.join(DTYPES)}")
    model = create_model(model_name or None, checkpoint=weights, **overrides)
    return model.to(device=torch.device(device), dtype=DTYPES[precision])


def create_model_and_transforms(
    model_name: str | None = None,
    pretrained: str | Path | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    *,
    checkpoint: str | Path | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> tuple[torch.nn.Module, TrainPreprocess, EvalTransform]:
    """``(model, preprocess_train, preprocess_val)`` as open_clip returns them.

    ``model_name``: a registered config (``priorclip info``) or open_clip's ``"PIR"``; None takes the checkpoint's
    embedded config, else ``pir-swin-t-bert`` for a PIR-pytorch checkpoint, else ``priorclip-vit-b32``.
    ``preprocess_val`` is the model family's eval transform (PIR: squash to the size, nothing cut). ``pretrained``/``checkpoint``: a local weights file (strict load).
    ``precision``: ``fp32``, ``fp16`` or ``bf16`` (weights cast). ``overrides``: config fields, e.g. ``gate="2belief"``.
    """
    model = _build(model_name, checkpoint, pretrained, precision, device, overrides)
    pir = model.cfg.family == FAMILY_PIR  # PIR-pytorch trains with RandAugment on top of crop + flip
    return model, TrainPreprocess(model.cfg.vision.image_size, seed, pir), preprocess_for(model.cfg).transform


def create_model_from_pretrained(
    model_name: str | None = None,
    pretrained: str | Path | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    return_transform: bool = True,
    *,
    checkpoint: str | Path | None = None,
    **overrides: Any,
):
    """``(model, preprocess_val)`` (or the model alone with ``return_transform=False``); weights are required."""
    if checkpoint is None and pretrained is None:
        raise PriorCLIPError("create_model_from_pretrained needs weights: pretrained= (or checkpoint=) a local file; "
                             f"use create_model('{model_name or DEFAULT_MODEL}') for random weights")
    model = _build(model_name, checkpoint, pretrained, precision, device, overrides)
    return (model, preprocess_for(model.cfg).transform) if return_transform else model
