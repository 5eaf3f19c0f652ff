"""BERT text tower of the closed-domain PIR model (spec §1B): the Google/X-VLM BERT that PIR bundles, without pooler.

Post-LN blocks, erf GELU, LayerNorm eps 1e-12, absolute positions and all-zero token types. Parameter names match
that code (``embeddings.*``, ``encoder.layer.{i}.*``), so an official checkpoint's ``text_encoder.*`` keys load
strictly. ``forward`` returns the last hidden state; PIR calls it with ids only, so [PAD] tokens are attended.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from priorclip.config import BertConfig
from priorclip.errors import CheckpointError

# Additive score for a masked key, as in the reference (not -inf: a fully masked row stays finite).
MASKED_SCORE = -10000.0


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype.

    BERT's eps is 1e-12, which rounds to 0 in float16: an fp16 LayerNorm (an fp16 ONNX/TensorRT graph, or a kernel
    that keeps eps in the input dtype) divides by sqrt(var + 0) and turns constant rows into NaN. Keeping the
    normalisation in float32 preserves the reference numerics under autocast and half weights alike (spec §9.5).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.LayerNorm = Fp32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # PIR never passes token types: every token is segment 0, so row 0 of the table is added everywhere.
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        self.value = nn.Linear(cfg.width, cfg.width)
        self.dropout_p = cfg.dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # [B, H, L, hd]

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if mask_bias is not None:
            mask_bias = mask_bias.to(q.dtype)
        # Default scale 1/sqrt(head_dim); dropout acts on the attention probabilities, as in the reference.
        p = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias, dropout_p=p)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class PostNormResidual(nn.Module):
    """Projection, dropout, residual add, then LayerNorm (post-LN); also the FFN's output half."""

    def __init__(self, cfg: BertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.width)
        self.LayerNorm = Fp32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = PostNormResidual(cfg, cfg.width)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, not the tanh approximation


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = PostNormResidual(cfg, cfg.intermediate)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class BertLayers(nn.Module):
    """Holds the blocks under ``layer`` so keys read ``encoder.layer.{i}.*``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask_bias)
        return x


class BertEncoder(nn.Module):
    """ids [B, L] (and an optional 0/1 mask [B, L]) -> last hidden state [B, L, width]."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertLayers(cfg)
        self.apply(_init_bert_)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(input_ids, attention_mask)
        x = self.embeddings(input_ids)
        mask_bias = None  # no mask: every position, [PAD] included, is attended (how PIR was trained)
        if attention_mask is not None:
            keep = attention_mask.to(x.dtype)[:, None, None, :]  # [B, 1, 1, L], broadcast over heads and queries
            mask_bias = (1.0 - keep) * MASKED_SCORE
        return self.encoder(x, mask_bias)

    def _check(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"BERT input_ids must be a 2-D int64/int32 tensor [B, L], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if torch.jit.is_tracing():
            return  # traced sizes are tensors: a check here would only bake a constant into the graph
        if ids.shape[1] > self.cfg.max_positions:
            raise ValueError(f"BERT input has {ids.shape[1]} tokens, more than max_positions {self.cfg.max_positions}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        # reading values would break a compiled/exported graph or a CUDA graph capture (a host sync), and meta tensors
        # (FLOP counting) have none
        if (ids.numel() and not ids.is_meta and not torch.compiler.is_compiling()
                and not (ids.is_cuda and torch.cuda.is_current_stream_capturing())):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"BERT token ids must be in [0, {self.cfg.vocab_size}), got range [{lo}, {hi}]")


def _init_bert_(m: nn.Module) -> None:
    # BERT's initializer_range 0.02 for weights and embeddings; zero biases; LayerNorm stays (1, 0).
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


# Older checkpoints (converted from Google's TensorFlow release) name the LayerNorm affine gamma/beta.
_OLD_LAYER_NORM_NAMES = {"gamma": "weight", "beta": "bias"}


def hf_bert_state_dict_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a HuggingFace ``bert-base-uncased`` checkpoint (``pytorch_model.bin`` or a ``BertModel``) -> ours.

    Strips the ``bert.`` prefix, renames old-style LayerNorm ``gamma``/``beta`` to ``weight``/``bias`` and drops the
    pooler, the pre-training heads (``cls.*``) and the ``embeddings.position_ids`` buffer. Loading the hub file
    as-is with strict=False, as the reference does, matches none of these keys and leaves BERT random (spec §11.5).
    Other keys pass through unchanged, so a strict load reports them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.removeprefix("bert.")
        if k.startswith(("pooler.", "cls.")) or k == "embeddings.position_ids":
            continue
        module, _, name = k.rpartition(".")
        if module.endswith("LayerNorm") and name in _OLD_LAYER_NORM_NAMES:
            k = f"{module}.{_OLD_LAYER_NORM_NAMES[name]}"
        out[k] = value
    if "embeddings.word_embeddings.weight" not in out:
        raise CheckpointError("no BERT weights found: expected keys like 'bert.embeddings.word_embeddings.weight'")
    return out
