"""Pieces shared by every click CLI of the product (``priorclip``, ``priorclip-export``, ``priorclip-bench``).

User mistakes (:class:`PriorCLIPError`, a bad option value) end as one ``Error: ...`` line and exit code 1 or 2, never a
traceback; bugs still show theirs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

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


MASK_PADDING_KEY = "priorclip.mask_padding"  # where --mask-padding leaves its value for build_model (click's ctx.meta)


def model_options(fn: Callable) -> Callable:
    """--model / --checkpoint / --gate / --mask-padding, shared by every command that builds a model.

    --mask-padding is not passed to the command: it is stored in click's context and read by :func:`build_model`, so
    every command that builds a model honours it without carrying it through its own signature.
    """
    from priorclip.config import GATES
    from priorclip.registry import DEFAULT_MODEL

    fn = click.option(
        "--mask-padding",
        is_flag=True,
        expose_value=False,
        callback=lambda ctx, _param, value: ctx.meta.__setitem__(MASK_PADDING_KEY, value),
        help="PIR only: mask [PAD] tokens in BERT and LCA, so a caption's embedding no longer depends on its batch. "
        "The released PIR checkpoints were trained attending to padding (the default).",
    )(fn)
    fn = click.option(
        "--gate",
        type=click.Choice(GATES),
        default=None,
        help="Open-domain PriorCLIP only: belief-gate formula (official checkpoints do not record it): "
        "'belief+rank' (reference code since 2024-10-16, the default) or '2belief' (earlier code).",
    )(fn)
    fn = click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Weights: an official PriorCLIP .pt or PIR checkpoint_best.pth, or a priorclip checkpoint "
        "(.pt/.safetensors, which carries its config). Without it the model has random weights (seed 0).",
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

    from priorclip.checkpoint import read_checkpoint
    from priorclip.config import FAMILY_PIR
    from priorclip.registry import create_model, model_config

    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None  # read once, for the check and the load
    ctx = click.get_current_context(silent=True)
    mask_padding = bool(ctx and ctx.meta.get(MASK_PADDING_KEY))
    overrides = {"gate": gate} if gate else {}
    if mask_padding:
        overrides["mask_padding"] = True
    if overrides:  # each option belongs to one family: refuse it for the other in one line, not a TypeError
        cfg = model_config(model_name, ckpt)
        wrong = "--gate" if gate and cfg.family == FAMILY_PIR else "--mask-padding" if mask_padding and \
            cfg.family != FAMILY_PIR else None
        if wrong:
            raise PriorCLIPError(f"{wrong} does not apply to model {cfg.name!r} ({'PIR' if wrong == '--gate' else 'open-domain PriorCLIP'})")
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return create_model(model_name, **overrides)
    return create_model(model_name, checkpoint=ckpt, **overrides)


# Output files. A long run must not find out at its end that it cannot write its result, and a run stopped while
# writing must not leave a half file under the final name: commands check every output path before the work
# (check_output_file / check_output_dir), write through atomic_write (a temporary file beside the target, then
# os.replace), and create folders with output_dir, which removes them again if the run fails while they are empty.


def check_output_file(path: str | Path, suffix: str | None = None, option: str | None = None) -> Path:
    """The exact path a writer will create for ``path``, checked before any work; creates nothing.

    ``suffix`` is appended when the name does not end with it, as ``np.save`` (``.npy``) and ``np.savez`` (``.npz``)
    do, so the path returned is the one written and printed. The path must not be a folder, and its folder must exist
    and take new files, or be creatable in the nearest existing folder. ``option`` (e.g. ``"--out"``) prefixes the
    error. Raises :class:`PriorCLIPError`.
    """
    path = Path(path)
    if suffix and not path.name.endswith(suffix):
        path = path.with_name(path.name + suffix)
    where = f"{option}: " if option else ""
    if path.is_dir():
        raise PriorCLIPError(f"{where}cannot write {path}: it is a folder")
    try:
        _check_creatable(path.parent)
    except PriorCLIPError as e:
        raise PriorCLIPError(f"{where}cannot write {path}: {e}") from None
    return path


def check_output_dir(path: str | Path, option: str | None = None) -> Path:
    """Check, before any work and without creating anything, that folder ``path`` exists and takes new files or can
    be created. Raises :class:`PriorCLIPError`."""
    path = Path(path)
    try:
        _check_creatable(path)
    except PriorCLIPError as e:
        raise PriorCLIPError(f"{option + ': ' if option else ''}output folder {path} is not writable: {e}") from None
    return path


def _check_creatable(folder: Path) -> None:
    """Raise :class:`PriorCLIPError` (the reason alone) unless ``folder`` takes files or can be created: the nearest
    existing folder on its way must accept a new entry (probed with a real file, which also catches read-only mounts
    and ACLs that ``os.access`` misses)."""
    existing = folder
    try:
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise PriorCLIPError(f"{existing} is a file, not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".priorclip-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PriorCLIPError(f"cannot create files in {existing} ({e.strerror or e})") from None


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders this call created, outermost first. Raises :class:`PriorCLIPError`
    (the reason alone)."""
    missing: list[Path] = []
    created: list[Path] = []
    try:
        p = path
        while not p.exists() and p.parent != p:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            p = d
            try:
                d.mkdir()
                created.append(d)
            except FileExistsError:
                if not d.is_dir():
                    raise
    except OSError as e:
        _remove_empty(created)
        raise PriorCLIPError(f"cannot create folder {p} ({e.strerror or e})") from None
    return created


