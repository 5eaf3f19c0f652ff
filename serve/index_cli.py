"""``priorclip index build|add|info|search|tune``: a FAISS index of image embeddings (:mod:`priorclip.serve.index`).

Inputs, and the id each item gets (the contract shared with ``priorclip embed``):

- ``--images DIR``: the image files directly inside DIR, read by exactly the rules of ``priorclip embed`` (its
  listing, header checks, pixel limit, page 0 of multi-page files, ``--skip-bad``); id = the path relative to DIR
  (posix), metadata ``path`` (absolute) plus ``page``/``pages`` for multi-page files.
- ``--dataset JSON``: a Karpathy-style dataset file (images under ``--image-root``, default ``images/`` beside it);
  id = the dataset's file name, metadata ``path``, ``captions`` (the raw sentences), ``split`` (and ``label``).
- ``--embeddings OUT.npy`` (repeatable; a folder or a quoted glob takes every ``.npy`` in it): outputs of
  ``priorclip embed`` (possibly ``--shard I/N`` runs), merged without an engine; identity and kind come from each
  ``OUT.meta.json``; ids are webdataset keys or image paths relative to the embedded folder.

Building embeds in chunks saved under ``INDEX/.partial``: a build or add that stops (Ctrl-C, a crash, a killed job)
continues where it stopped when the same command runs again; ``--restart`` discards that work. Items already in the
index are skipped and counted, so re-running an ``add`` or a merge is harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click
import numpy as np

from priorclip.cliutils import (
    MASK_PADDING_KEY,
    ProductGroup,
    check_output_dir,
    model_options,
    output_dir,
    resolve_device,
    write_text,
)
from priorclip.errors import DataError, PriorCLIPError
from priorclip.provenance import IDENTITY_KEYS, check_identity

from .embeddings_merge import read_embeddings
from .index import (
    KINDS,
    MANIFEST,
    PARTIAL,
    PartialWork,
    VectorIndex,
    add_to_index,
    ivf_lists,
    read_manifest,
    set_index_params,
    write_index,
    writer_lock,
)

ENGINE_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")  # priorclip.serve.engines.PRECISIONS (no torch at --help)
SKIPPED = "skipped.txt"  # INDEX/skipped.txt: the files the last build or add left out, with the reason


@dataclass
class Item:
    """One image to index: its id, its file, its metadata."""

    id: str
    path: Path
    meta: dict


@dataclass
class EngineArgs:
    """The engine options as given (``--engine`` or ``--model``/``--checkpoint``/``--gate``/``--mask-padding``)."""

    engine_dir: Path | None
    model_name: str | None
    checkpoint: Path | None
    gate: str | None
    mask_padding: bool
    backend: str
    precision: str
    device: str

    def given(self) -> bool:
        return bool(self.engine_dir or self.model_name or self.checkpoint or self.gate or self.mask_padding)

    def record(self) -> dict:
        """How to rebuild this engine later (kept in the manifest; ``search`` and ``add`` reuse it)."""
        if self.engine_dir:
            return {"engine_dir": os.path.abspath(self.engine_dir)}
        return {"model_name": self.model_name, "checkpoint": os.path.abspath(self.checkpoint) if self.checkpoint
                else None, "gate": self.gate, "mask_padding": self.mask_padding}


# ------------------------------------------------------------------------------------------------------------ options


def _engine_options(fn):
    fn = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(fn)
    fn = click.option("--precision", type=click.Choice(ENGINE_PRECISIONS), default="fp32", show_default=True,
                      help="Engine precision, as the backend supports it (ignored with --engine: the export's own).")(fn)
    fn = click.option("--backend", default="torch", show_default=True,
                      help="Engine backend for --model/--checkpoint (see 'priorclip-bench --help').")(fn)
    fn = model_options(fn)
    return click.option("--engine", "engine_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="An export directory (priorclip-export) to embed with, instead of --model/--checkpoint.")(fn)


def _input_options(fn):
    fn = click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1),
                      help="Image decoding threads.")(fn)
    fn = click.option("--chunk-size", default=2048, show_default=True, type=click.IntRange(min=1),
                      help="Images per saved chunk: the work a stopped run can lose (a resumed run keeps the first "
                      "run's).")(fn)
    fn = click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))(fn)
    fn = click.option("--restart", is_flag=True, help=f"Discard unfinished work in INDEX/{PARTIAL} (and, for build, "
                      "replace an existing index once the new one is complete).")(fn)
    fn = click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (listed in INDEX/skipped.txt "
                      "with the reason) instead of stopping.")(fn)
    fn = click.option("--embeddings", multiple=True, metavar="OUT.npy",
                      help="Outputs of 'priorclip embed' to merge (repeatable; a folder or quoted glob takes every "
                      ".npy in it). No engine is needed.")(fn)
    fn = click.option("--split", default="test", show_default=True, help="Split of --dataset to index, or 'all'.")(fn)
    fn = click.option("--image-root", type=click.Path(path_type=Path), default=None,
                      help="Folder --dataset's file names are relative to (default: images/ beside the JSON).")(fn)
    fn = click.option("--dataset", type=click.Path(path_type=Path), default=None,
                      help="Karpathy-style dataset JSON; each item keeps its captions.")(fn)
    return click.option("--images", type=click.Path(path_type=Path), default=None,
                        help="Folder of images (files directly inside, as 'priorclip embed' reads them).")(fn)


def _index_argument(fn):
    return click.argument("index_path", metavar="INDEX", type=click.Path(path_type=Path))(fn)


def _engine_args(engine_dir, model_name, checkpoint, gate, backend, precision, device) -> EngineArgs:
    ctx = click.get_current_context()
    return EngineArgs(engine_dir, model_name, checkpoint, gate, bool(ctx.meta.get(MASK_PADDING_KEY)), backend,
                      precision, device)


@click.group(cls=ProductGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def index() -> None:
    """Build, extend, inspect and search a vector index (FAISS, inner product over L2-normalised embeddings).

    An index is a folder: a manifest, a FAISS file and an items file, replaced as a whole by every write (a crash
    never corrupts the previous index) and checked against their SHA-256 when opened.
    """


# ------------------------------------------------------------------------------------------------------------ engine


def _load_engine(args: EngineArgs):
    """The engine of ``args`` (:func:`priorclip.serve.loading.load_engine`)."""
    from .loading import load_engine

    return load_engine(engine_dir=args.engine_dir, model_name=args.model_name, checkpoint=args.checkpoint,
                       gate=args.gate, mask_padding=args.mask_padding, backend=args.backend,
                       precision=args.precision, device=resolve_device(args.device))


def _engine_for(ix: VectorIndex, args: EngineArgs):
    """The engine for queries or additions to ``ix``: the options given, else the one the index records (when it
    can be rebuilt here); either way its identity must be the index's."""
    from .loading import load_engine

    if args.given():
        loaded = _load_engine(args)
    else:
        rec = (ix.manifest.get("build") or {}).get("engine")
        who = ", ".join(f"{k} {ix.identity.get(k)}" for k in IDENTITY_KEYS)
        if not rec:
            raise PriorCLIPError(f"index {ix.path} records no engine that can be rebuilt here; give --engine DIR or "
                                 f"--model/--checkpoint of the weights that made it ({who})")
        try:
            loaded = load_engine(**rec, backend=args.backend, precision=args.precision,
                                 device=resolve_device(args.device))
        except (PriorCLIPError, OSError) as e:
            raise PriorCLIPError(f"cannot rebuild the engine index {ix.path} was built with ({e}); give --engine DIR "
                                 f"or --model/--checkpoint") from None
    check_identity(ix.identity, loaded.identity, f"index {ix.path}")
    return loaded


