"""Reading, strictly loading and saving checkpoints.

Accepted layouts (spec §5A, §5B, §9.11): a bare state dict, open_clip's ``{"state_dict": ..., "epoch": ...}`` wrapper,
PIR-pytorch's ``{"model": ..., "config": <its YAML settings>, ...}`` (optimizer state ignored), ``module.``-prefixed
keys from DDP, and our own files, which add ``"config"`` (a model config dict of either family). Files are
read with ``torch.load(weights_only=True)`` or safetensors, so a checkpoint can never run code on load.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from priorclip.config import AnyConfig, config_from_dict
from priorclip.errors import CheckpointError

FORMAT = "priorclip-checkpoint/1"
_LIST_LIMIT = 8  # keys named in one error line before "... and N more"


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: AnyConfig | None = None
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
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and obj.get("format") is None:
        # PIR-pytorch's checkpoint_best.pth: {"model": state dict, "config": its YAML settings, optimizer, ...}
        extra = {k: v for k, v in obj.items() if k not in ("model", "config")}
        if isinstance(obj.get("config"), dict):
            extra["reference_config"] = obj["config"]
        sd = obj["model"]
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
            config = config_from_dict(cfg_dict)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: embedded model config is invalid: {e}") from None
    return Checkpoint(sd, config, path, extra)


def _read_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the weights-only unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises unpickling, zip, struct, EOF, runtime errors for refused or bad files
        error = e
    # Why it failed is read from the pickle itself, not from torch's message, whose wording changes between versions.
    code = code_references(path)
    if code:
        more = f" and {len(code) - 1} more" if len(code) > 1 else ""
        raise CheckpointError(
            f"{path}: refused: loading it would run code (it references {code[0]}{more}); priorclip loads only "
            "tensors and plain containers: re-save the weights with torch.save(model.state_dict(), PATH)"
        )
    text = str(error).split("WeightsUnpickler error:")[-1].strip()
    detail = (text.splitlines() or [type(error).__name__])[0].split(". ")[0][:200]
    if isinstance(error, pickle.UnpicklingError) and detail.startswith("Weights only load failed"):
        # torch >= 2.6 puts the reason below a generic first line
        lines = [ln.strip() for ln in text.splitlines()[1:]
                 if ln.strip() and not ln.startswith(("Re-running", "Check"))]
        detail = (lines[0] if lines else detail)[:200]
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None


# Globals a weights-only load accepts when torch's own list cannot be read (a torch whose private module moved): only
# tensor and storage rebuilders, dtypes, devices and plain containers. Used only to explain a refusal.
_FALLBACK_ALLOWED = ("collections.OrderedDict", "torch.Size", "torch.device", "torch.dtype", "torch.Tensor",
                     "torch.nn.parameter.Parameter", "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
                     "torch.serialization._get_layout", "torch._tensor._rebuild_from_type_v2", "builtins.set",
                     "builtins.bytearray", "builtins.complex", "_codecs.encode")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_LEGACY_PICKLES = 5  # a non-zip torch file: magic number, protocol, sys info, the object, storage keys; then raw data


def code_references(path: str | Path) -> list[str]:
    """The globals (``module.name``) that the pickle in checkpoint ``path`` references and a weights-only load does not
    allow, in file order; empty when there are none or the file is not a pickle.

    Only parses the opcode stream (:func:`pickletools.genops`); nothing in the file is imported or executed. A torch
    zip checkpoint holds its pickle in ``<archive>/data.pkl``; a legacy (``_use_new_zipfile_serialization=False``) or
    plain pickle file is a raw stream of pickles.
    """
    import pickletools
    import zipfile

    refs: list[str] = []

    def scan(f) -> bool:
        """Add the globals of the pickle at ``f``'s position to ``refs``; False if it ends before its STOP."""
        try:
            for ref in _pickle_globals(pickletools.genops(f)):
                refs.append(ref)
        except Exception:  # damaged or not a pickle: keep what was read before the damage
            return False
        return True

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # legacy torch file or plain pickle
                f.seek(0)
                for _ in range(_LEGACY_PICKLES):  # a damaged one ends the scan: what follows it is not opcodes
                    if not scan(f):
                        break
            elif zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as z:
                    for name in z.namelist():
                        if name == "data.pkl" or name.endswith("/data.pkl"):
                            with z.open(name) as member:
                                scan(member)
            else:  # a cut-off zip has no central directory: find data.pkl through the local file headers
                f.seek(0)
                if (offset := _stored_member(f, "data.pkl")) is not None:
                    f.seek(offset)
                    scan(f)
    except Exception:  # unreadable file: nothing more can be said than torch's error
        pass
    allowed = _weights_only_globals()
    out: list[str] = []
    for r in refs:
        if r not in out and not _allowed(r, allowed):
            out.append(r)
    return out


