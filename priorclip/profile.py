"""Parameter and FLOP counts per tower, measured on the model itself (meta tensors: nothing is allocated).

FLOPs are torch's ``FlopCounterMode`` counts (2 x MAC of matmuls, convolutions and attention) for one item: an image at
the model's size, a caption at the full context length (77 CLIP tokens, the reference's fixed length; PIR's 47, its
longest: PIR's cost grows with its batch's longest caption).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from priorclip.config import FAMILY_PIR, AnyConfig

# PIR's parameters by part; the reference's module names (spec §5B lists the same split)
_PIR_PARTS = {
    "vision": ("vision_encoder.", "vision_proj."),
    "prior": ("conv_encoder.", "conv_proj."),
    "text": ("text_encoder.", "text_proj."),
    "vir": ("img_sa.", "img_ca.", "mapping_img.", "head_img."),
    "lca": ("txt_sa.", "txt_ca.", "mapping_txt.", "head_txt."),
}


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _params(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def profile_config(cfg: AnyConfig) -> dict[str, float]:
    """``params_<part>`` and ``params_total``; ``gflop_image``, ``gflop_image_prior`` (the prior's share) and
    ``gflop_text`` per item."""
    s, ctx = cfg.vision.image_size, cfg.text.context_length
    pixels = torch.empty(1, 3, s, s, device="meta")
    tokens = torch.zeros(1, ctx, dtype=torch.long, device="meta")
    if cfg.family == FAMILY_PIR:
        from priorclip.pir import PIR

        with torch.device("meta"):
            model = PIR(cfg).eval()
        params = {part: _params(model, prefixes) for part, prefixes in _PIR_PARTS.items()}
        params["total"] = sum(p.numel() for p in model.parameters())  # the parts plus temp and temp2
        prior = lambda: model.conv_proj(model.conv_encoder(pixels))  # noqa: E731
    else:
        from priorclip.model import PriorCLIP

        with torch.device("meta"):
            model = PriorCLIP(cfg).eval()
        model.trim_text = False  # the data-dependent trim cannot run on meta tensors; count the full context
        params = {
            "vision": sum(p.numel() for p in model.visual.parameters()),
            "prior": _params(model, ("res_visual.", "vision_proj_res.")),
        }
        params["text"] = sum(p.numel() for p in model.parameters()) - params["vision"] - params["prior"]
        params["total"] = sum(params.values())
        prior = (lambda: model.prior_token(pixels)) if model.has_prior else None
    with torch.no_grad():
        img_flops = _count(lambda: model.encode_image(pixels))
        prior_flops = _count(prior) if prior else 0
        txt_flops = _count(lambda: model.encode_text(tokens))
    return {
        **{f"params_{k}": v for k, v in params.items()},
        "gflop_image": img_flops / 1e9,
        "gflop_image_prior": prior_flops / 1e9,
        "gflop_text": txt_flops / 1e9,
        "text_tokens": ctx,
    }
