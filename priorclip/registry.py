"""Named model configs and the one way to build a model: :func:`create_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from priorclip.config import ModelConfig, PriorConfig, TextConfig, VisionConfig

MODELS: dict[str, ModelConfig] = {}
DEFAULT_MODEL = "priorclip-vit-b32"
# open_clip config names of the released checkpoints (the official code registers the model as "PIR")
ALIASES = {"PIR": "priorclip-vit-b32"}


def register(cfg: ModelConfig) -> ModelConfig:
    if cfg.name in MODELS:
        raise ValueError(f"model {cfg.name!r} is already registered")
    MODELS[cfg.name] = cfg
    return cfg


def list_models() -> list[str]:
    return sorted(MODELS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    name = ALIASES.get(name, name)
    if name not in MODELS:
        from priorclip.errors import PriorCLIPError

        raise PriorCLIPError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                             f"(open_clip names: {', '.join(ALIASES)})")
    return MODELS[name].replace(**overrides) if overrides else MODELS[name]


def create_model(name: str | None = None, checkpoint: str | Path | None = None, **overrides: Any):
    """Build a model by name, or from a checkpoint that embeds its config, and load the checkpoint's weights strictly.

    Args:
        name: a registered config name; defaults to the checkpoint's embedded config, else ``priorclip-vit-b32``
            (the layout of the official ``PriorCLIP_RET-3.pt``, which carries no config).
        checkpoint: ``.pt``/``.pth``/``.bin`` (read with ``weights_only=True``) or ``.safetensors``.
        overrides: config fields to replace, e.g. ``gate="2belief"``.

    Returns:
        A :class:`~priorclip.model.PriorCLIP` in eval mode.
    """
    from priorclip.checkpoint import load_checkpoint, read_checkpoint
    from priorclip.model import PriorCLIP

    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    if name is None and ckpt is not None and ckpt.config is not None:
        cfg = ckpt.config.replace(**overrides) if overrides else ckpt.config
    else:
        cfg = get_config(name or DEFAULT_MODEL, **overrides)
    model = PriorCLIP(cfg)
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    return model.eval()


# Open-domain PriorCLIP as released (open_clip config "PIR"): ViT-B/32 + ModifiedResNet-50 prior + CLIP text.
register(ModelConfig(name="priorclip-vit-b32"))
# The same towers without the prior and gate: plain CLIP ViT-B/32, the ablation baseline.
register(ModelConfig(name="clip-vit-b32", prior=None))
# Tiny variants for tests: real vocabulary and context, small widths. 64 px images give a 4x4 patch grid and a
# 2x2 prior feature map.
_TINY_VISION = VisionConfig(image_size=64, patch_size=16, width=64, layers=2, head_width=32)
_TINY_TEXT = TextConfig(width=64, heads=2, layers=2)
register(
    ModelConfig(
        name="priorclip-tiny",
        embed_dim=32,
        vision=_TINY_VISION,
        prior=PriorConfig(layers=(1, 1, 1, 1), width=8, head_width=32),
        text=_TINY_TEXT,
    )
)
register(ModelConfig(name="clip-tiny", embed_dim=32, vision=_TINY_VISION, prior=None, text=_TINY_TEXT))
