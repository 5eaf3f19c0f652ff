"""Parameter and FLOP counts per tower, measured on the model itself (meta tensors: nothing is allocated).

FLOPs are torch's ``FlopCounterMode`` counts (2 x MAC of matmuls, convolutions and attention) for one item: an image at
the model's size, a caption at the full context length (77 tokens, the reference's fixed length).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from priorclip.config import ModelConfig
from priorclip.model import PriorCLIP


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def profile_config(cfg: ModelConfig) -> dict[str, float]:
    with torch.device("meta"):
        model = PriorCLIP(cfg).eval()
    model.trim_text = False  # the data-dependent trim cannot run on meta tensors; count the full context
    params = {
        "vision": sum(p.numel() for p in model.visual.parameters()),
        "prior": sum(p.numel() for n, p in model.named_parameters() if n.startswith(("res_visual.", "vision_proj_res."))),
    }
    params["text"] = sum(p.numel() for p in model.parameters()) - params["vision"] - params["prior"]
    params["total"] = sum(params.values())
    s, ctx = cfg.vision.image_size, cfg.text.context_length
    pixels = torch.empty(1, 3, s, s, device="meta")
    tokens = torch.zeros(1, ctx, dtype=torch.long, device="meta")
    with torch.no_grad():
        img_flops = _count(lambda: model.encode_image(pixels))
        prior_flops = _count(lambda: model.prior_token(pixels)) if model.has_prior else 0
        txt_flops = _count(lambda: model.encode_text(tokens))
    return {
        **{f"params_{k}": v for k, v in params.items()},
        "gflop_image": img_flops / 1e9,
        "gflop_image_prior": prior_flops / 1e9,
        "gflop_text": txt_flops / 1e9,
    }
