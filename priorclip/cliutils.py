"""Pieces shared by every click CLI of the product (``priorclip``, ``priorclip-export``, ``priorclip-bench``).

User mistakes (:class:`PriorCLIPError`, a bad option value) end as one ``Error: ...`` line and exit code 1 or 2, never a
traceback; bugs still show theirs.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import click

from priorclip.errors import PriorCLIPError


class ProductGroup(click.Group):
    """A click group that turns :class:`PriorCLIPError` into a one-line error, and loads some commands lazily.

    ``lazy`` maps a command name to ``"module:attribute"``; the module is imported only when that command runs, so
    ``--help`` and light commands do not pay for heavy imports.
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}  # name -> (import path, short help)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name][0].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, self.commands[n].get_short_help_str(70)) for n in sorted(self.commands)]
        rows += [(n, h) for n, (_, h) in self.lazy.items() if n not in self.commands]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))

    def invoke(self, ctx: click.Context) -> Any:
        return run_user_errors(lambda: super(ProductGroup, self).invoke(ctx))


def run_user_errors(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except PriorCLIPError as e:
        raise click.ClickException(str(e)) from None


def user_errors(fn: Callable) -> Callable:
    """Decorator for a stand-alone click command: :class:`PriorCLIPError` becomes a one-line error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_user_errors(lambda: fn(*args, **kwargs))

    return wrapper


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PriorCLIPError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    return device


def model_options(fn: Callable) -> Callable:
    """--model / --checkpoint / --gate, shared by every command that builds a model."""
    from priorclip.config import GATES
    from priorclip.registry import DEFAULT_MODEL

    fn = click.option(
        "--gate",
        type=click.Choice(GATES),
        default=None,
        help="Belief-gate formula (official checkpoints do not record it): 'belief+rank' (reference code since "
        "2024-10-16, the default) or '2belief' (earlier code).",
    )(fn)
    fn = click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Weights: an official PriorCLIP .pt, or a priorclip checkpoint (.pt/.safetensors, which carries its "
        "config). Without it the model has random weights (seed 0).",
    )(fn)
    fn = click.option(
        "--model",
        "model_name",
        default=None,
        help=f"Registered config name (see 'priorclip info'); default: the checkpoint's own config, else {DEFAULT_MODEL}.",
    )(fn)
    return fn


RANDOM_INIT_SEED = 0


def build_model(model_name: str | None, checkpoint: Path | None, gate: str | None):
    """The model a CLI works on; without a checkpoint its random weights come from a fixed seed, so runs repeat."""
    import torch

    from priorclip.registry import create_model

    overrides = {"gate": gate} if gate else {}
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return create_model(model_name, **overrides)
    return create_model(model_name, checkpoint=checkpoint, **overrides)


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise PriorCLIPError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def ensure_writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PriorCLIPError(f"output folder {path} is not writable: {e.strerror or e}") from None
    return path


def image_count(minimum: int = 1) -> Callable:
    """Click callback for an ``N|all`` option: None stays None (the command's default), ``all`` is 0 (the whole
    split), anything else an integer >= ``minimum``."""

    def parse(ctx, param, value: str | None) -> int | None:
        if value is None:
            return None
        if value.strip().lower() == "all":
            return 0
        try:
            n = int(value)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise click.BadParameter(f"expected an integer >= {minimum} or 'all', got {value!r}")
        return n

    return parse
