"""FP8 (e4m3) GEMMs for the fused engine's image path, with static activation scales from calibration.

What runs in FP8 (spec §8A: the prior ResNet is 56 % of the image FLOPs, and its 1x1 convolutions in channels_last are
plain GEMMs): every ViT block's linears (qkv, or q and kv in the pruned last block; out; fc; proj) and the prior's
bottleneck conv1, conv3 and downsample convolutions. The patch embedding, 3x3 and stem convolutions, attention pool,
prior projection, stem gate, LayerNorms and the whole text tower stay bf16.

Numerics: weights are e4m3 with one scale per output channel (row amax / 448), quantised once from the fp32 weights
(BN folded in float64); activations are e4m3 with one static scale per tensor (calibrated amax / 448: static, so
CUDA graphs hold it), saturated at ±448. The GEMM is ``torch._scaled_mm`` with rowwise scales and bf16 output (Ada /
Hopper on CUDA; the CPU build emulates it, for tests and dry runs); the bias is added in bf16.

Layer names (for ``keep`` patterns and the report): ``vit.<i>.{qkv,q,kv,out,fc,proj}``,
``prior.layer<L>.<j>.{conv1,conv3,down}``.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from priorclip.data import image_label, spread_indices
from priorclip.export.amax import HIST_BINS, METHODS, TensorStats, abs_hist, choose_amax
from priorclip.kernels.fp8_quant import E4M3, E4M3_MAX, quantize_fp8
from priorclip.serve.fused import FoldedConv

CALIB_IMAGES = 256
CALIB_BATCH = 16


@dataclass(frozen=True)
class Fp8Config:
    """How to build the FP8 image path.

    Args:
        calib: calibration images: a :class:`~priorclip.data.RetrievalSet` (anything with ``.images`` paths).
        method: ``minmax`` (default: e4m3's exponent grid has the range), ``percentile`` or ``entropy``.
        keep: fnmatch patterns of layer names (module docstring) that stay bf16, e.g. ``("vit.11.*",)``.
        max_images: calibrate on at most this many images, spread over the scene classes.
        batch_size: calibration batch size (bounds the memory of a pass).
    """

    calib: Any
    method: str = "minmax"
    keep: tuple[str, ...] = ()
    max_images: int = CALIB_IMAGES
    batch_size: int = CALIB_BATCH


@functools.lru_cache(maxsize=None)
def fp8_unsupported(device: str) -> str | None:
    """Why FP8 GEMMs cannot run on ``device`` (a str, for the cache), or None."""
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no torch._scaled_mm / float8_e4m3fn"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        cap = torch.cuda.get_device_capability(dev)
        if cap < (8, 9):
            name = torch.cuda.get_device_name(dev)
            return f"FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper); {name} is {cap[0]}.{cap[1]}"
    try:  # the exact call the layers make, once
        Fp8Linear(torch.ones(16, 16), None, 1.0).to(dev)(torch.ones(1, 16, device=dev, dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001 - any failure means this torch/device pair cannot run it
        return f"torch._scaled_mm (rowwise scales, bf16 out) fails on {dev}: {type(e).__name__}: {e}".splitlines()[0]
    return None


def shape_unsupported(k: int, n: int) -> str | None:
    """cuBLASLt's FP8 GEMM needs K and N multiples of 16. Applied on every device so a CPU plan is the CUDA plan."""
    if k % 16 or n % 16:
        return f"shape K={k} N={n}: FP8 GEMMs need K and N multiples of 16"
    return None


class Fp8Linear:
    """``x W^T + b`` with W and x in e4m3: W per output channel (scale [1, N]), x per tensor (static, calibrated).

    x [..., K] -> [..., N] in ``out_dtype`` (bf16). ``amax``: the calibrated |x| bound; larger inputs saturate.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, amax: float,
                 out_dtype: torch.dtype = torch.bfloat16) -> None:
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        w_scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # zero rows stay 0
        self.w_q = (w / w_scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()  # [N, K] row-major
        self.w_scale = w_scale.view(1, -1).contiguous()  # [1, N] fp32
        self.amax = float(amax)
        self.x_scale = torch.tensor([[self.amax / E4M3_MAX]], dtype=torch.float32, device=w.device)  # [1, 1]
        self.bias = None if bias is None else bias.detach().to(out_dtype)
        self.out_dtype = out_dtype

    def to(self, device: torch.device) -> Fp8Linear:
        for k in ("w_q", "w_scale", "x_scale", "bias"):
            if getattr(self, k) is not None:
                setattr(self, k, getattr(self, k).to(device))
        return self

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> e4m3 x / x_scale, saturated: one Triton pass on CUDA (``priorclip.kernels.fp8_quant``)."""
        return quantize_fp8(x.contiguous(), self.x_scale)

    def dequantized_weight(self) -> torch.Tensor:
        return self.w_q.float() * self.w_scale.t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0:  # cuBLASLt rejects empty operands
            return x.new_zeros((*lead, self.out_features), dtype=self.out_dtype)
        scale_a = self.x_scale.expand(m, 1).contiguous()  # rowwise scaling wants [M, 1] (contiguous)
        y = torch._scaled_mm(self.quantize(x2), self.w_q.t(), scale_a=scale_a, scale_b=self.w_scale,
                             out_dtype=self.out_dtype)  # w_q.t(): [K, N] column-major, as cuBLASLt wants
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


class Fp8Conv1x1:
    """A 1x1, stride-1 convolution of a channels_last map as an FP8 GEMM over its [B*H*W, C] view (no copy)."""

    def __init__(self, linear: Fp8Linear) -> None:
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # NHWC view -> [B, N, H, W] channels_last


# ------------------------------------------------------------------------------------------- plan and calibration


@dataclass
class _Site:
    """One GEMM of the engine that may go FP8: where it lives and where its fp32 weights come from."""

    name: str
    owner: Any  # the BlockWeights / BottleneckWeights holding it
    attr: str
    conv: bool  # a 1x1 convolution of a channels_last map (else a linear over [..., K])
    source: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]  # fp32 (weight [N, K], bias [N])


