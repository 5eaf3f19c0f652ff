"""PriorCLIP: remote-sensing image-text retrieval with a visual prior (Pan et al., PIR / PriorCLIP)."""

from priorclip.config import GATES, ModelConfig, PriorConfig, TextConfig, VisionConfig
from priorclip.errors import CheckpointError, DataError, PriorCLIPError
from priorclip.registry import DEFAULT_MODEL, create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = [
    "GATES",
    "DEFAULT_MODEL",
    "CheckpointError",
    "DataError",
    "ModelConfig",
    "PriorCLIPError",
    "PriorConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_config",
    "list_models",
]
