"""What each model family needs around its encoders: the tokenizer, the eval transform and the caption batching.

The open-domain PriorCLIP uses CLIP's BPE (77 tokens, EOT pooling, so padding never matters) and open_clip's crop
transform. The closed-domain PIR uses BERT's WordPiece with PIR-pytorch's caption cleaning and its squash transform,
and attends to padding: its captions are tokenised and embedded in the reference's chunks of 128, each padded to the
chunk's longest caption, or its embeddings would not be the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from priorclip.config import FAMILY_PIR, AnyConfig
from priorclip.transforms import RESIZE_CROP, RESIZE_SQUASH, EvalTransform

PIR_TEXT_CHUNK = 128  # PIR-pytorch's batch_size_test_text


@dataclass(frozen=True)
class Preprocess:
    tokenizer: Callable[[Sequence[str]], torch.Tensor]  # captions -> int64 ids [B, L]
    transform: EvalTransform
    text_chunk: int | None  # captions per tokenizer call where the batch changes the embedding, else None

    def text_batches(self, captions: Sequence[str], batch_size: int) -> Iterator[torch.Tensor]:
        """Token batches in caption order; where padding is attended, always the reference's chunking."""
        step = self.text_chunk or batch_size
        for s in range(0, len(captions), step):
            yield self.tokenizer(list(captions[s : s + step]))


def preprocess_for(source: AnyConfig | Any) -> Preprocess:
    """The preprocessing of a model config, or of an encoder (its ``config``; one without is open-domain)."""
    cfg = source if hasattr(source, "family") else getattr(source, "config", None)
    if cfg is None:  # an encoder that only states its sizes
        from priorclip.tokenizer import clip_tokenizer

        return Preprocess(clip_tokenizer(source.context_length), EvalTransform(source.image_size), None)
    size, ctx = cfg.vision.image_size, cfg.text.context_length
    if cfg.family == FAMILY_PIR:
        from priorclip.wordpiece import pir_tokenizer

        chunk = None if cfg.mask_padding else PIR_TEXT_CHUNK
        return Preprocess(pir_tokenizer(ctx), EvalTransform(size, RESIZE_SQUASH), chunk)
    from priorclip.tokenizer import clip_tokenizer

    return Preprocess(clip_tokenizer(ctx), EvalTransform(size, RESIZE_CROP), None)
