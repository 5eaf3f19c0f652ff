"""The ``fused`` engine: an inference-only re-implementation of PriorCLIP's two encoders (spec §8B).

Every transformation is exact up to floating-point rounding (same results as :class:`~priorclip.model.PriorCLIP` at
fp32):

* weights are copied once to the engine dtype (real fp16/bf16 weights, no autocast); the caller's model is untouched;
* the prior ResNet runs with BatchNorm folded into its convolutions (eval statistics), channels_last, and its
  attention pool computes query 0 only;
* the ViT stem and belief gate go through :func:`~priorclip.kernels.belief_gate.stem_gate` (one Triton launch on
  CUDA, the prior projection included); the last ViT block computes token 0 only (its only output that is pooled);
* texts are cut to a length bucket >= max(EOT)+1 (causal mask + EOT pooling make the rest irrelevant) and the last
  text block computes the EOT row only;
* on CUDA each (tower, batch[, length bucket]) is captured once as a CUDA graph and replayed.

With ``fp8`` (:class:`~priorclip.serve.fp8.Fp8Config`) the image path's large GEMMs run in FP8 e4m3 with calibrated
scales (:mod:`priorclip.serve.fp8`); that one is an approximation, checked by recall rather than to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from priorclip.config import FAMILY_PRIORCLIP
from priorclip.errors import PriorCLIPError
from priorclip.kernels.add_layernorm import add_layernorm
from priorclip.kernels.belief_gate import fused_enabled, stem_gate
from priorclip.layers.resnet import Bottleneck, ModifiedResNet
from priorclip.layers.transformer import ResidualAttentionBlock
from priorclip.model import PriorCLIP
from priorclip.serve.cuda_graphs import GraphCache, GraphedImageEncoder

if TYPE_CHECKING:
    from priorclip.serve.fp8 import Fp8Config

TEXT_LENGTH_BUCKETS = (8, 16, 24, 32, 48, 64, 77)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _copy(p: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return p.detach().to(device=device, dtype=dtype, copy=True)


# ------------------------------------------------------------------------------------------- transformer blocks


@dataclass
class Linear:
    """y = x W^T + b in the engine dtype. A GEMM slot of its own, so an FP8 plan can swap it (serve/fp8.py)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


Gemm = Callable[[torch.Tensor], torch.Tensor]  # a Linear or a stand-in with its maths (Fp8Linear)


@dataclass
class BlockWeights:
    """One pre-LN block's weights; the packed in-projection is also kept split as Q and KV for the pruned block."""

    heads: int
    ln1: tuple[torch.Tensor, torch.Tensor, float]
    qkv: Gemm
    q: Gemm  # rows [:D] of qkv (views, no copy)
    kv: Gemm  # rows [D:]
    out: Gemm
    ln2: tuple[torch.Tensor, torch.Tensor, float]
    fc: Gemm
    proj: Gemm

    @classmethod
    def of(cls, block: ResidualAttentionBlock, device: torch.device, dtype: torch.dtype) -> BlockWeights:
        c = lambda p: _copy(p, device, dtype)  # noqa: E731
        lin = lambda m: Linear(c(m.weight), c(m.bias))  # noqa: E731
        d = block.attn.out_proj.in_features
        qkv_w, qkv_b = c(block.attn.in_proj_weight), c(block.attn.in_proj_bias)
        return cls(
            block.attn.heads, (c(block.ln_1.weight), c(block.ln_1.bias), block.ln_1.eps), Linear(qkv_w, qkv_b),
            Linear(qkv_w[:d], qkv_b[:d]), Linear(qkv_w[d:], qkv_b[d:]), lin(block.attn.out_proj),
            (c(block.ln_2.weight), c(block.ln_2.bias), block.ln_2.eps), lin(block.mlp.c_fc), lin(block.mlp.c_proj),
        )


def _ln(x: torch.Tensor, ln: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], ln[2])


def _mlp_residual(x: torch.Tensor, p: BlockWeights) -> torch.Tensor:
    return x + p.proj(F.gelu(p.fc(_ln(x, p.ln2))))


