"""``priorclip index --embeddings``: read and merge the outputs of ``priorclip embed`` (possibly many ``--shard I/N``
jobs) into vectors, ids and metadata for an index, without an engine.

Each output is ``OUT.npy`` + ``OUT.index.jsonl`` + ``OUT.meta.json`` (:data:`priorclip.provenance.EMBEDDINGS_FORMAT`);
all must come from one set of weights (their identity), and ids must be unique: webdataset rows are keyed by their
sample key, folder rows by the image path relative to the embedded folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from priorclip.errors import DataError
from priorclip.provenance import EMBEDDINGS_FORMAT, IDENTITY_KEYS, check_identity

from .index import validate_vectors


@dataclass
class Embeddings:
    """Merged ``priorclip embed`` outputs."""

    vectors: np.ndarray
    ids: list[str]
    metas: list[dict]
    identity: dict
    sources: list[str]
    fingerprint: str
    shards: list[str] = field(default_factory=list)


def _expand(values: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for v in values:
        p = Path(v)
        if p.is_dir():
            found = sorted(p.glob("*.npy"))
        elif p.exists() or not glob.has_magic(v):
            found = [p]
        else:
            found = sorted(Path(x) for x in glob.glob(v))
        if not found:
            raise DataError(f"--embeddings {v}: no .npy files there")
        files += found
    unique = list(dict.fromkeys(Path(os.path.abspath(f)) for f in files))  # one file named twice is read once
    return unique


def _side(npy: Path, suffix: str) -> Path:
    stem = npy.name[:-4] if npy.name.endswith(".npy") else npy.name
    return npy.with_name(stem + suffix)


def _read_meta(npy: Path) -> dict:
    mpath = _side(npy, ".meta.json")
    if not npy.is_file():
        raise DataError(f"embeddings not found: {npy}")
    if not mpath.is_file():
        raise DataError(f"{mpath} is missing: --embeddings needs the .meta.json that 'priorclip embed' writes beside "
                        f"every output (re-run embed to get one)")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EMBEDDINGS_FORMAT:
        raise DataError(f"{mpath}: not a {EMBEDDINGS_FORMAT} file")
    if meta.get("kind") != "image":
        raise DataError(f"{npy}: these are {meta.get('kind')} embeddings; an index holds image embeddings "
                        f"(captions are its queries)")
    ident = meta.get("identity")
    if not isinstance(ident, dict) or any(not ident.get(k) for k in IDENTITY_KEYS):
        raise DataError(f"{mpath}: no identity of the weights ({', '.join(IDENTITY_KEYS)})")
    return meta


def _row_item(rec: Any, i: int, sources: list[str], where: Path) -> tuple[str, dict]:
    """(id, metadata) of line ``i`` of an embed index file: webdataset rows by key, folder rows by relative path."""
    if not isinstance(rec, dict) or rec.get("row") != i:
        raise DataError(f"{where}: line {i + 1} is not row {i}")
    if "key" in rec:
        meta = {k: rec[k] for k in ("shard", "member", "captions") if k in rec}
        return str(rec["key"]), meta
    if "image" in rec:
        image = str(rec["image"])
        for src in sources:
            for a, b in ((image, src), (os.path.abspath(image), os.path.abspath(src))):
                try:
                    rel = Path(a).relative_to(b).as_posix()
                except ValueError:
                    continue
                meta = {"path": os.path.abspath(image), **{k: rec[k] for k in ("page", "pages") if k in rec}}
                return rel, meta
        raise DataError(f"{where}: row {i}: image {image} is not under the embedded folder(s) {', '.join(sources)}")
    if "caption" in rec:
        raise DataError(f"{where}: row {i} is a caption; an index holds image embeddings")
    raise DataError(f"{where}: row {i} has neither 'key' nor 'image'")


def read_embeddings(values: Sequence[str]) -> Embeddings:
    """Read and merge ``priorclip embed`` outputs (the contract: OUT.npy, OUT.index.jsonl, OUT.meta.json); all must
    come from one set of weights. Raises :class:`DataError` / :class:`PriorCLIPError` in one line."""
    files = _expand(values)
    vectors, ids, metas, shard_of = [], [], [], {}
    identity = None
    h = hashlib.sha256()
    for npy in files:
        meta = _read_meta(npy)
        if identity is None:
            identity = {k: meta["identity"][k] for k in IDENTITY_KEYS}
        else:
            check_identity(meta["identity"], identity, str(npy))
        shard = meta.get("shard")
        if isinstance(shard, dict):
            key = (shard.get("index"), shard.get("count"))
            if key in shard_of:
                raise DataError(f"shard {key[0]}/{key[1]} is given twice: {shard_of[key]} and {npy}")
            shard_of[key] = npy
        try:
            a = np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{npy}: not a readable .npy ({e})") from None
        if a.ndim != 2 or a.shape != (meta.get("count"), meta.get("embed_dim")):
            raise DataError(f"{npy}: shape {a.shape}, its .meta.json says {meta.get('count')} x {meta.get('embed_dim')}")
        if len(a):  # a fan-out job left without a shard writes empty outputs: nothing to merge from it
            vectors.append(validate_vectors(np.asarray(a), vectors[0].shape[1] if vectors else None, str(npy)))
        ipath = _side(npy, ".index.jsonl")
        try:
            lines = ipath.read_text(encoding="utf-8").splitlines()
            recs = [json.loads(x) for x in lines]
        except FileNotFoundError:
            raise DataError(f"{ipath} is missing (each embed output has one)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{ipath}: not valid JSON lines ({e})") from None
        if len(recs) != len(a):
            raise DataError(f"{ipath}: {len(recs)} lines for {len(a)} rows of {npy.name}")
        sources = [str(s) for s in meta.get("sources") or []]
        for i, rec in enumerate(recs):
            item_id, m = _row_item(rec, i, sources, ipath)
            ids.append(item_id)
            metas.append(m)
        for p in (npy, ipath):
            st = p.stat()
            h.update(json.dumps([str(p), st.st_size, st.st_mtime_ns]).encode())
    if not vectors:
        raise DataError(f"no embeddings to merge: all {len(files)} file{'' if len(files) == 1 else 's'} are empty")
    h.update(json.dumps(identity, sort_keys=True).encode())
    notes = []
    counts = {c for _, c in shard_of}
    for count in sorted(c for c in counts if isinstance(c, int)):
        have = sorted(i for i, c in shard_of if c == count)
        missing = sorted(set(range(count)) - set(have))
        if missing:
            notes.append(f"merging {len(have)} of {count} shards (missing: {', '.join(map(str, missing[:10]))}"
                         f"{', ...' if len(missing) > 10 else ''}); add them later with 'priorclip index add'")
    return Embeddings(np.concatenate(vectors), ids, metas, identity, [str(f) for f in files], h.hexdigest(), notes)