def _refuse_engine(args: EngineArgs) -> None:
    if args.given():
        raise PriorCLIPError("--embeddings are merged as they are: give no --engine/--model/--checkpoint/--gate "
                             "(their identity is in each OUT.meta.json)")


# ------------------------------------------------------------------------------------------------------------ inputs


def _one_input(images, dataset, embeddings) -> str:
    given = [n for n, v in (("--images", images), ("--dataset", dataset), ("--embeddings", embeddings)) if v]
    if len(given) != 1:
        raise PriorCLIPError("give exactly one input: --images DIR, --dataset JSON or --embeddings OUT.npy"
                             + (f" (got {' and '.join(given)})" if given else ""))
    return given[0]


def _folder_items(folder: Path) -> tuple[list[Item], list[str]]:
    """The folder's image files as items (the listing of ``priorclip embed``) and the other files, with the reason."""
    from priorclip.data import list_images

    listing = list_images(folder)
    if listing.skipped:
        names = ", ".join(p.name for p, _ in listing.skipped[:5]) + (", ..." if len(listing.skipped) > 5 else "")
        click.echo(f"note: left out {_count(len(listing.skipped), 'file')} that PIL does not read as images ({names})",
                   err=True)
    items = []
    for p in listing.files:
        path = Path(os.path.abspath(p))
        items.append(Item(p.relative_to(folder).as_posix(), path, {"path": str(path)}))
    return items, [f"{p}\t{reason}" for p, reason in listing.skipped]


