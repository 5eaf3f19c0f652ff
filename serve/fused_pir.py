"""The ``fused`` engine for the closed-domain PIR model (spec §2B, §3, §8B.5-6): inference only.

Exact up to floating-point rounding against :class:`~priorclip.pir.PIR`:

* weights are copied once to the engine dtype (real fp16/bf16 weights, no autocast); the caller's model is untouched;
* Swin-T and BERT run as the library runs them (cuBLAS GEMMs; BERT's attention through
  ``scaled_dot_product_attention``; its LayerNorms stay float32); the frozen ResNet-50 prior runs with BatchNorm
  folded into its convolutions, channels-last (cuDNN);
* VIR and LCA go through the PAE kernels (:mod:`priorclip.kernels.pae`): the hard filter in one launch, each block
  in five or six, the mapped queries folded into the query projections, VIR's 40 identical queries computed once,
  the last block of each chain for row 0 only;
* on CUDA each (tower, batch[, text length]) is captured once as a CUDA graph and replayed.

PIR attends to its [PAD] tokens, so ids run exactly as tokenised (the batch's own length; never cut or padded).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from priorclip.config import FAMILY_PIR
from priorclip.errors import PriorCLIPError
from priorclip.kernels.belief_gate import fused_enabled
from priorclip.kernels.pae import ChainWeights, Dense, lca, vir
from priorclip.layers.tv_resnet import Bottleneck, TorchvisionResNet
from priorclip.pir import PIR
from priorclip.serve.cuda_graphs import GraphCache, GraphedImageEncoder
from priorclip.wordpiece import PAD_ID

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fold_resnet(net: TorchvisionResNet) -> TorchvisionResNet:
    """A float64 copy of the prior with every BatchNorm folded into the convolution before it (eval statistics):
    folded in float64 so the engine's dtype rounds the folded weights once."""
    net = copy.deepcopy(net).double().eval()
    net[0], net[1] = fuse_conv_bn_eval(net[0], net[1]), nn.Identity()
    for block in net.modules():
        if isinstance(block, Bottleneck):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    return net


def _module(m: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(m).to(device=device, dtype=dtype).eval().requires_grad_(False)


class FusedPIREncoder(GraphedImageEncoder):
    """Inference-only PIR encoder (module docstring): embeddings [B, E] float32, L2-normalised, on ``device``.

    Args:
        model: the PIR model; its weights are copied (the prior's BatchNorm folded with its running statistics).
        device: where the engine runs.
        dtype: float32, float16 or bfloat16: the weights' and activations' dtype (VIR's belief softmax runs in
            float32, BERT's LayerNorms too).
        cuda_graphs: on CUDA, capture and replay one CUDA graph per (tower, batch size[, text length]).
    """

    def __init__(self, model: PIR, device: str | torch.device, dtype: torch.dtype, cuda_graphs: bool = True) -> None:
        if model.cfg.family != FAMILY_PIR:
            raise PriorCLIPError(f"FusedPIREncoder runs PIR models, not {model.cfg.name!r} (family {model.cfg.family})")
        if dtype not in _DTYPES:
            raise ValueError(f"FusedPIREncoder dtype must be one of {_DTYPES}, got {dtype}")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        cfg = model.cfg
        self.device, self.dtype, self.config = dev, dtype, cfg
        self.image_size = cfg.vision.image_size
        self.context_length = cfg.text.context_length
        self.embed_dim = cfg.embed_dim

        self.swin = _module(model.vision_encoder, dev, dtype)
        self.bert = _module(model.text_encoder, dev, dtype)
        self.prior = fold_resnet(model.conv_encoder).to(device=dev, dtype=dtype, memory_format=torch.channels_last)
        self.prior.requires_grad_(False)
        lin = lambda m: Dense.of(m, device=dev, dtype=dtype)  # noqa: E731
        self.vision_proj, self.conv_proj, self.text_proj = lin(model.vision_proj), lin(model.conv_proj), lin(
            model.text_proj)
        self.head_img, self.head_txt = lin(model.head_img), lin(model.head_txt)
        self.vir = ChainWeights.of(model.img_sa, model.img_ca, model.mapping_img, dev, dtype)
        self.lca = ChainWeights.of(model.txt_sa, model.txt_ca, model.mapping_txt, dev, dtype)

        # What the PAE dispatchers run for this device and dtype (for the engine's metadata).
        self.kernels = "fused" if fused_enabled(torch.empty(0, device=dev, dtype=dtype)) else "reference"
        self._graphs = GraphCache(dev, cuda_graphs)
        self.cuda_graphs = self._graphs.enabled

    # ---------------------------------------------------------------------------------------------- forwards

    def _image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = F.linear(self.swin(pixels), self.vision_proj.weight, self.vision_proj.bias)  # [B, 50, E]
        instr = F.linear(self.prior(pixels.contiguous(memory_format=torch.channels_last)), self.conv_proj.weight,
                         self.conv_proj.bias)  # [B, E]
        local, order = vir(v, instr, self.vir, self.config.filter_size)
        feats = v[:, 0] + F.linear(local, self.head_img.weight, self.head_img.bias)
        return F.normalize(feats.float(), dim=-1), order

    def _text_forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor]:
        pad = tokens == PAD_ID if self.config.mask_padding else None
        hidden = self.bert(tokens, attention_mask=None if pad is None else ~pad)
        t = F.linear(hidden, self.text_proj.weight, self.text_proj.bias)  # [B, L, E]
        feats = t[:, 0] + F.linear(lca(t, self.lca, pad), self.head_txt.weight, self.head_txt.bias)
        return (F.normalize(feats.float(), dim=-1),)

    # ---------------------------------------------------------------------------------------------- Encoder API
    # (encode_images and encode_images_with_order: GraphedImageEncoder's; the belief order is VIR's, [B, 50])

    @torch.inference_mode()
    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1<=L<=context] BERT ids as tokenised ([CLS] first, [PAD] after) -> [B, E] float32."""
        ctx = self.context_length
        if tokens.dim() != 2 or not 0 < tokens.shape[1] <= ctx or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"encode_texts expects integer token ids [B,1<=L<={ctx}], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[0] == 0:
            return torch.empty(0, self.embed_dim, device=self.device)
        lo, hi = (int(v) for v in torch.aminmax(tokens))  # one pass, one sync
        vocab = self.config.text.vocab_size
        if lo < 0 or hi >= vocab:  # checked here: the captured graph cannot read values
            raise ValueError(f"encode_texts: BERT token ids must be in [0, {vocab}), got range [{lo}, {hi}]")
        tokens = tokens.to(self.device, torch.int64)
        return self._graphs.run(("text", *tokens.shape), self._text_forward, tokens)[0]