def _sites(enc, model) -> list[_Site]:
    sites = []
    blocks = model.visual.transformer.resblocks
    for i, (blk, p) in enumerate(zip(blocks, enc.vis_blocks)):
        d = blk.attn.out_proj.in_features
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        src = {"qkv": lambda w=w, b=b: (w, b), "q": lambda w=w, b=b, d=d: (w[:d], b[:d]),
               "kv": lambda w=w, b=b, d=d: (w[d:], b[d:])}
        for key, mod in (("out", blk.attn.out_proj), ("fc", blk.mlp.c_fc), ("proj", blk.mlp.c_proj)):
            src[key] = lambda mod=mod: (mod.weight, mod.bias)
        used = ("q", "kv") if i == len(blocks) - 1 else ("qkv",)  # the pruned last block uses the split pair
        sites += [_Site(f"vit.{i}.{k}", p, k, False, src[k]) for k in (*used, "out", "fc", "proj")]
    if enc.prior is not None:
        net, cpu = model.res_visual, torch.device("cpu")
        bottlenecks = [(f"layer{li}.{j}", blk) for li, layer in enumerate((net.layer1, net.layer2, net.layer3,
                                                                             net.layer4), 1)
                       for j, blk in enumerate(layer)]
        for (name, blk), p in zip(bottlenecks, enc.prior.blocks):
            convs = [("conv1", "c1", blk.conv1, blk.bn1), ("conv3", "c3", blk.conv3, blk.bn3)]
            if blk.downsample is not None:
                convs.append(("down", "down", blk.downsample[1], blk.downsample[2]))
            for label, attr, conv, bn in convs:
                if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0):
                    continue  # not a plain GEMM over the map

                def source(conv=conv, bn=bn):
                    f = FoldedConv.fold(conv, bn, cpu, torch.float32)  # folded in float64, then fp32
                    return f.weight[:, :, 0, 0], f.bias

                sites.append(_Site(f"prior.{name}.{label}", p, attr, True, source))
    return sites


class _Recorder:
    """Calibration stand-in for a GEMM: gathers its input's statistics, then runs the bf16 GEMM."""

    def __init__(self, inner: Callable, stats: TensorStats) -> None:
        self.inner, self.stats, self.hist = inner, stats, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stats
        if self.hist:
            s.hist += abs_hist(x.float().cpu().numpy(), s.absmax if s.absmax > 0 else 1.0)
        else:
            lo, hi = (float(v) for v in torch.aminmax(x))
            s.amin, s.amax = min(s.amin, lo), max(s.amax, hi)
            s.absmax = max(s.absmax, abs(lo), abs(hi))
        return self.inner(x)


