"""The open-domain PriorCLIP model (open_clip model name ``PIR``): prior ResNet + gated ViT + CLIP text tower.

Module names and parameter shapes are the reference's, key for key (spec §1A, §9.11): ``vision_proj_res``,
``visual``, ``res_visual``, the text tower unpacked into the top level (``token_embedding``, ``positional_embedding``,
``transformer``, ``ln_final``, ``text_projection``) and ``logit_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from priorclip.config import GATE_BELIEF_PLUS_RANK, ModelConfig
from priorclip.layers.resnet import ModifiedResNet
from priorclip.layers.transformer import Transformer
from priorclip.layers.vit import VisionTransformer


def _is_exporting() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


class PriorCLIP(nn.Module):
    """Image and text encoders of PriorCLIP; ``cfg.prior=None`` gives a plain CLIP of the same towers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        if cfg.prior is not None:
            self.vision_proj_res = nn.Linear(cfg.embed_dim, v.width)
            self.res_visual = ModifiedResNet(
                cfg.prior.layers, cfg.embed_dim, cfg.prior.heads, image_size=v.image_size, width=cfg.prior.width
            )
        self.visual = VisionTransformer(v, cfg.embed_dim, cfg.gate)

        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        # Cutting the text to the batch's longest caption is exact (causal mask + EOT pooling) and saves 2.9x of the
        # text FLOPs on AID/RSICD captions at batch 256 (benchmarks/results/text-trim-aid-rsicd.json); it is skipped while tracing or exporting, where the graph must not bake in a length.
        self.trim_text = True
        self._init_text()

    def _init_text(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_clip_()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def has_prior(self) -> bool:
        return self.cfg.prior is not None

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def context_length(self) -> int:
        return self.cfg.text.context_length

    @property
    def ranks_tokens(self) -> bool:
        """Whether encode_image_with_order returns an order (the belief+rank gate ranks tokens; 2belief does not)."""
        return self.has_prior and self.cfg.gate == GATE_BELIEF_PLUS_RANK

    @property
    def prior_module(self) -> nn.Module | None:
        return self.res_visual if self.has_prior else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def prior_token(self, pixels: torch.Tensor) -> torch.Tensor:
        """The instruction token y = vision_proj_res(res_visual(image)), [B, 1, D_vision]."""
        return self.vision_proj_res(self.res_visual(pixels)).unsqueeze(1)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True, kernels: str = "auto") -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, embed_dim] image embeddings (L2-normalised by default).

        ``kernels``: ``"auto"`` runs the fused kernels where they apply (CUDA inference), ``"reference"`` plain torch.
        """
        feats, _ = self._image_features(pixels, kernels)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_image_with_order(self, pixels: torch.Tensor,
                                kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
        """L2-normalised image embeddings [B, embed_dim] and the gate's belief order [B, T] int64 (token index at
        each rank slot), or ``None`` where the gate does not rank (no prior, or the ``2belief`` formula).

        Parity checks compare the order with the reference's, since the gate's rank weights jump when two beliefs
        swap."""
        feats, order = self._image_features(pixels, kernels)
        return F.normalize(feats, dim=-1), order

    def _image_features(self, pixels: torch.Tensor, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s or pixels.shape[3] != s:
            raise ValueError(f"encode_image expects pixels [B,3,{s},{s}], got {tuple(pixels.shape)}")
        if not self.has_prior:
            return self.visual(pixels, return_order=True, kernels=kernels)
        return self.visual(pixels, return_order=True, prior_features=self.res_visual(pixels),
                           prior_proj=self.vision_proj_res, kernels=kernels)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, L] token ids (L <= context_length, EOT = the largest id in a row) -> [B, embed_dim] embeddings."""
        ctx = self.cfg.text.context_length
        if tokens.dim() != 2 or tokens.shape[1] > ctx or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"encode_text expects integer token ids [B,L<={ctx}], got {tuple(tokens.shape)} {tokens.dtype}"
            )
        eot = tokens.argmax(dim=-1)  # [B]: CLIP pools the EOT token, the highest id in the vocabulary
        if self.trim_text and not _is_exporting() and tokens.shape[0] > 0:
            tokens = tokens[:, : int(eot.max()) + 1]
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, causal=True)  # [B, L, W]
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, W]
        feats = pooled @ self.text_projection
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings and the logit scale exp(logit_scale) (the trainer clamps it)."""
        return self.encode_image(pixels), self.encode_text(tokens), self.logit_scale.exp()
