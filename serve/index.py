"""A vector index of image embeddings on disk: FAISS inner product over L2-normalised rows, ids and per-item metadata.

Why this shape: an index is written by long jobs (``priorclip index build`` over a million tiles) and read by a
service that must never see half of one. So every write makes a new *generation* of immutable data files and
switches to it by replacing one small manifest, last::

    INDEX/manifest.json          format, kind, dim, identity, params, and each data file's name, size and SHA-256
    INDEX/vectors-000007.faiss   the FAISS index (row r = line r of the items file)
    INDEX/items-000007.jsonl     {"id": ..., "meta": {...}} per row
    INDEX/.partial/              embedded chunks of an unfinished build (:class:`PartialWork`), for resuming

A writer (one at a time: an ``flock`` on the folder) writes the new generation's files beside the old ones (each
through a temporary name, fsynced, renamed), then replaces ``manifest.json`` (``os.replace``), then deletes the old
generation. A crash or SIGKILL at any moment leaves the previous manifest naming complete files (or no index at all
for a first build); leftovers of a killed writer are removed by the next one. Readers verify each file's SHA-256
against the manifest (:meth:`VectorIndex.open`), so a flipped byte is a one-line :class:`DataError` naming the file,
never a wrong ranking. Every write rewrites the whole generation (O(N)): simple and safe; appends are rare.

Kinds: ``flat`` (exact, ``IndexFlatIP``; the default, fine up to about a million rows), ``hnsw`` (graph,
``IndexHNSWFlat`` inner product; ``efSearch`` stored and settable) and ``ivf`` (``IndexIVFFlat`` inner product,
trained on the vectors with about 4·sqrt(N) lists; ``nprobe`` stored and settable). Scores are inner products of
unit vectors, i.e. cosines.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from priorclip.cliutils import atomic_write
from priorclip.errors import DataError, PriorCLIPError
from priorclip.provenance import IDENTITY_KEYS, check_identity

FORMAT = "priorclip-index/1"
KINDS = ("flat", "hnsw", "ivf")
METRIC = "ip"
MANIFEST = "manifest.json"
PARTIAL = ".partial"
NORM_TOLERANCE = 1e-2  # |norm - 1| accepted (fp16 engines land within 1e-3) ...
EXACT_TOLERANCE = 1e-4  # ... and rows further from 1 than this are renormalised (fp32 unit rows are kept as given)

# HNSW: M=32 / efConstruction=200 / efSearch=128 measured here on 25k clustered 32- and 64-d unit vectors: recall@10
# vs exact 0.97-0.99 (efConstruction 80, faiss' 40 is lower still, gave 0.87-0.94 at efSearch 128).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
# IVF: faiss' k-means warns below 39 training points per centroid (poor centroids); the default list count
# 4·sqrt(N) is capped so that every list keeps that many, and fewer than IVF_MIN_LISTS lists is refused (no index
# to speak of: use flat). nprobe nlist/8 measured recall@10 0.97-0.99 on clustered data (0.85 on uniform random
# vectors, IVF's worst case). An index that grows past IVF_RETRAIN_GROWTH x the vectors it was trained on is
# retrained on all of them at the next add, so its lists keep up with the data.
IVF_POINTS_PER_LIST = 39
IVF_MIN_LISTS = 16
IVF_PROBE_FRACTION = 8
IVF_RETRAIN_GROWTH = 4

_GENERATION_FILE = re.compile(r"^(vectors|items)-(\d{6,})\.(faiss|jsonl)$")
_TEMP_FILE = re.compile(r"^\.(vectors-\d+\.faiss|items-\d+\.jsonl|manifest\.json)\..*\.tmp$")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise PriorCLIPError("the vector index needs FAISS: pip install faiss-cpu") from None
    return faiss


@dataclass
class Hit:
    """One search result: the item's id, its score (inner product = cosine) and its stored metadata (a copy)."""

    id: str
    score: float
    meta: dict