def _dataset_items(dataset: Path, image_root: Path | None, split: str, skip_bad: bool) -> list[Item]:
    """One split (or ``all``) of a Karpathy-style JSON as items with their captions."""
    from priorclip.data import read_karpathy_entries, resolve_dataset

    json_path, root = resolve_dataset(dataset, image_root)
    entries = read_karpathy_entries(json_path, root)
    chosen = [e for e in entries if split == "all" or e.get("split") == split]
    if not chosen:
        present = ", ".join(sorted({str(e.get("split")) for e in entries})) or "none"
        raise DataError(f"{json_path}: no images in split {split!r} (splits present: {present}; or 'all')")
    items, seen = [], {}
    for i, e in enumerate(chosen):
        name = (Path(e.get("filepath") or "") / e["filename"]).as_posix()
        if name in seen:
            raise DataError(f"{json_path}: image {name!r} is listed twice (entries {seen[name]} and {i}); ids must "
                            f"be unique")
        seen[name] = i
        caps = [s["raw"] for s in e["sentences"] if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        path = Path(os.path.abspath(root / name))
        meta = {"path": str(path), "captions": caps, "split": e.get("split")}
        if isinstance(e.get("label"), str):
            meta["label"] = e["label"]
        items.append(Item(name, path, meta))
    missing = [it for it in items if not it.path.is_file()]
    if missing and not skip_bad:
        raise DataError(f"{len(missing)} of {len(items)} images are missing under {root}, e.g. {missing[0].id} "
                        f"(--skip-bad leaves them out)")
    return items


def _check_images(items: list[Item], skip_bad: bool, draft_size: int) -> tuple[list[Item], list[str]]:
    """``priorclip embed``'s check before the first batch (:func:`priorclip.data.check_images`). Returns the
    readable items (multi-page ones marked page 0) and the left-out ones with the reason."""
    from priorclip.data import check_images

    by_path = {it.path: it for it in items}
    checked = check_images([it.path for it in items], skip_bad, draft_size)
    for p, n in checked.pages.items():
        by_path[p].meta.update(page=0, pages=n)
    if note := checked.multi_page_note(lambda p: by_path[p].id):
        click.echo(note, err=True)
    return [by_path[p] for p in checked.paths], [f"{p}\t{reason}" for p, reason in checked.bad]


def _plan(images, dataset, image_root, split, skip_bad, draft_size) -> tuple[list[Item], list[str], list[str]]:
    """Items to embed, the files left out (with the reason), and the sources (for the manifest)."""
    if images is not None:
        items, skipped = _folder_items(images)
        sources = [os.path.abspath(images)]
    else:
        items, skipped = _dataset_items(dataset, image_root, split, skip_bad), []
        sources = [os.path.abspath(dataset)]
    items, bad = _check_images(items, skip_bad, draft_size)
    return items, skipped + bad, sources


def _fingerprint(op: str, items: Sequence[Item], identity: dict, args: EngineArgs) -> str:
    """What saved chunks must match to be reused: the planned files (path, size, mtime), the weights, the engine."""
    h = hashlib.sha256(json.dumps({"op": op, "identity": identity, "backend": args.backend,
                                   "precision": args.precision}, sort_keys=True).encode())
    for it in items:
        st = it.path.stat()
        h.update(json.dumps([it.id, str(it.path), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------- embedding


def _embed(index_path: Path, items: list[Item], loaded, fingerprint: str, batch_size: int, chunk_size: int,
           workers: int, restart: bool) -> tuple[np.ndarray, PartialWork]:
    """Embed ``items`` chunk by chunk, saving each chunk under INDEX/.partial; chunks a stopped run saved are
    reused, and the progress bar starts at their count."""
    from tqdm.auto import tqdm

    from priorclip import retrieval

    dim = loaded.embed_dim
    work = PartialWork(index_path, fingerprint, len(items), chunk_size, dim, restart=restart)
    done = work.done()
    if done:
        click.echo(f"resuming: {done} of {len(items)} images were embedded by an earlier run ({work.dir})", err=True)
    out = np.empty((len(items), dim), dtype=np.float32)
    with tqdm(total=len(items), initial=done, desc="embedding", unit="img") as bar:
        for start, stop in work.chunks():
            saved = work.load(start, stop)
            if saved is None:
                parts = []
                for s in range(start, stop, batch_size):
                    paths = [it.path for it in items[s : min(s + batch_size, stop)]]
                    emb = retrieval.embed_images(loaded.engine, paths, batch_size, progress=False, workers=workers)
                    parts.append(emb.float().cpu().numpy())
                    bar.update(len(paths))
                saved = np.concatenate(parts)
                # engines return unit rows; reduced precisions land within ~1e-3 of 1, stored exactly normalised
                saved = (saved / np.linalg.norm(saved, axis=1, keepdims=True)).astype(np.float32)
                work.save(start, saved)
            out[start:stop] = saved
    return out, work


def _write_skipped(index_path: Path, skipped: list[str]) -> None:
    path = index_path / SKIPPED
    if skipped:
        write_text(path, "\n".join(skipped) + "\n")
        click.echo(f"left out {_count(len(skipped), 'file')}, listed with the reason in {path}", err=True)
    elif path.exists():
        path.unlink()  # an earlier run's list would now describe nothing


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_index_folder(path: Path) -> None:
    """INDEX must be a new or empty folder, or one that holds an index or unfinished work: never someone's files."""
    if path.exists() and not path.is_dir():
        raise PriorCLIPError(f"INDEX {path} is a file; give a folder")
    if path.is_dir():
        ours = {MANIFEST, PARTIAL, SKIPPED}
        other = sorted(p.name for p in path.iterdir() if p.name not in ours and not p.name.startswith(
            ("vectors-", "items-", ".vectors-", ".items-", ".manifest.json.")))
        if other:
            raise PriorCLIPError(f"INDEX {path} is a folder holding other files (e.g. {other[0]}); give a new or empty "
                                 f"folder")
    check_output_dir(path, option="INDEX")


def _search_params(kind: str, ef_search: int | None, nprobe: int | None, nlist: int | None = None) -> dict:
    if ef_search is not None and kind != "hnsw":
        raise PriorCLIPError(f"--ef-search applies to --kind hnsw, not {kind}")
    if (nprobe is not None or nlist is not None) and kind != "ivf":
        raise PriorCLIPError(f"--nprobe and --nlist apply to --kind ivf, not {kind}")
    return {k: v for k, v in (("efSearch", ef_search), ("nprobe", nprobe), ("nlist", nlist)) if v is not None}


# ----------------------------------------------------------------------------------------------------------- commands


@index.command()
@_index_argument
@_input_options
@_engine_options
@click.option("--kind", type=click.Choice(KINDS), default="flat", show_default=True,
              help="flat: exact (fine up to about a million items); hnsw or ivf: approximate, for larger corpora.")
@click.option("--ef-search", type=click.IntRange(min=1), default=None, help="hnsw: stored search breadth (default 128).")
@click.option("--nlist", type=click.IntRange(min=1), default=None, help="ivf: lists (default about 4*sqrt(N)).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="ivf: lists searched (default nlist/8).")
def build(index_path, images, dataset, image_root, split, embeddings, skip_bad, restart, batch_size, chunk_size,
          workers, engine_dir, model_name, checkpoint, gate, backend, precision, device, kind, ef_search, nlist,
          nprobe) -> None:
    """Build the index INDEX (a folder) from a folder of images, a dataset JSON or 'priorclip embed' outputs.

    Embedded chunks are saved as the build goes: run the same command again after a stop and it continues.
    Running it again on a finished index with the same inputs does nothing; other inputs are refused (use 'add',
    or --restart to build INDEX anew: the old index stays readable until the new one is complete).

    Item ids (what 'search --id' takes): a folder's file names, a dataset's file names, and for --embeddings the
    webdataset keys or the image paths relative to the folder embedded. Two items of one id in one input are
    refused.
    """
    args = _engine_args(engine_dir, model_name, checkpoint, gate, backend, precision, device)
    source = _one_input(images, dataset, embeddings)
    params = _search_params(kind, ef_search, nprobe, nlist)
    _check_index_folder(index_path)
    existing = read_manifest(index_path)
    if source == "--embeddings":
        _refuse_engine(args)
        merged = read_embeddings(embeddings)
        for note in merged.shards:
            click.echo(f"note: {note}", err=True)
        _check_trainable(kind, len(merged.ids), nlist)
        if _already_built(index_path, existing, merged.fingerprint, kind, restart):
            return
        record = {"input": "embeddings", "sources": merged.sources, "inputs_sha256": merged.fingerprint,
                  "engine": _rebuildable(merged.identity)}
        with output_dir(index_path), writer_lock(index_path):
            ix = write_index(index_path, merged.vectors, merged.ids, merged.metas, identity=merged.identity, kind=kind,
                             params=params, build=record, replace=existing is not None)
        click.echo(f"wrote index {index_path}: {len(ix)} items x {ix.dim} ({kind}) from {_count(len(merged.sources), 'embeddings file')}")
        return
    if checkpoint is None and engine_dir is None:
        click.echo("note: no --checkpoint or --engine: the model has random weights (seed 0)", err=True)
    loaded = _load_engine(args)
    items, skipped, sources = _plan(images, dataset, image_root, split, skip_bad, loaded.engine.image_size)
    _check_trainable(kind, len(items), nlist)  # before any embedding
    fingerprint = _fingerprint("build", items, loaded.identity, args)
    if _already_built(index_path, existing, fingerprint, kind, restart):
        return
    record = {"input": "images" if images is not None else "dataset", "sources": sources, "split": split if dataset
              else None, "inputs_sha256": fingerprint, "engine": args.record(), "engine_name": loaded.name,
              "skip_bad": skip_bad}
    with output_dir(index_path), writer_lock(index_path):
        vectors, work = _embed(index_path, items, loaded, fingerprint, batch_size, chunk_size, workers, restart)
        ix = write_index(index_path, vectors, [it.id for it in items], [it.meta for it in items],
                         identity=loaded.identity, kind=kind, params=params, build=record, replace=existing is not None)
        work.discard()
        _write_skipped(index_path, skipped)
    click.echo(f"wrote index {index_path}: {len(ix)} items x {ix.dim} ({kind}, {loaded.name})")


def _check_trainable(kind: str, n: int, nlist: int | None) -> None:
    if kind == "ivf":
        ivf_lists(n, nlist)


def _already_built(path: Path, existing: dict | None, fingerprint: str, kind: str, restart: bool) -> bool:
    """True (after a note) when INDEX already holds this very build; refuse any other existing index."""
    if existing is None or restart:
        return False
    if (existing.get("build") or {}).get("inputs_sha256") == fingerprint and existing["kind"] == kind:
        shutil.rmtree(path / PARTIAL, ignore_errors=True)  # a stale .partial of this very build is finished work
        click.echo(f"{path} is already built from these inputs ({existing['count']} items); nothing to do")
        return True
    raise PriorCLIPError(f"{path} already holds an index ({existing['count']} items, {existing['kind']}); use "
                         f"'priorclip index add' to extend it, or --restart to build it anew")


def _rebuildable(identity: dict) -> dict | None:
    """An engine record for merged embeddings: only seeded random weights of a registered config can be rebuilt
    from the identity alone (the config digest then confirms it); trained weights need the user's --checkpoint."""
    if identity.get("checkpoint_sha256") != "random-init":
        return None
    return {"model_name": identity["model"], "checkpoint": None, "gate": None, "mask_padding": False}


@index.command()
@_index_argument
@_input_options
@_engine_options
def add(index_path, images, dataset, image_root, split, embeddings, skip_bad, restart, batch_size, chunk_size, workers,
        engine_dir, model_name, checkpoint, gate, backend, precision, device) -> None:
    """Add images (a folder, a dataset JSON or 'priorclip embed' outputs) to the index INDEX.

    Items whose id the index holds are skipped and counted, so running an add again is harmless; the embedding
    weights must be the index's. Without engine options the engine recorded at build time is used.
    """
    args = _engine_args(engine_dir, model_name, checkpoint, gate, backend, precision, device)
    source = _one_input(images, dataset, embeddings)
    ix = VectorIndex.open(index_path)
    if source == "--embeddings":
        _refuse_engine(args)
        merged = read_embeddings(embeddings)
        for note in merged.shards:
            click.echo(f"note: {note}", err=True)
        check_identity(ix.identity, merged.identity, f"index {index_path}")
        res = add_to_index(index_path, merged.vectors, merged.ids, merged.metas, identity=merged.identity,
                           note={"sources": merged.sources})
        _report_add(index_path, res)
        return
    loaded = _engine_for(ix, args)
    items, skipped, sources = _plan(images, dataset, image_root, split, skip_bad, loaded.engine.image_size)
    new = [it for it in items if it.id not in ix]
    if not new:
        click.echo(f"nothing to add: all {_count(len(items), 'item')} are already in {index_path} ({len(ix)} items)")
        return
    fingerprint = _fingerprint("add", new, loaded.identity, args)
    with writer_lock(index_path):
        vectors, work = _embed(index_path, new, loaded, fingerprint, batch_size, chunk_size, workers, restart)
        res = add_to_index(index_path, vectors, [it.id for it in new], [it.meta for it in new],
                           identity=loaded.identity, note={"sources": sources})
        work.discard()
        _write_skipped(index_path, skipped)
    res.skipped += [it.id for it in items if it.id in ix]
    _report_add(index_path, res)


def _report_add(index_path: Path, res) -> None:
    skipped = f"; skipped {_count(len(res.skipped), 'item')} already in the index" if res.skipped else ""
    click.echo(f"added {_count(res.added, 'item')} to {index_path} (now {res.count}){skipped}")


@index.command()
@_index_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the SHA-256 check of the data files (sizes are still checked).")
def info(index_path, as_json, no_verify) -> None:
    """Count, width, kind, the weights that made the vectors, files and checksums of the index INDEX."""
    d = VectorIndex.open(index_path, verify=not no_verify).info()
    if as_json:
        click.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return
    ident = d["identity"]
    rows = [
        ("index", d["path"]),
        ("items", f"{d['count']} x {d['dim']} ({d['kind']}, inner product)"),
        ("weights", f"{ident['model']}  config {ident['config_sha256']}  checkpoint {ident['checkpoint_sha256'][:16]}"),
        ("created", d["created"]), ("updated", f"{d['updated']} (generation {d['generation']})"),
        ("files", "; ".join(f"{f['name']} {_size(f['bytes'])}" for f in d["files"].values())),
        ("checksums", {True: "ok (SHA-256 verified)", None: "not verified (--no-verify)"}[d["checksums_ok"]]),
    ]
    if d["params"]:
        rows.append(("params", "  ".join(f"{k} {v}" for k, v in d["params"].items())))
    build = d.get("build") or {}
    if build.get("sources"):
        rows.append(("built from", ", ".join(build["sources"][:3]) + (" ..." if len(build["sources"]) > 3 else "")))
    for k, v in rows:
        click.echo(f"{k:<11} {v}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@index.command()
@_index_argument
@click.option("--text", default=None, help="A caption to search with (needs the engine).")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="An image file to search with.")
@click.option("--id", "item_id", default=None, help="The id of an indexed item: its stored vector is the query.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="Results to show.")
@click.option("--ef-search", type=click.IntRange(min=1), default=None, help="hnsw: search breadth for this query.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="ivf: lists searched for this query.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (hits with their stored metadata).")
@click.option("--no-verify", is_flag=True, help="Skip the SHA-256 check of the data files.")
@_engine_options
def search(index_path, text, image, item_id, k, ef_search, nprobe, as_json, no_verify, engine_dir, model_name,
           checkpoint, gate, backend, precision, device) -> None:
    """Search the index INDEX with a caption, an image or an indexed item's id; prints the top k.

    Text and image queries need the engine that made the index: the one it records is rebuilt when possible,
    else give --engine or --model/--checkpoint (its weights must be the index's).
    """
    args = _engine_args(engine_dir, model_name, checkpoint, gate, backend, precision, device)
    given = [n for n, v in (("--text", text), ("--image", image), ("--id", item_id)) if v is not None]
    if len(given) != 1:
        raise PriorCLIPError("give exactly one query: --text, --image or --id")
    ix = VectorIndex.open(index_path, verify=not no_verify)
    try:
        ix.set_search_params(ef_search=ef_search, nprobe=nprobe)
    except ValueError as e:
        raise PriorCLIPError(str(e)) from None
    if item_id is not None:
        try:
            query = ix.vector(item_id)
        except KeyError:
            raise PriorCLIPError(f"no item {item_id!r} in index {index_path}") from None
        described = {"id": item_id}
    else:
        loaded = _engine_for(ix, args)
        query = _embed_query(loaded, text, image)
        described = {"text": text} if text is not None else {"image": str(image)}
    hits = ix.search(query[None, :], k)[0]
    if as_json:
        out = {"index": str(index_path), "query": described, "k": k,
               "hits": [{"rank": r, "id": h.id, "score": h.score, "meta": h.meta} for r, h in enumerate(hits, 1)]}
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    click.echo(_table(hits))


def _embed_query(loaded, text: str | None, image: Path | None) -> np.ndarray:
    from priorclip.retrieval import embed_images, embed_texts
    from priorclip.transforms import check_image

    if text is not None:
        if not text.strip():
            raise PriorCLIPError("--text is empty")
        emb = embed_texts(loaded.engine, [text], progress=False)
    else:
        check_image(image, decode=False, draft_size=loaded.engine.image_size)  # a bad file: one line naming it
        emb = embed_images(loaded.engine, [image], 1, progress=False)
    return emb.float().cpu().numpy()[0]


def _table(hits) -> str:
    captions = any(h.meta.get("captions") for h in hits)
    last = "caption" if captions else "path"
    width = max([len(h.id) for h in hits] + [2])
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<{width}}  {last}"]
    for r, h in enumerate(hits, 1):
        extra = (h.meta.get("captions") or [""])[0] if captions else h.meta.get("path", "")
        lines.append(f"{r:>4}  {h.score:>7.4f}  {h.id:<{width}}  {extra}")
    return "\n".join(lines)


@index.command()
@_index_argument
@click.option("--ef-search", type=click.IntRange(min=1), default=None, help="hnsw: new stored search breadth.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="ivf: new stored lists searched.")
@click.option("--queries", default=200, show_default=True, type=click.IntRange(min=1),
              help="Stored items used as queries (spread over the scene classes of their ids, seeded).")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tune(index_path, ef_search, nprobe, queries, k, as_json) -> None:
    """Measure an approximate index's recall@k against exact search, and store new efSearch / nprobe.

    Queries are stored vectors; recall is the share of the exact top k the index returns. With --ef-search or
    --nprobe the value is measured, then stored as the index's default (the data files are not rewritten).
    """
    from priorclip.data import image_label, spread_indices

    ix = VectorIndex.open(index_path)
    if ix.kind == "flat":
        raise PriorCLIPError(f"{index_path} is a flat (exact) index: there is nothing to tune")
    try:
        ix.set_search_params(ef_search=ef_search, nprobe=nprobe)
    except ValueError as e:
        raise PriorCLIPError(str(e)) from None
    everything = ix.all_vectors()
    rows = spread_indices([image_label(i) for i in ix.ids], queries, seed=0)
    q = everything[rows]
    k = min(k, len(ix))
    exact = np.argpartition(-(q @ everything.T), k - 1, axis=1)[:, :k]
    got = ix.search(q, k)
    row_of = {i: r for r, i in enumerate(ix.ids)}
    recall = float(np.mean([len({row_of[h.id] for h in hits} & set(ex.tolist())) / k for hits, ex in zip(got, exact)]))
    stored = set_index_params(index_path, ef_search, nprobe) if (ef_search or nprobe) else ix.params
    if as_json:
        click.echo(json.dumps({"recall": recall, "k": k, "queries": len(rows), "params": stored}))
        return
    click.echo(f"recall@{k} vs exact: {recall:.4f} over {len(rows)} stored items; params {stored}"
               + (" (stored)" if ef_search or nprobe else ""))