def _remove_empty(created: list[Path]) -> None:
    # rmdir refuses a folder that holds anything, so nothing written there (by us or anyone else) is ever lost
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def output_dir(path: str | Path) -> Iterator[Path]:
    """Create folder ``path`` (and missing parents) and check it takes files; if the block fails (any exception, Ctrl-C
    included) the folders this call created are removed again while they are still empty, so a failed run leaves no
    empty output folder behind. A folder that existed before is left as it was. Raises :class:`PriorCLIPError`."""
    path = Path(path)
    created: list[Path] = []
    try:
        created = _make_dirs(path)
        _check_creatable(path)
    except PriorCLIPError as e:
        _remove_empty(created)
        raise PriorCLIPError(f"output folder {path} is not writable: {e}") from None
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.<name>.<random>.tmp``, an empty file) to write into; it becomes
    ``path`` (``os.replace``) only when the block completes. A failed or interrupted write never leaves a partial file
    under the final name, and the temporary file is removed whatever happens (as are folders created for it while
    empty). An ``OSError`` (disk full, read-only) becomes one :class:`PriorCLIPError` line naming ``path``.
    """
    path = Path(path)
    try:
        created = _make_dirs(path.parent)
    except PriorCLIPError as e:
        raise PriorCLIPError(f"cannot write {path}: {e}") from None
    tmp = None
    done = False
    try:
        try:
            tmp = _new_temp_file(path)
            yield tmp
            os.replace(tmp, path)
            done = True
        except OSError as e:
            raise PriorCLIPError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if not done:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            _remove_empty(created)


def _new_temp_file(path: Path) -> Path:
    # O_EXCL with mode 0o666: a fresh name (two writers never share one) whose permissions follow the umask like any
    # other output file (tempfile.mkstemp would make it 0o600)
    while True:
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_npy(path: str | Path, array: Any) -> Path:
    """``np.save`` to exactly ``path`` (no ``.npy`` appended: normalise with :func:`check_output_file`), atomically."""
    import numpy as np

    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return path


def write_npz(path: str | Path, **arrays: Any) -> Path:
    """``np.savez`` to exactly ``path`` (no ``.npz`` appended: normalise with :func:`check_output_file`), atomically."""
    import numpy as np

    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
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