def _stored_member(f, suffix: str) -> int | None:
    """Offset of the data of the first uncompressed zip member whose name ends with ``suffix`` (torch stores its
    members uncompressed), walking the local file headers from the current position; None when there is none."""
    import struct

    while (head := f.read(30))[:4] == b"PK\x03\x04" and len(head) == 30:
        _, _, flags, method, _, _, _, size, _, name_len, extra_len = struct.unpack("<4sHHHHHIIIHH", head)
        name = f.read(name_len).decode("utf-8", "replace")
        f.seek(extra_len, 1)
        if name.endswith(suffix) and method == 0:
            return f.tell()
        if flags & 0x08:  # size only in a trailing data descriptor: the next header cannot be found from here
            return None
        f.seek(size, 1)
    return None


def _pickle_globals(ops) -> Iterator[str]:
    """Yield every global a pickle opcode stream references: ``GLOBAL``/``INST`` carry ``module name``; ``STACK_GLOBAL``
    takes the two strings on top of the stack, pushed directly or fetched from the memo. The stack is tracked only far
    enough to know those strings: any other opcode leaves an unknown value on top, so a name that cannot be resolved
    is reported as such instead of being guessed."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
    from collections import deque

    pushed: deque[str | None] = deque([None, None], maxlen=2)  # the top of the stack; None: not a known string
    memo: dict[int, str | None] = {}
    for op, arg, _pos in ops:
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            # protocol-2 pickles (torch.save's default) name Python 2 modules; unpicklers map them, so do we
            module, attr = NAME_MAPPING.get((module, attr), (IMPORT_MAPPING.get(module, module), attr))
            yield f"{module}.{attr}"
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = pushed
            yield f"{module}.{attr}" if module is not None and attr is not None else "a global named at load time"
            pushed.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            yield f"copyreg extension {arg}"
            pushed.append(None)
        elif name in _STRING_OPS:
            pushed.append(arg if isinstance(arg, str) else None)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif name not in ("FRAME", "PROTO"):  # neither touches the stack
            pushed.append(None)


def _weights_only_globals() -> set[str]:
    names: set[str] = set()
    try:
        from torch import _weights_only_unpickler as wo

        names |= {k for k in wo._get_allowed_globals() if isinstance(k, str)}
        if hasattr(wo, "_get_user_allowed_globals"):  # torch.serialization.add_safe_globals (torch >= 2.4)
            names |= {k for k in wo._get_user_allowed_globals() if isinstance(k, str)}
    except Exception:  # a private module: its absence only means the fallback list decides
        pass
    return names


def _allowed(name: str, allowed: set[str]) -> bool:
    if name in allowed or name in _FALLBACK_ALLOWED:
        return True
    module, _, attr = name.rpartition(".")
    if module == "torch._utils" and attr.startswith("_rebuild_"):
        return True
    if module in ("torch", "torch.cuda") and attr.endswith("Storage"):
        return True
    # vars(), not getattr(): a name from the file must not trigger one of torch's lazy imports
    return module == "torch" and isinstance(vars(torch).get(attr), torch.dtype)


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
    """Save weights with the model config embedded (``.safetensors`` or torch format), atomically: an interrupted save
    leaves the previous file (or none), never a partial one. Raises :class:`PriorCLIPError` when it cannot write."""
    from priorclip.cliutils import atomic_write

    path = Path(path)
    cfg: AnyConfig = model.cfg
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"priorclip_config": json.dumps(cfg.to_dict()), "format": FORMAT})
        else:
            torch.save({"state_dict": sd, "config": cfg.to_dict(), "format": FORMAT, **extra}, tmp)
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
