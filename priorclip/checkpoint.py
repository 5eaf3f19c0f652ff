"""Reading, strictly loading and saving checkpoints.

Accepted layouts (spec §5A, §9.11): a bare state dict, open_clip's ``{"state_dict": ..., "epoch": ...}`` wrapper,
``module.``-prefixed keys from DDP, and our own files, which add ``"config"`` (a :class:`ModelConfig` dict). Files are
read with ``torch.load(weights_only=True)`` or safetensors, so a checkpoint can never run code on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from priorclip.config import ModelConfig
from priorclip.errors import CheckpointError

FORMAT = "priorclip-checkpoint/1"
_LIST_LIMIT = 8  # keys named in one error line before "... and N more"


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: ModelConfig | None = None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # everything else in the file (epoch, optimizer, ...)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file into a :class:`Checkpoint` (no model needed). Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        obj, config = _read_safetensors(path)
    else:
        obj, config = _read_torch(path), None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extra = {k: v for k, v in obj.items() if k != "state_dict"}
        sd = obj["state_dict"]
    else:
        extra, sd = {}, obj
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors or a 'state_dict' entry)")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {_names(bad)}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    cfg_dict = extra.pop("config", None) if config is None else config
    if cfg_dict is not None:
        try:
            config = ModelConfig.from_dict(cfg_dict)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: embedded model config is invalid: {e}") from None
    return Checkpoint(sd, config, path, extra)


def _read_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the weights-only unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().split(". ")[0].splitlines()[0][:200]
        if "Unsupported global" in detail:
            raise CheckpointError(
                f"{path}: refused to unpickle: the file references code objects ({detail}); only tensors and plain "
                "containers are loaded, so re-save its state_dict"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    except Exception as e:  # torch.load surfaces zip, struct, EOF and runtime errors for damaged files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg[:200]})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("reading .safetensors needs the 'safetensors' package: pip install safetensors") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed file
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
    cfg = json.loads(meta["priorclip_config"]) if "priorclip_config" in meta else None
    return sd, cfg


def load_checkpoint(model: nn.Module, ckpt: Checkpoint | str | Path) -> nn.Module:
    """Load strictly: every key present, none extra, every shape equal; otherwise one error line naming them."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = read_checkpoint(ckpt)
    expected = model.state_dict()
    sd = ckpt.state_dict
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} {list(sd[k].shape)} vs model {list(v.shape)}" for k, v in expected.items() if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_names(mismatched)}")
    if problems:
        where = ckpt.path or "checkpoint"
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        raise CheckpointError(f"{where} does not fit model {name!r}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model


def save_checkpoint(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save weights with the model config embedded (``.safetensors`` or torch format), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, tmp, metadata={"priorclip_config": json.dumps(cfg.to_dict()), "format": FORMAT})
        else:
            torch.save({"state_dict": sd, "config": cfg.to_dict(), "format": FORMAT, **extra}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")