def block_forward(x: torch.Tensor, p: BlockWeights, causal: bool = False) -> torch.Tensor:
    """The model's block (:class:`~priorclip.layers.transformer.ResidualAttentionBlock`), [B, L, D] -> [B, L, D]."""
    b, n, d = x.shape
    qkv = p.qkv(_ln(x, p.ln1)).view(b, n, 3, p.heads, d // p.heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # [B, H, L, hd]
    x = x + p.out(a.transpose(1, 2).reshape(b, n, d))
    return _mlp_residual(x, p)


def pruned_block(x: torch.Tensor, p: BlockWeights, rows: torch.Tensor | None = None,
                 h: torch.Tensor | None = None) -> torch.Tensor:
    """One output row per sample of :func:`block_forward`: [B, L, D] -> [B, D].

    ``rows`` None: row 0 of the unmasked block (ViT). ``rows`` [B] int64: row ``rows[b]`` of the causal block (text
    EOT), whose query sees keys 0..rows[b] only; later rows may be padding and are masked out. Keys and values
    still come from every token (LN1 over all of them); Q, attention, projections and the MLP run for one row.
    ``h``: LN1(x) when the caller already has it (:func:`encoder_stack` with fused norms).
    """
    b, n, d = x.shape
    hd = d // p.heads
    h = _ln(x, p.ln1) if h is None else h  # [B, L, D]
    if rows is None:
        x0, h0, mask = x[:, :1], h[:, :1], None
    else:
        batch = torch.arange(b, device=x.device)
        x0, h0 = x[batch, rows].unsqueeze(1), h[batch, rows].unsqueeze(1)  # [B, 1, D]
        mask = (torch.arange(n, device=x.device) <= rows.unsqueeze(1)).view(b, 1, 1, n)  # True = attend
    q = p.q(h0).view(b, 1, p.heads, hd).transpose(1, 2)  # [B, H, 1, hd]
    kv = p.kv(h).view(b, n, 2, p.heads, hd).permute(2, 0, 3, 1, 4)  # [2, B, H, L, hd]
    a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # [B, H, 1, hd]
    x0 = x0 + p.out(a.transpose(1, 2).reshape(b, 1, d))
    return _mlp_residual(x0, p)[:, 0]


def _block_fused_norms(x: torch.Tensor, h: torch.Tensor, p: BlockWeights, next_ln, causal: bool):
    """:func:`block_forward` given h = LN1(x), each residual add fused with the LayerNorm that follows it (this
    block's LN2, then the next block's LN1): returns (x, LN1_next(x))."""
    b, n, d = x.shape
    qkv = p.qkv(h).view(b, n, 3, p.heads, d // p.heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # [B, H, L, hd]
    x, h2 = add_layernorm(x, p.out(a.transpose(1, 2).reshape(b, n, d)), *p.ln2)
    return add_layernorm(x, p.proj(F.gelu(p.fc(h2))), *next_ln)


def encoder_stack(x: torch.Tensor, blocks: list[BlockWeights], causal: bool = False,
                  rows: torch.Tensor | None = None, fused_norms: bool = False) -> torch.Tensor:
    """Every block in full but the last, pruned to one row per sample (:func:`pruned_block`): [B, L, D] -> [B, D].

    ``fused_norms``: the residual adds and the LayerNorms after them as one kernel each
    (``priorclip.kernels.add_layernorm``; the reference off CUDA): a candidate, off until the GPU says it wins."""
    if not fused_norms:
        for blk in blocks[:-1]:
            x = block_forward(x, blk, causal)
        return pruned_block(x, blocks[-1], rows)
    h = _ln(x, blocks[0].ln1)
    for blk, nxt in zip(blocks[:-1], blocks[1:]):
        x, h = _block_fused_norms(x, h, blk, nxt.ln1, causal)
    return pruned_block(x, blocks[-1], rows, h=h)


# ------------------------------------------------------------------------------------------- prior ResNet


@dataclass
class FoldedConv:
    """A convolution with the BatchNorm after it folded in (eval statistics): y = conv(x, w') + b'."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]

    @classmethod
    def fold(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, device: torch.device, dtype: torch.dtype) -> FoldedConv:
        # Folded in float64 so that the only rounding is the final cast to the engine dtype.
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        w = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
        b = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
        if conv.bias is not None:
            b = b + conv.bias.detach().double() * scale
        w = w.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return cls(w, b.to(device=device, dtype=dtype), tuple(conv.stride), tuple(conv.padding))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def _pool(x: torch.Tensor, k: int) -> torch.Tensor:
    return x if k == 1 else F.avg_pool2d(x, k)


def _kernel(pool: nn.Module) -> int:
    if isinstance(pool, nn.AvgPool2d):
        k = pool.kernel_size
        return int(k if isinstance(k, int) else k[0])
    return 1  # nn.Identity


@dataclass
class BottleneckWeights:
    c1: FoldedConv | Gemm  # the 1x1 convolutions may be swapped for an FP8 GEMM over the map (Fp8Conv1x1)
    c2: FoldedConv
    c3: FoldedConv | Gemm
    pool: int  # anti-aliasing average pool after conv2 (1: none)
    down: FoldedConv | Gemm | None
    down_pool: int

    @classmethod
    def of(cls, blk: Bottleneck, device: torch.device, dtype: torch.dtype) -> BottleneckWeights:
        f = lambda conv, bn: FoldedConv.fold(conv, bn, device, dtype)  # noqa: E731
        down, down_pool = None, 1
        if blk.downsample is not None:
            pool, conv, bn = blk.downsample  # keys "-1", "0", "1"
            down, down_pool = f(conv, bn), _kernel(pool)
        return cls(f(blk.conv1, blk.bn1), f(blk.conv2, blk.bn2), f(blk.conv3, blk.bn3), _kernel(blk.avgpool),
                   down, down_pool)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(_pool(x, self.down_pool))
        out = F.relu(self.c1(x))
        out = F.relu(self.c2(out))
        out = self.c3(_pool(out, self.pool))
        return F.relu(out + identity)


@dataclass
class AttnPoolWeights:
    """``AttentionPool2d`` for query 0 only: the one pooled output; keys and values use every token."""

    heads: int
    pos: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor
    kv_w: torch.Tensor  # k_proj and v_proj stacked: one GEMM
    kv_b: torch.Tensor
    c_w: torch.Tensor
    c_b: torch.Tensor

    @classmethod
    def of(cls, pool: nn.Module, device: torch.device, dtype: torch.dtype) -> AttnPoolWeights:
        c = lambda p: _copy(p, device, dtype)  # noqa: E731
        return cls(
            pool.num_heads, c(pool.positional_embedding), c(pool.q_proj.weight), c(pool.q_proj.bias),
            c(torch.cat([pool.k_proj.weight, pool.v_proj.weight])), c(torch.cat([pool.k_proj.bias, pool.v_proj.bias])),
            c(pool.c_proj.weight), c(pool.c_proj.bias),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hd = c // self.heads
        t = x.flatten(2).transpose(1, 2)  # [B, HW, C] (a view of a channels_last map)
        t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1) + self.pos  # [B, HW+1, C]
        q = F.linear(t[:, :1], self.q_w, self.q_b).view(b, 1, self.heads, hd).transpose(1, 2)  # [B, H, 1, hd]
        kv = F.linear(t, self.kv_w, self.kv_b).view(b, h * w + 1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1])  # [B, H, 1, hd]
        return F.linear(a.transpose(1, 2).reshape(b, c), self.c_w, self.c_b)  # [B, output_dim]


class FoldedResNet:
    """:class:`~priorclip.layers.resnet.ModifiedResNet` with folded BatchNorm, channels_last: [B,3,S,S] -> [B,E]."""

    def __init__(self, net: ModifiedResNet, device: torch.device, dtype: torch.dtype) -> None:
        f = lambda conv, bn: FoldedConv.fold(conv, bn, device, dtype)  # noqa: E731
        self.stem = [f(net.conv1, net.bn1), f(net.conv2, net.bn2), f(net.conv3, net.bn3)]
        self.stem_pool = _kernel(net.avgpool)
        self.blocks = [BottleneckWeights.of(blk, device, dtype)
                       for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for blk in layer]
        self.attnpool = AttnPoolWeights.of(net.attnpool, device, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for conv in self.stem:
            x = F.relu(conv(x))
        x = _pool(x, self.stem_pool)
        for blk in self.blocks:
            x = blk(x)
        return self.attnpool(x)


# ------------------------------------------------------------------------------------------- the encoder


class FusedEncoder(GraphedImageEncoder):
    """Inference-only PriorCLIP encoder (module docstring): embeddings [B, E] float32, L2-normalised, on ``device``.

    Args:
        model: the PriorCLIP model; its weights are copied (BatchNorm folded with its running statistics).
        device: where the engine runs.
        dtype: float32, float16 or bfloat16: the dtype of the weights and activations (the gate computes in float32).
        cuda_graphs: on CUDA, capture and replay one CUDA graph per (tower, batch size[, text length bucket]).
        project_in_kernel: apply the prior projection inside the stem-gate launch (one launch) rather than as a
            GEMM before it; which is faster depends on the batch (``python -m priorclip.benchmarks.kernels`` times
            both: ``fused`` and ``fused+proj``).
        fused_norms: each residual add and the LayerNorm after it as one kernel (:func:`encoder_stack`); off by
            default until the kernel benchmark shows it beating the library on a GPU.
        fp8: an :class:`~priorclip.serve.fp8.Fp8Config` (dtype must be bfloat16): calibrate on its images, then run
            the ViT linears and the prior's 1x1 convolutions as FP8 GEMMs; :attr:`fp8` is then the layer report.
    """

    def __init__(self, model: PriorCLIP, device: str | torch.device, dtype: torch.dtype,
                 cuda_graphs: bool = True, project_in_kernel: bool = True, fp8: Fp8Config | None = None,
                 fused_norms: bool = False) -> None:
        if model.cfg.family != FAMILY_PRIORCLIP:  # PIR has its own: serve/fused_pir.py
            raise PriorCLIPError(f"the fused engine runs the open-domain PriorCLIP only, not {model.cfg.name!r} "
                                 f"(family {model.cfg.family}); use the torch, torch-compile or exported engines")
        if dtype not in _DTYPES:
            raise ValueError(f"FusedEncoder dtype must be one of {_DTYPES}, got {dtype}")
        if fp8 is not None and dtype != torch.bfloat16:
            raise ValueError(f"FusedEncoder fp8 runs with dtype bfloat16 (its GEMMs write bf16), got {dtype}")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype = dev, dtype
        cfg = model.cfg
        self.config = cfg
        self.image_size = cfg.vision.image_size
        self.context_length = cfg.text.context_length
        self.embed_dim = cfg.embed_dim
        self.text_buckets = tuple(sorted({min(b, self.context_length) for b in TEXT_LENGTH_BUCKETS}
                                         | {self.context_length}))
        c = lambda p: _copy(p, dev, dtype)  # noqa: E731

        v = model.visual
        self.gate = v.gate
        self.patch_size = cfg.vision.patch_size
        self.conv1 = c(v.conv1.weight)
        self.class_embedding, self.vis_pos = c(v.class_embedding), c(v.positional_embedding)
        self.ln_pre = (c(v.ln_pre.weight), c(v.ln_pre.bias), v.ln_pre.eps)
        self.vis_blocks = [BlockWeights.of(b, dev, dtype) for b in v.transformer.resblocks]
        self.ln_post = (c(v.ln_post.weight), c(v.ln_post.bias), v.ln_post.eps)
        self.vis_proj = c(v.proj)
        self.prior = FoldedResNet(model.res_visual, dev, dtype) if model.has_prior else None
        self.prior_proj = (c(model.vision_proj_res.weight), c(model.vision_proj_res.bias)) if model.has_prior else None
        self.project_in_kernel = project_in_kernel
        self.fused_norms = fused_norms

        self.token_embedding, self.text_pos = c(model.token_embedding.weight), c(model.positional_embedding)
        self.text_blocks = [BlockWeights.of(b, dev, dtype) for b in model.transformer.resblocks]
        self.ln_final = (c(model.ln_final.weight), c(model.ln_final.bias), model.ln_final.eps)
        self.text_projection = c(model.text_projection)

        # What stem_gate will dispatch to for this device and dtype (for the engine's metadata).
        self.kernels = "fused" if fused_enabled(torch.empty(0, device=dev, dtype=dtype)) else "reference"
        self._graphs = GraphCache(dev, cuda_graphs)
        self.cuda_graphs = self._graphs.enabled
        self.fp8: dict | None = None  # the FP8 layer report (serve/fp8.py), when built with fp8
        if fp8 is not None:  # before any graph capture: calibration runs the eager bf16 forward
            from priorclip.serve.fp8 import apply_fp8

            self.fp8 = apply_fp8(self, model, fp8)

    # ---------------------------------------------------------------------------------------------- forwards

    def _image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = pixels.shape[0]
        patches = F.conv2d(pixels, self.conv1, stride=self.patch_size).flatten(2).transpose(1, 2)  # [B, N, D]
        if self.prior is None:
            x = torch.cat([self.class_embedding.expand(b, 1, -1), patches], dim=1) + self.vis_pos
            x, order = _ln(x, self.ln_pre), None
        else:
            prior, proj = self.prior(pixels), self.prior_proj  # [B, E] features and their projection to width D
            if not self.project_in_kernel:
                prior, proj = F.linear(prior, *proj), (None, None)
            x, order = stem_gate(patches, self.class_embedding, self.vis_pos, *self.ln_pre, prior, *proj, self.gate,
                                 self.dtype, "auto")  # [B, T+1, D], row 0 = prior
        x = encoder_stack(x, self.vis_blocks, fused_norms=self.fused_norms)  # [B, D]: token 0, the pooled one
        feats = _ln(x, self.ln_post) @ self.vis_proj
        return F.normalize(feats.float(), dim=-1), order

    def _text_forward(self, tokens: torch.Tensor, eot: torch.Tensor) -> tuple[torch.Tensor]:
        x = F.embedding(tokens, self.token_embedding) + self.text_pos[: tokens.shape[1]]
        x = encoder_stack(x, self.text_blocks, True, eot, self.fused_norms)  # [B, W]: the EOT row, the pooled one
        feats = _ln(x, self.ln_final) @ self.text_projection
        return (F.normalize(feats.float(), dim=-1),)

    # ---------------------------------------------------------------------------------------------- Encoder API
    # (encode_images and encode_images_with_order: GraphedImageEncoder's)

    @torch.inference_mode()
    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L<=context] integer token ids (EOT = the largest id of a row) -> [B, E] float32."""
        ctx = self.context_length
        if (tokens.dim() != 2 or not 0 < tokens.shape[1] <= ctx
                or tokens.dtype not in (torch.int64, torch.int32)):
            raise ValueError(
                f"encode_texts expects integer token ids [B,1<=L<={ctx}], got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if tokens.shape[0] == 0:
            return torch.empty(tokens.shape[0], self.embed_dim, device=self.device)
        tokens = tokens.to(self.device, torch.int64)
        eot = tokens.argmax(dim=-1)  # [B]
        n = next(b for b in self.text_buckets if b > int(eot.max()))  # rows after the last EOT never matter
        tokens = tokens[:, :n] if tokens.shape[1] >= n else F.pad(tokens, (0, n - tokens.shape[1]))
        return self._graphs.run(("text", tokens.shape[0], n), self._text_forward, tokens, eot)[0]
