"""PriorCLIP: remote-sensing image-text retrieval with a visual prior (Pan et al., PIR / PriorCLIP): the open-domain
PriorCLIP family (``ModelConfig``) and the closed-domain PIR (``PIRConfig``), built by :func:`create_model`."""

from priorclip.config import (
    GATES,
    BertConfig,
    ModelConfig,
    PIRConfig,
    PriorConfig,
    ResNetConfig,
    SwinConfig,
    TextConfig,
    VisionConfig,
)
from priorclip.errors import CheckpointError, DataError, PriorCLIPError
from priorclip.registry import DEFAULT_MODEL, create_model, get_config, list_models

__version__ = "0.1.0"

# open_clip's names (priorclip.factory), imported on first use: they need torch, which `priorclip --help` does not.
_LAZY = {"create_model_and_transforms": "priorclip.factory", "create_model_from_pretrained": "priorclip.factory",
         "get_tokenizer": "priorclip.factory", "tokenize": "priorclip.tokenizer",
         "preprocess_for": "priorclip.preprocess"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'priorclip' has no attribute {name!r}")


__all__ = [
    "GATES",
    "BertConfig",
    "PIRConfig",
    "ResNetConfig",
    "SwinConfig",
    "preprocess_for",
    "DEFAULT_MODEL",
    "CheckpointError",
    "DataError",
    "ModelConfig",
    "PriorCLIPError",
    "PriorConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "create_model_and_transforms",
    "create_model_from_pretrained",
    "get_config",
    "get_tokenizer",
    "list_models",
    "tokenize",
]