@dataclass
class AddResult:
    """What :func:`add_to_index` did: rows added, ids skipped because the index already held them, rows after."""

    added: int
    skipped: list[str] = field(default_factory=list)
    count: int = 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of index folder ``path``, or None when it holds no index. Raises :class:`DataError` for a
    manifest that is not one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} is a file, not an index folder")
    mpath = path / MANIFEST
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {mpath}: {getattr(e, 'strerror', None) or e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath}: corrupt index manifest (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{mpath}: not a {FORMAT} manifest")
    for key in ("kind", "dim", "count", "identity", "files", "generation"):
        if key not in manifest:
            raise DataError(f"{mpath}: corrupt index manifest (no {key!r})")
    files = manifest["files"]
    if not isinstance(files, dict) or any(not isinstance(files.get(role), dict) or
                                          {"name", "bytes", "sha256"} - set(files[role]) for role in ("vectors", "items")):
        raise DataError(f"{mpath}: corrupt index manifest (its 'files' do not name the vectors and items)")
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path, entry: dict, verify: bool) -> None:
    """Raise :class:`DataError` naming ``path`` unless it has the manifest's size (and, with ``verify``, SHA-256)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(path) from None  # the caller tells a concurrent switch from a real loss
    if size != entry.get("bytes"):
        raise DataError(f"index file {path} is corrupt: {size} bytes, the manifest says {entry.get('bytes')} "
                        f"(restore it or rebuild the index)")
    if verify and file_sha256(path) != entry.get("sha256"):
        raise DataError(f"index file {path} is corrupt: its SHA-256 differs from the manifest's "
                        f"(restore it or rebuild the index)")


class VectorIndex:
    """An opened index: FAISS search plus ids and metadata. Read-only; searching is safe from several threads.

    Use :meth:`open`; write with :func:`write_index` / :func:`add_to_index`.
    """

    def __init__(self, path: Path, manifest: dict, index: Any, ids: list[str], metas: list[dict],
                 checksums_ok: bool | None) -> None:
        self.path = path
        self.manifest = manifest
        self._index = index
        self._ids = ids
        self._metas = metas
        self._row = {i: r for r, i in enumerate(ids)}
        self.checksums_ok = checksums_ok
        self.params = dict(manifest.get("params") or {})
        self._apply_params()

    # --- opening

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> VectorIndex:
        """Open index folder ``path``. ``verify``: check every data file's SHA-256 against the manifest (reads them
        once more; without it only their sizes are checked).

        Raises :class:`DataError` in one line naming the file for a missing folder or manifest, a corrupt, missing
        or mismatched data file; :class:`PriorCLIPError` when FAISS is not installed.
        """
        path = Path(path)
        for attempt in range(3):
            manifest = read_manifest(path)
            if manifest is None:
                raise DataError(_no_index_message(path))
            try:
                return cls._load(path, manifest, verify)
            except FileNotFoundError as e:
                again = read_manifest(path)
                if again is not None and again.get("generation") != manifest.get("generation") and attempt < 2:
                    continue  # a writer switched generations between our two reads: read the new one
                raise DataError(f"index file {e.args[0]} is missing (named by {path / MANIFEST}); restore it or "
                                f"rebuild the index") from None
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, path: Path, manifest: dict, verify: bool) -> VectorIndex:
        faiss = _faiss()
        files = manifest["files"]
        vpath, ipath = path / files["vectors"]["name"], path / files["items"]["name"]
        _check_file(vpath, files["vectors"], verify)
        _check_file(ipath, files["items"], verify)
        try:
            index = faiss.read_index(str(vpath))
        except RuntimeError as e:
            if not vpath.exists():
                raise FileNotFoundError(vpath) from None
            raise DataError(f"index file {vpath} is corrupt: FAISS cannot read it ({str(e).splitlines()[0]})") from None
        ids, metas = _read_items(ipath)
        count, dim = int(manifest["count"]), int(manifest["dim"])
        if index.ntotal != count or index.d != dim or len(ids) != count:
            raise DataError(f"index {path} is inconsistent: manifest {count} x {dim}, {vpath.name} {index.ntotal} x "
                            f"{index.d}, {ipath.name} {len(ids)} items (rebuild the index)")
        if manifest["kind"] == "ivf":
            index.make_direct_map()  # so vector(id) can reconstruct rows
        return cls(path, manifest, index, ids, metas, True if verify else None)

    # --- properties

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def metric(self) -> str:
        return str(self.manifest.get("metric", METRIC))

    @property
    def identity(self) -> dict:
        return dict(self.manifest["identity"])

    @property
    def ids(self) -> list[str]:
        """Item ids in row order (a copy)."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and item_id in self._row

    def __repr__(self) -> str:
        return f"VectorIndex({str(self.path)!r}, {len(self)} x {self.dim}, {self.kind})"

    # --- lookups

    def row(self, item_id: str) -> int:
        """Row of ``item_id``; ``KeyError`` for an id not in the index."""
        try:
            return self._row[item_id]
        except (KeyError, TypeError):
            raise KeyError(f"no item {item_id!r} in index {self.path}") from None

    def vector(self, item_id: str) -> np.ndarray:
        """The stored embedding [D] float32 of ``item_id``; ``KeyError`` for an unknown id."""
        return np.asarray(self._index.reconstruct(self.row(item_id)), dtype=np.float32)

    def meta(self, item_id: str) -> dict:
        """A copy of the stored metadata of ``item_id``; ``KeyError`` for an unknown id."""
        return copy.deepcopy(self._metas[self.row(item_id)])

    # --- search

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change this process's defaults for later searches (not the stored ones: :func:`set_index_params`)."""
        self._check_params(ef_search, nprobe)
        if ef_search is not None:
            self.params["efSearch"] = int(ef_search)
        if nprobe is not None:
            self.params["nprobe"] = int(nprobe)
        self._apply_params()

    def _apply_params(self) -> None:
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = int(self.params["efSearch"])
        elif self.kind == "ivf":
            self._index.nprobe = int(self.params["nprobe"])

    def _check_params(self, ef_search: int | None, nprobe: int | None) -> None:
        _check_search_params(self.kind, ef_search, nprobe, self.params.get("nlist"))

    def search(self, queries: np.ndarray, k: int, *, ef_search: int | None = None,
               nprobe: int | None = None) -> list[list[Hit]]:
        """Top-``k`` items by inner product for each query row of ``queries`` [Q, D] (a single [D] vector is one
        query). ``k`` is clipped to the index size; an approximate index may return fewer than ``k`` hits.
        ``ef_search`` (hnsw) / ``nprobe`` (ivf) override the defaults for this call only.

        Raises ``ValueError`` (one line) for a query of another width, non-finite values, or ``k`` < 1.
        """
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}] for this index, got shape {tuple(np.shape(queries))}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not np.issubdtype(q.dtype, np.number) or not np.isfinite(q).all():
            raise ValueError("queries must be finite numbers")
        self._check_params(ef_search, nprobe)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if len(q) == 0:
            return []
        scores, rows = self._index.search(q, min(int(k), len(self)), params=self._search_params(ef_search, nprobe))
        return [[Hit(self._ids[r], float(s), copy.deepcopy(self._metas[r])) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def _search_params(self, ef_search: int | None, nprobe: int | None):
        # per-call parameter objects, not the index's attributes: concurrent searches never see each other's
        if ef_search is None and nprobe is None:
            return None
        faiss = _faiss()
        if ef_search is not None:
            return faiss.SearchParametersHNSW(efSearch=int(ef_search))
        return faiss.SearchParametersIVF(nprobe=int(nprobe))

    def all_vectors(self) -> np.ndarray:
        """Every stored row [N, D] float32, in row order."""
        return np.asarray(self._index.reconstruct_n(0, len(self)), dtype=np.float32).reshape(len(self), self.dim)

    def info(self) -> dict:
        """Count, dim, kind, identity, created/updated, files with sizes and checksums, approximate parameters."""
        m = self.manifest
        files = {role: {"name": e["name"], "bytes": e["bytes"], "sha256": e["sha256"]} for role, e in m["files"].items()}
        return {
            "path": str(self.path), "format": m["format"], "count": len(self), "dim": self.dim, "kind": self.kind,
            "metric": self.metric, "identity": self.identity, "created": m.get("created"),
            "updated": m.get("updated"), "generation": m["generation"], "files": files,
            "bytes": sum(e["bytes"] for e in files.values()), "checksums_ok": self.checksums_ok,
            "params": dict(self.params), "stored_params": dict(m.get("params") or {}),
            "build": m.get("build"), "history": list(m.get("history") or []),
        }


def _no_index_message(path: Path) -> str:
    if not path.exists():
        return f"index not found: {path}"
    if (path / PARTIAL).is_dir():
        return (f"{path} holds an unfinished build ({PARTIAL}), no index yet: re-run the same 'priorclip index "
                f"build' to finish it")
    return f"{path} is not a priorclip index (no {MANIFEST})"


def _read_items(path: Path) -> tuple[list[str], list[dict]]:
    ids, metas, n = [], [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("meta"), dict):
                    raise ValueError("expected {\"id\": str, \"meta\": {...}}")
                ids.append(rec["id"])
                metas.append(rec["meta"])
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"index file {path} is corrupt: line {n}: {e}") from None
    return ids, metas


def _check_search_params(kind: str, ef_search: int | None, nprobe: int | None, nlist: int | None) -> None:
    if ef_search is not None:
        if kind != "hnsw":
            raise ValueError(f"efSearch applies to hnsw indexes; this one is {kind}")
        if isinstance(ef_search, bool) or int(ef_search) < 1:
            raise ValueError(f"efSearch must be >= 1, got {ef_search}")
    if nprobe is not None:
        if kind != "ivf":
            raise ValueError(f"nprobe applies to ivf indexes; this one is {kind}")
        if isinstance(nprobe, bool) or not 1 <= int(nprobe) <= (nlist or int(nprobe)):
            raise ValueError(f"nprobe must be between 1 and nlist ({nlist}), got {nprobe}")


# ---------------------------------------------------------------------------------------------------------- writing


def _user_params(kind: str, ef_search: int | None, nprobe: int | None, nlist: int | None) -> None:
    """:func:`_check_search_params` for writers: a bad value is a user's one-line error."""
    try:
        _check_search_params(kind, ef_search, nprobe, nlist)
    except ValueError as e:
        raise PriorCLIPError(str(e)) from None


def validate_vectors(vectors: Any, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous float32 [N, D] array of unit rows; raises :class:`DataError` (one line) unless
    it is float32, 2-D, of width ``dim``, finite, and every row has norm 1 within :data:`NORM_TOLERANCE` (rows
    further than :data:`EXACT_TOLERANCE` from 1 are renormalised)."""
    a = np.asarray(vectors)
    if a.dtype != np.float32:
        raise DataError(f"{what}: expected float32 embeddings, got {a.dtype}")
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{what}: expected a non-empty [N, D] matrix, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise DataError(f"{what}: embeddings are {a.shape[1]} wide, the index holds {dim}-d vectors")
    if not np.isfinite(a).all():
        raise DataError(f"{what}: embeddings contain NaN or infinite values")
    norms = np.linalg.norm(a.astype(np.float64), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if len(bad):
        raise DataError(f"{what}: {len(bad)} rows are not L2-normalised (row {bad[0]} has norm {norms[bad[0]]:.4g}); "
                        f"an index holds unit vectors (inner product = cosine)")
    off = np.abs(norms - 1.0) > EXACT_TOLERANCE
    if off.any():  # fp16/bf16 outputs: renormalised; fp32 unit rows stay bit-identical to their source
        a = a.copy()
        a[off] = (a[off] / norms[off, None]).astype(np.float32)
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_items(ids: Sequence[str], metas: Sequence[dict] | None, n: int, what: str) -> list[bytes]:
    """The items file lines of ``ids`` / ``metas``, made before anything is written. Refuses ids that are not
    non-empty strings, a length mismatch, metadata that is not a JSON object, and duplicates within one input: two
    items of one id would make the id name either, so the input is refused rather than one silently dropped."""
    if len(ids) != n:
        raise DataError(f"{what}: {len(ids)} ids for {n} vectors")
    metas = [{} for _ in range(n)] if metas is None else list(metas)
    if len(metas) != n:
        raise DataError(f"{what}: {len(metas)} metadata records for {n} vectors")
    seen: dict[str, int] = {}
    for r, i in enumerate(ids):
        if not isinstance(i, str) or not i:
            raise DataError(f"{what}: item {r} has no id (ids are non-empty strings), got {i!r}")
        if i in seen:
            raise DataError(f"{what}: id {i!r} appears twice (items {seen[i]} and {r}); ids must be unique")
        seen[i] = r
        if not isinstance(metas[r], dict):
            raise DataError(f"{what}: metadata of {i!r} must be a dict")
    try:
        return list(_item_lines(ids, metas))
    except (TypeError, ValueError) as e:
        raise DataError(f"{what}: metadata is not JSON-serialisable ({e})") from None


def _check_identity_dict(identity: dict) -> dict:
    if not isinstance(identity, dict) or any(not identity.get(k) for k in IDENTITY_KEYS):
        raise PriorCLIPError(f"an index needs the identity of the weights that made its vectors ({', '.join(IDENTITY_KEYS)})")
    return {k: identity[k] for k in IDENTITY_KEYS}


def ivf_lists(n: int, nlist: int | None = None) -> int:
    """The list count an ivf index of ``n`` vectors gets (``nlist``, or about 4·sqrt(n) capped at
    n / :data:`IVF_POINTS_PER_LIST`); raises :class:`PriorCLIPError` when ``n`` is too few to train it."""
    if nlist is not None:
        if nlist < 1 or n < IVF_POINTS_PER_LIST * nlist:
            raise PriorCLIPError(f"ivf with {nlist} lists needs at least {IVF_POINTS_PER_LIST * max(nlist, 1)} vectors "
                                 f"to train ({IVF_POINTS_PER_LIST} per list), got {n}; give fewer lists or use --kind flat")
        return int(nlist)
    lists = min(round(4 * math.sqrt(n)), n // IVF_POINTS_PER_LIST)
    if lists < IVF_MIN_LISTS:
        raise PriorCLIPError(f"too few vectors to train an ivf index: {n} (at least {IVF_POINTS_PER_LIST * IVF_MIN_LISTS} "
                             f"for {IVF_MIN_LISTS} lists); use --kind flat (exact, fast up to about a million)")
    return lists


def _build_faiss(kind: str, vectors: np.ndarray, params: dict) -> tuple[Any, dict]:
    """A FAISS index of ``kind`` over ``vectors`` and the parameters it was built with (stored in the manifest)."""
    faiss = _faiss()
    n, d = vectors.shape
    if kind == "flat":
        index, used = faiss.IndexFlatIP(d), {}
    elif kind == "hnsw":
        m = int(params.get("M", HNSW_M))
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("efConstruction", HNSW_EF_CONSTRUCTION))
        used = {"M": m, "efConstruction": int(index.hnsw.efConstruction),
                "efSearch": int(params.get("efSearch") or HNSW_EF_SEARCH)}
    elif kind == "ivf":
        nlist = ivf_lists(n, params.get("nlist"))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        nprobe = int(params.get("nprobe") or max(1, math.ceil(nlist / IVF_PROBE_FRACTION)))
        used = {"nlist": nlist, "nprobe": min(nprobe, nlist), "trained_on": n}
    else:
        raise PriorCLIPError(f"unknown index kind {kind!r} (known: {', '.join(KINDS)})")
    index.add(vectors)
    return index, used


_HELD: dict[str, list] = {}  # folder -> [fd, depth]: the lock is re-entrant within a process
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the index folder's writer lock (an exclusive ``flock`` on the folder, released by the kernel even on
    SIGKILL); a second writer is refused in one line instead of interleaving generations. Re-entrant in a process."""
    path = Path(path)
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held:
            held[1] += 1
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PriorCLIPError(f"{path} is being written by another process (build or add); wait for it to "
                                     f"finish") from None
            _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # closing the last descriptor releases the flock


@contextlib.contextmanager
def _durable(path: Path) -> Iterator[Path]:
    """:func:`~priorclip.cliutils.atomic_write`, plus fsync of the file before the rename and of its folder after,
    so the switch also survives a power cut (a SIGKILL alone cannot lose page-cache writes)."""
    with atomic_write(path) as tmp:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _collect_garbage(path: Path, keep: set[str]) -> None:
    """Remove generation files not named in ``keep`` and temporary files of killed writers (under the lock)."""
    for p in path.iterdir():
        if (_GENERATION_FILE.match(p.name) and p.name not in keep) or _TEMP_FILE.match(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _next_generation(path: Path, manifest: dict | None) -> int:
    gens = [int(m.group(2)) for p in path.iterdir() if (m := _GENERATION_FILE.match(p.name))]
    return max(gens + [int(manifest["generation"]) if manifest else 0]) + 1


def _commit(path: Path, index: Any, write_items, fields: dict, old: dict | None) -> dict:
    """Write a new generation (FAISS file, items file via ``write_items(binary file)``), then the manifest, then drop
    the old generation. Caller holds the writer lock. Returns the new manifest."""
    faiss = _faiss()
    _collect_garbage(path, _manifest_files(old))
    gen = _next_generation(path, old)
    vec, items = path / f"vectors-{gen:06d}.faiss", path / f"items-{gen:06d}.jsonl"
    with _durable(vec) as tmp:
        faiss.write_index(index, str(tmp))
    with _durable(items) as tmp, open(tmp, "wb") as f:
        write_items(f)
    now = _now()
    manifest = {
        "format": FORMAT, "metric": METRIC, **fields, "count": int(index.ntotal), "dim": int(index.d),
        "generation": gen, "created": (old or {}).get("created", now), "updated": now,
        "files": {role: {"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                  for role, p in (("vectors", vec), ("items", items))},
    }
    _write_manifest(path, manifest)
    _collect_garbage(path, _manifest_files(manifest))
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    with _durable(path / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _manifest_files(manifest: dict | None) -> set[str]:
    return {e["name"] for e in manifest["files"].values()} if manifest else set()


def _item_lines(ids: Sequence[str], metas: Sequence[dict]) -> Iterator[bytes]:
    for i, m in zip(ids, metas):
        yield (json.dumps({"id": i, "meta": m}, ensure_ascii=False) + "\n").encode("utf-8")


def write_index(path: str | Path, vectors: np.ndarray, ids: Sequence[str], metas: Sequence[dict] | None = None, *,
                identity: dict, kind: str = "flat", params: dict | None = None, build: dict | None = None,
                replace: bool = False) -> VectorIndex:
    """Create the index at folder ``path`` (created if missing) from ``vectors`` [N, D] float32 unit rows, their
    ``ids`` (unique non-empty strings) and ``metas`` (JSON-serialisable dicts), atomically.

    ``identity``: :func:`priorclip.provenance.engine_identity` of the weights that made the vectors. ``kind``: one of
    :data:`KINDS`; ``params``: ``M``/``efConstruction``/``efSearch`` (hnsw), ``nlist``/``nprobe`` (ivf). ``build``:
    free-form record of how it was made (engine, sources, inputs fingerprint), kept in the manifest. An existing
    index is refused unless ``replace`` (it then stays readable until the new one is complete).

    Raises :class:`DataError` / :class:`PriorCLIPError` in one line for bad vectors, ids, kind or parameters.
    """
    path = Path(path)
    if kind not in KINDS:
        raise PriorCLIPError(f"unknown index kind {kind!r} (known: {', '.join(KINDS)})")
    identity = _check_identity_dict(identity)
    vectors = validate_vectors(vectors)
    lines = _check_items(ids, metas, len(vectors), "write_index")
    params = dict(params or {})
    _user_params(kind, params.get("efSearch"), params.get("nprobe"), params.get("nlist") or 10**9)
    path.mkdir(parents=True, exist_ok=True)
    with writer_lock(path):
        old = read_manifest(path)
        if old is not None and not replace:
            raise PriorCLIPError(f"{path} already holds an index ({old['count']} items); add to it, or replace it")
        index, used = _build_faiss(kind, vectors, params)
        fields = {"kind": kind, "identity": identity, "params": used, "build": build or {},
                  "history": [{"op": "build", "added": len(ids), "at": _now()}]}

        def items(f):
            f.writelines(lines)

        _commit(path, index, items, fields, None if old is None else {"generation": old["generation"],
                                                                      "files": old["files"]})
    return VectorIndex.open(path, verify=False)


def add_to_index(path: str | Path, vectors: np.ndarray, ids: Sequence[str], metas: Sequence[dict] | None = None, *,
                 identity: dict, note: dict | None = None) -> AddResult:
    """Append items to the index at ``path``, atomically. Ids the index already holds are skipped and counted (so a
    re-run is harmless); duplicate ids within this input are refused. ``identity`` must equal the index's
    (:func:`~priorclip.provenance.check_identity`). An ivf index that has grown past :data:`IVF_RETRAIN_GROWTH` x the
    vectors it was trained on is retrained on all of them. ``note``: recorded in the manifest's history.

    Raises :class:`DataError` / :class:`PriorCLIPError` in one line (no index, other weights, bad vectors or ids).
    """
    path = Path(path)
    vectors = np.asarray(vectors)
    with writer_lock(_existing_index_dir(path)):
        cur = VectorIndex.open(path, verify=True)
        check_identity(cur.identity, _check_identity_dict(identity), f"index {path}")
        vectors = validate_vectors(vectors, cur.dim)
        lines = _check_items(ids, metas, len(vectors), "add")
        new = [r for r, i in enumerate(ids) if i not in cur]
        skipped = [ids[r] for r in range(len(ids)) if ids[r] in cur]
        if not new:
            _collect_garbage(path, _manifest_files(cur.manifest))  # leftovers of a writer killed after its switch
            return AddResult(0, skipped, len(cur))
        index, params = cur._index, dict(cur.manifest["params"])
        fresh = vectors[new]
        if cur.kind == "ivf" and len(cur) + len(new) > IVF_RETRAIN_GROWTH * int(params["trained_on"]):
            everything = np.concatenate([cur.all_vectors(), fresh])
            index, params = _build_faiss("ivf", everything, {"nprobe": None})
        else:
            index.add(fresh)
        m = cur.manifest
        history = list(m.get("history") or []) + [{"op": "add", "added": len(new), "skipped": len(skipped),
                                                   "at": _now(), **(note or {})}]
        fields = {"kind": m["kind"], "identity": m["identity"], "params": params, "build": m.get("build") or {},
                  "history": history}
        old_items = path / m["files"]["items"]["name"]

        def items(f):
            with open(old_items, "rb") as src:
                shutil.copyfileobj(src, f)
            f.writelines(lines[r] for r in new)

        manifest = _commit(path, index, items, fields, m)
        return AddResult(len(new), skipped, int(manifest["count"]))


def set_index_params(path: str | Path, ef_search: int | None = None, nprobe: int | None = None) -> dict:
    """Store new search defaults (``efSearch`` of hnsw, ``nprobe`` of ivf) in the manifest, atomically (the data
    files are unchanged). Returns the stored parameters."""
    path = Path(path)
    with writer_lock(_existing_index_dir(path)):
        cur = VectorIndex.open(path, verify=True)
        _user_params(cur.kind, ef_search, nprobe, cur.params.get("nlist"))
        manifest = dict(cur.manifest)
        params = dict(manifest["params"])
        if ef_search is not None:
            params["efSearch"] = int(ef_search)
        if nprobe is not None:
            params["nprobe"] = int(nprobe)
        manifest.update(params=params, updated=_now())
        _write_manifest(path, manifest)
        return params


def _existing_index_dir(path: Path) -> Path:
    if read_manifest(path) is None:
        raise DataError(_no_index_message(path))
    return path


# ---------------------------------------------------------------------------------------------------------- resuming


class PartialWork:
    """Embedded chunks of an unfinished build or add, kept under ``INDEX/.partial`` so a re-run continues.

    The work is keyed by ``fingerprint`` (a digest of the planned items and the weights): a re-run with the same
    inputs reuses every saved chunk; other inputs are refused in one line until ``restart`` discards the old work.
    Chunk ``s`` holds rows ``[s, s + chunk_size)`` of the plan (the first run's chunk size is kept), written
    atomically, so a chunk is either whole or absent.
    """

    def __init__(self, index_path: str | Path, fingerprint: str, n_items: int, chunk_size: int, dim: int,
                 restart: bool = False) -> None:
        self.dir = Path(index_path) / PARTIAL
        if restart:
            self.discard()
        state_path = self.dir / "state.json"
        state = None
        if state_path.is_file():
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = None  # a state file that cannot be read describes nothing: start over
        if state is not None and state.get("fingerprint") != fingerprint:
            raise PriorCLIPError(f"{self.dir} holds unfinished work on other inputs or weights ({state.get('n_items')} "
                                 f"items, started {state.get('started')}); re-run that command to finish it, or give "
                                 f"--restart to discard it")
        if state is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            state = {"fingerprint": fingerprint, "n_items": n_items, "chunk_size": chunk_size, "dim": dim,
                     "started": _now()}
            with _durable(state_path) as tmp:
                tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        self.n_items, self.dim = n_items, dim
        self.chunk_size = int(state["chunk_size"])

    def chunks(self) -> list[tuple[int, int]]:
        """Every chunk of the plan as ``(start, stop)``."""
        return [(s, min(s + self.chunk_size, self.n_items)) for s in range(0, self.n_items, self.chunk_size)]

    def _chunk_path(self, start: int) -> Path:
        return self.dir / f"chunk-{start:012d}.npy"

    def load(self, start: int, stop: int) -> np.ndarray | None:
        """The saved vectors of chunk ``start``, or None when absent or unusable (it is then embedded again)."""
        p = self._chunk_path(start)
        if not p.is_file():
            return None
        try:
            a = np.load(p)
        except (OSError, ValueError):
            return None
        return a if a.dtype == np.float32 and a.shape == (stop - start, self.dim) else None

    def done(self) -> int:
        """Items already embedded (in saved chunks)."""
        return sum(stop - start for start, stop in self.chunks() if self._chunk_path(start).is_file())

    def save(self, start: int, vectors: np.ndarray) -> None:
        with _durable(self._chunk_path(start)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
