"""Named model configs and the one way to build a model: :func:`create_model`."""

from __future__ import annotations

import dataclasses
from typing import Any

from priorclip.config import (FAMILY_PIR, BertConfig, ModelConfig, PIRConfig, PriorConfig, ResNetConfig, SwinConfig, TextConfig,
                              VisionConfig)

MODELS: dict[str, ModelConfig | PIRConfig] = {}
DEFAULT_MODEL = "priorclip-vit-b32"
DEFAULT_PIR_MODEL = "pir-swin-t-bert"
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


def is_pir_state_dict(sd: dict) -> bool:
    """A closed-domain PIR state dict (PIR-pytorch's module names)."""
    return "vision_encoder.patch_embed.proj.weight" in sd and "conv_proj.weight" in sd


# PIR-pytorch YAML settings that change the architecture, and the PIRConfig fields they set
_PIR_SETTINGS = {"embed_dim": "embed_dim", "filter_size": "filter_size", "instru_num": "instru_num",
                 "cycle_num": "cycle_num", "head": "pae_heads", "dropout_r": "pae_dropout"}


def pir_settings(reference: dict[str, Any]) -> dict[str, Any]:
    """PIRConfig overrides from the settings a PIR-pytorch checkpoint records (its ``config`` entry)."""
    out = {ours: reference[theirs] for theirs, ours in _PIR_SETTINGS.items() if theirs in reference}
    if "max_tokens" in reference:
        out["text"] = dataclasses.replace(MODELS[DEFAULT_PIR_MODEL].text, context_length=int(reference["max_tokens"]))
    return out


def model_config(name: str | None = None, ckpt=None, **overrides: Any) -> ModelConfig | PIRConfig:
    """The config :func:`create_model` builds for ``name`` and a read :class:`~priorclip.checkpoint.Checkpoint`."""
    if name is None and ckpt is not None and ckpt.config is not None:
        return ckpt.config.replace(**overrides) if overrides else ckpt.config
    if name is None and ckpt is not None and is_pir_state_dict(ckpt.state_dict):
        ref = ckpt.extra.get("reference_config")
        return get_config(DEFAULT_PIR_MODEL, **{**pir_settings(ref if isinstance(ref, dict) else {}), **overrides})
    return get_config(name or DEFAULT_MODEL, **overrides)


def create_model(name: str | None = None, checkpoint=None, **overrides: Any):
    """Build a model by name, or from a checkpoint that embeds its config, and load the checkpoint's weights strictly.

    Args:
        name: a registered config name; defaults to the checkpoint's embedded config, else ``pir-swin-t-bert`` for
            PIR-pytorch's layout (with the settings its ``config`` entry records), else ``priorclip-vit-b32`` (the
            layout of the official ``PriorCLIP_RET-3.pt``, which carries no config).
        checkpoint: ``.pt``/``.pth``/``.bin`` (read with ``weights_only=True``) or ``.safetensors``, or a
            :class:`~priorclip.checkpoint.Checkpoint` already read.
        overrides: config fields to replace, e.g. ``gate="2belief"``.

    Returns:
        A :class:`~priorclip.model.PriorCLIP` or :class:`~priorclip.pir.PIR` in eval mode.
    """
    from priorclip.checkpoint import Checkpoint, load_checkpoint, read_checkpoint
    from priorclip.model import PriorCLIP
    from priorclip.pir import PIR

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) or checkpoint is None else read_checkpoint(checkpoint)
    cfg = model_config(name, ckpt, **overrides)
    model = (PIR if cfg.family == FAMILY_PIR else PriorCLIP)(cfg)
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

# Closed-domain PIR (ACM MM 2023, PIR-pytorch): Swin-T + frozen torchvision ResNet-50 prior + BERT-base-uncased,
# VIR (Spatial-PAE) and LCA (Temporal-PAE); the layout of the released checkpoint_best.pth.
register(PIRConfig(name="pir-swin-t-bert"))
# Tiny PIR for tests: real BERT vocabulary and 47-token context; 56 px images give a 28-14-7 Swin grid (shifted
# windows in the first two stages, the unshifted full-grid rule in the last), so 50 tokens and a 40-token filter
# as in the full model; a 256-d prior.
register(
    PIRConfig(
        name="pir-tiny",
        embed_dim=32,
        vision=SwinConfig(image_size=56, patch_size=2, embed_dim=16, depths=(2, 2, 2), heads=(1, 2, 4)),
        prior=ResNetConfig(layers=(1, 1, 1, 1), width=8),
        text=BertConfig(width=64, layers=2, heads=2, intermediate=128, max_positions=64),
        pae_heads=2,
    )
)