def calibration_paths(calib: Any, max_images: int) -> list:
    """At most ``max_images`` of ``calib.images``, spread over the scene classes (never "the first N")."""
    paths = list(calib.images)
    return [paths[i] for i in spread_indices([image_label(p) for p in paths], max_images)]


def calibrate(enc, sites: list[_Site], paths: list, method: str, batch_size: int) -> dict[str, TensorStats]:
    """|x| statistics of each site's input over the images, from the eager bf16 forward (no CUDA graphs).

    Streaming: one batch of pixels and running statistics at a time; histogram methods take a second pass (their
    range is the first pass's absmax), decoding the images again rather than holding them.
    """
    from priorclip.retrieval import iter_image_batches
    from priorclip.transforms import EvalTransform

    stats = {s.name: TensorStats() for s in sites}
    recorders = [_Recorder(getattr(s.owner, s.attr), stats[s.name]) for s in sites]
    for s, r in zip(sites, recorders):
        setattr(s.owner, s.attr, r)
    try:
        for hist in (False, True) if method in ("percentile", "entropy") else (False,):
            for r in recorders:
                r.hist = hist
                if hist:
                    r.stats.hist = np.zeros(HIST_BINS, dtype=np.float64)
            with torch.inference_mode():
                for pixels in iter_image_batches(paths, EvalTransform(enc.image_size), batch_size):
                    enc._image_forward(pixels.to(enc.device, enc.dtype))
    finally:
        for s, r in zip(sites, recorders):
            setattr(s.owner, s.attr, r.inner)
    return stats


def apply_fp8(enc, model, cfg: Fp8Config) -> dict:
    """Calibrate ``enc`` (a bf16 :class:`~priorclip.serve.fused.FusedEncoder`) and swap its chosen GEMMs for FP8 ones.

    Returns the layer report: per layer its GEMM shape, ``fp8`` or ``bf16`` (with why), and its activation amax.
    """
    if cfg.method not in METHODS:
        raise ValueError(f"unknown calibration method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if (reason := fp8_unsupported(str(enc.device))) is not None:
        raise ValueError(f"FP8 cannot run on {enc.device}: {reason}")
    sites = _sites(enc, model)
    unmatched = [p for p in cfg.keep if not any(fnmatch.fnmatchcase(s.name, p) for s in sites)]
    if unmatched:
        raise ValueError(f"fp8 keep pattern(s) {unmatched} match no FP8 layer (names: vit.<i>.<qkv|q|kv|out|fc|proj>,"
                         f" prior.layer<L>.<j>.<conv1|conv3|down>)")
    paths = calibration_paths(cfg.calib, cfg.max_images)
    if not paths:
        raise ValueError("fp8 calibration set has no images")
    stats = calibrate(enc, sites, paths, cfg.method, cfg.batch_size)

    layers = []
    for s in sites:
        w, b = s.source()
        n, k = w.shape
        amax = choose_amax(stats[s.name], cfg.method)
        keep = next((p for p in cfg.keep if fnmatch.fnmatchcase(s.name, p)), None)
        reason = f"keep pattern {keep!r}" if keep else shape_unsupported(k, n)
        if reason is None:
            lin = Fp8Linear(w.detach().to(enc.device, torch.float32), b, amax).to(enc.device)
            setattr(s.owner, s.attr, Fp8Conv1x1(lin) if s.conv else lin)
        layers.append({"name": s.name, "k": k, "n": n, "gemm": "bf16" if reason else "fp8", "reason": reason,
                       "amax": amax, "absmax": stats[s.name].absmax})
    for i, p in enumerate(enc.vis_blocks):  # the slots no forward calls; they pin the bf16 in-projection
        for attr in ("qkv",) if i == len(enc.vis_blocks) - 1 else ("q", "kv"):
            setattr(p, attr, None)
    fp8 = [x["name"] for x in layers if x["gemm"] == "fp8"]
    return {
        "format": "e4m3 (float8_e4m3fn), weights per output channel, activations per tensor (static)",
        "gemm": "torch._scaled_mm rowwise scales, bf16 out" + (" (CPU emulation)" if enc.device.type == "cpu" else ""),
        "calibration": {"method": cfg.method, "images": len(paths), "batch_size": cfg.batch_size,
                        "source": getattr(cfg.calib, "source", "") or type(cfg.calib).__name__},
        "keep": list(cfg.keep),
        "fp8_layers": fp8,
        "bf16_layers": {x["name"]: x["reason"] for x in layers if x["gemm"] == "bf16"},
        "layers": layers,
    }
