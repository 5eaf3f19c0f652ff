"""The closed-domain PIR model (ACM MM 2023; PIR-pytorch): Swin + frozen ResNet prior + BERT, VIR and LCA.

Image (spec §2B): V = vision_proj(Swin(image)) [B, 50, E] with the averaged "CLS" at 0; the prior c =
conv_proj(ResNet(image)); the 40 tokens of highest belief softmax(<V_t, c>) are kept in belief order; two rounds of
MHSA then CroSA with the mapped instruction as query; embedding = normalise(V[:, 0] + head_img(F[:, 0])).

Text (spec §3): T = text_proj(BERT(ids)) [B, L, E]; three cycles of MHSA then CroSA with the previous cycle, mapped,
as query; embedding = normalise(T[:, 0] + head_txt(T3[:, 0])). PIR attends to [PAD] tokens, so a caption's embedding
depends on its batch's longest caption: callers batch captions as the reference's evaluation does (chunks of 128 in
dataset order, padded to the chunk's longest), or set ``mask_padding``.

Module names are the reference's (``vision_encoder``, ``text_encoder``, ``conv_encoder``, ``temp``, ``temp2``, ...),
so ``checkpoint_best.pth`` loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from priorclip.config import PIRConfig
from priorclip.layers.bert import BertEncoder
from priorclip.kernels.vir_filter import vir_filter
from priorclip.layers.pae import MHSA, CroSA
from priorclip.layers.swin import SwinTransformer
from priorclip.layers.tv_resnet import TorchvisionResNet
from priorclip.wordpiece import PAD_ID


class PIR(nn.Module):
    """Image and text encoders of the closed-domain PIR model, with its two learnable temperatures."""

    def __init__(self, cfg: PIRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, drop, heads = cfg.embed_dim, cfg.pae_dropout, cfg.pae_heads
        # registration order as the reference, so state dicts list keys in the same order
        self.vision_encoder = SwinTransformer(cfg.vision)
        self.text_encoder = BertEncoder(cfg.text)
        self.conv_encoder = TorchvisionResNet(cfg.prior)
        self.temp = nn.Parameter(torch.tensor(cfg.init_temp))
        self.temp2 = nn.Parameter(torch.tensor(cfg.init_temp2))
        self.vision_proj = nn.Linear(cfg.vision.width, e)
        self.text_proj = nn.Linear(cfg.text.width, e)
        self.conv_proj = nn.Linear(cfg.prior.out_dim, e)
        self.mapping_img = nn.ModuleList(nn.Linear(e, e) for _ in range(cfg.instru_num))
        self.mapping_txt = nn.ModuleList(nn.Linear(e, e) for _ in range(cfg.cycle_num))
        self.head_img = nn.Linear(e, e)
        self.head_txt = nn.Linear(e, e)
        self.img_sa = nn.ModuleList(MHSA(e, heads, drop) for _ in range(cfg.instru_num))
        self.img_ca = nn.ModuleList(CroSA(e, heads, drop) for _ in range(cfg.instru_num))
        self.txt_sa = nn.ModuleList(MHSA(e, heads, drop) for _ in range(cfg.cycle_num))
        self.txt_ca = nn.ModuleList(CroSA(e, heads, drop) for _ in range(cfg.cycle_num))
        # The prior is frozen as in the reference (finetune_conv: False); its BatchNorm still runs in train mode.
        self.conv_encoder.requires_grad_(False)

    # ------------------------------------------------------------------ the interface every tool uses
    has_prior = True
    ranks_tokens = True  # encode_image_with_order returns VIR's belief order

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def context_length(self) -> int:
        return self.cfg.text.context_length

    @property
    def prior_module(self) -> nn.Module:
        return self.conv_encoder

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision_encoder.grad_checkpointing = enable
        self.text_encoder.grad_checkpointing = enable

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True, kernels: str = "auto") -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, embed_dim] image embeddings (L2-normalised by default)."""
        feats, _ = self._image_features(pixels, kernels)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_image_with_order(self, pixels: torch.Tensor,
                                kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image embeddings and VIR's belief order [B, 50] (token index at each rank; the first
        ``filter_size`` are kept)."""
        feats, order = self._image_features(pixels, kernels)
        return F.normalize(feats, dim=-1), order

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, L] BERT ids ([CLS] first, [PAD]=0 after, L <= context_length) -> [B, embed_dim] embeddings.

        Padding is attended (as the checkpoints were trained) unless ``cfg.mask_padding``: never trim or re-pad the
        ids between the tokenizer and here."""
        ctx = self.cfg.text.context_length
        if tokens.dim() != 2 or tokens.shape[1] > ctx or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"encode_text expects integer token ids [B,L<={ctx}], got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        tokens = tokens.long()
        pad = tokens == PAD_ID if self.cfg.mask_padding else None
        hidden = self.text_encoder(tokens, attention_mask=None if pad is None else ~pad)
        t = self.text_proj(hidden)  # [B, L, E]
        local = t
        for sa, ca, mapping in zip(self.txt_sa, self.txt_ca, self.mapping_txt):
            local = ca(mapping(local), sa(local, pad), pad)
        feats = t[:, 0] + self.head_txt(local[:, 0])
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings and the temperatures [temp, temp2] (PIRLoss divides by them)."""
        return self.encode_image(pixels), self.encode_text(tokens), torch.stack([self.temp, self.temp2])

    # ------------------------------------------------------------------ VIR
    def _image_features(self, pixels: torch.Tensor, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        s = self.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s or pixels.shape[3] != s:
            raise ValueError(f"encode_image expects pixels [B,3,{s},{s}], got {tuple(pixels.shape)}")
        v = self.vision_proj(self.vision_encoder(pixels))  # [B, 50, E], token 0 = mean of the grid tokens
        instr = self.conv_proj(self.conv_encoder(pixels))  # [B, E]
        # The 40 tokens of highest belief in belief order (the Triton filter on CUDA at inference; sorted on the
        # softmax, as the reference does, equal beliefs lower index first on every backend).
        f, order = vir_filter(v, instr, self.cfg.filter_size, kernels=kernels)  # [B, 40, E], [B, 50]
        query = instr.unsqueeze(1).expand(-1, f.shape[1], -1)
        for sa, ca, mapping in zip(self.img_sa, self.img_ca, self.mapping_img):
            f = ca(mapping(query), sa(f))
        return v[:, 0] + self.head_img(f[:, 0]), order
