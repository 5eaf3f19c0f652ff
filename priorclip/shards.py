"""Webdataset shards for bulk embedding: shard patterns, the I/N split a scheduler fans out, and samples read from
tar files with the standard library (the ``webdataset`` package is not needed).

A bulk job runs ``priorclip embed --shards PATTERN --shard I/N`` once per I. The shards a pattern names are sorted,
and job I takes those whose position is I modulo N: whole shards, so each job reads only its own files, the jobs
need no coordination, and together they cover every sample exactly once. Their outputs merge into one index.

Samples follow webdataset's conventions. A tar's regular-file members are grouped, in stored order, by key: the
member's path up to the first dot of its base name (``dir/0001.rgb.tif`` has key ``dir/0001`` and extension
``rgb.tif``, compared in lower case); a member whose base name has no such dot is ignored, as webdataset ignores it.
A sample's image is its member whose extension ends in a format PIL decodes (single-part extensions first, then
jpg, jpeg, png, tif, tiff, webp, RS5M's ``img_content``, any other, then by name); its captions come from ``.txt`` /
``.caption`` (one per non-empty line) and ``.json`` (a string, a list of strings, or an object's ``captions`` /
``caption`` / ``text``). Keys must be unique: an index id is the key.

Shards are read twice: :func:`scan_shards` reads only the tar headers (seeks over the data of a plain tar), so a
corrupt tar, a repeated key or a sample without an image stops a job before the model loads and gives the progress
bar its total; :func:`iter_samples` then streams each tar, holding one sample's bytes at a time, and
:func:`embed_samples` embeds them a batch at a time through :func:`priorclip.retrieval.embed_images`, the folder
mode's path (an image decodes exactly as the same file in a folder would).
"""

from __future__ import annotations

import glob
import json
import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from priorclip.errors import DataError, PriorCLIPError

PREFERRED_IMAGE_EXTS = ("jpg", "jpeg", "png", "tif", "tiff", "webp", "img_content")  # img_content: RS5M's image
CAPTION_EXTS = ("txt", "caption", "json")
JSON_CAPTION_FIELDS = ("captions", "caption", "text")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # the tars a folder given as a pattern holds
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)  # OSError: gzip's BadGzipFile too


# --------------------------------------------------------------------------------------------------- patterns


def brace_expand(pattern: str) -> list[str]:
    """Expand brace notation as webdataset (``braceexpand``) and bash do: ``{000..127}`` (zero-padded to the longer
    bound when a bound has a leading zero; ``{0..10..2}`` with a step; descending ranges too), ``{a,b,c}`` (items may
    nest braces), several braces as a product, in order. A brace that is neither (``{x}``, ``{}``) stays literal."""
    start = 0
    while (i := pattern.find("{", start)) >= 0:
        j = _closing_brace(pattern, i)
        if j < 0:
            break
        items = _brace_items(pattern[i + 1 : j])
        if items is None:
            start = i + 1
            continue
        tails = brace_expand(pattern[j + 1 :])
        return [pattern[:i] + head + tail for item in items for head in brace_expand(item) for tail in tails]
    return [pattern]


def _closing_brace(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return -1


_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?:\.\.(\d+))?$")


def _brace_items(body: str) -> list[str] | None:
    """The alternatives of a brace's body, or None when it is not one to expand."""
    parts, depth, last = [], 0, 0
    for k, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[last:k])
            last = k + 1
    if parts:
        return parts + [body[last:]]
    m = _RANGE.match(body)
    if not m:
        return None
    lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
    if step == 0:
        return None
    padded = any(len(b) > 1 and b.startswith("0") for b in m.group(1, 2))
    width = max(len(m.group(1)), len(m.group(2))) if padded else 0
    values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    return [str(v).zfill(width) for v in values]


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """The shard files that ``patterns`` name, sorted and without repeats (as normalised paths), so that every job of
    a fan-out sees the same list.

    Each pattern is a tar path, a glob (``data/*.tar``), brace notation (``data/train-{000000..000999}.tar``,
    ``data/{train,val}-{00..09}.tar``; globs may follow it) or a folder (the tars directly inside). Every file brace
    notation names must exist (a missing numbered shard would leave its samples out silently), and each pattern must
    match at least one file. Raises :class:`DataError`.
    """
    if not patterns:
        raise DataError("no shard pattern given")
    found: set[str] = set()
    for pattern in patterns:
        matched: list[str] = []
        missing: list[str] = []
        names = brace_expand(pattern)
        for name in names:
            if glob.has_magic(name):
                matched += [p for p in glob.glob(name) if os.path.isfile(p)]
            elif os.path.isdir(name):
                inside = [str(p) for p in Path(name).iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES)]
                if not inside:
                    raise DataError(f"shard folder {name} holds no tar file ({', '.join(TAR_SUFFIXES)})")
                matched += inside
            elif os.path.isfile(name):
                matched.append(name)
            else:
                missing.append(name)
        if missing:
            of = f" of the {len(names)} files {pattern!r} names" if len(names) > 1 else ""
            raise DataError(f"shard not found: {missing[0]}" + (f" ({len(missing)}{of} are missing)" if of else ""))
        if not matched:
            raise DataError(f"no shard file matches {pattern!r}")
        found.update(os.path.normpath(p) for p in matched)
    return sorted(found)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) to ``(I, N)``; raises :class:`PriorCLIPError` with the accepted form."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise PriorCLIPError(f"expected I/N (job I of N, counted from 0), e.g. 0/16, got {spec!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise PriorCLIPError(f"{spec!r}: the number of jobs N must be at least 1")
    if index >= count:
        raise PriorCLIPError(f"{spec!r}: job index {index} is out of range for {count} jobs (I counts from 0: "
                             f"0..{count - 1}; for 1-based ids such as a SLURM array 1-{count}, pass $((ID - 1)))")
    return index, count


def select_shards(shards: Sequence[str], index: int, count: int) -> list[str]:
    """Job ``index`` of ``count``: the shards at positions i with i % count == index (whole shards)."""
    return list(shards[index::count])


# --------------------------------------------------------------------------------------------------- tar members


def split_member(name: str) -> tuple[str, str] | None:
    """A member name's (key, extension in lower case), webdataset's way; None for a name it ignores."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _image_rank(ext: str) -> tuple[int, int] | None:
    """Sort key of an image member by its extension (lower wins), or None when it is not an image."""
    from priorclip.transforms import image_suffixes

    parts = ext.split(".")
    last = parts[-1]
    if last in PREFERRED_IMAGE_EXTS:
        pref = PREFERRED_IMAGE_EXTS.index(last)
    elif "." + last in image_suffixes():
        pref = len(PREFERRED_IMAGE_EXTS)
    else:
        return None
    return len(parts), pref  # a plain <key>.png before <key>.mask.jpg, whatever the formats


def pick_image(members: Sequence[tuple[str, str]]) -> str | None:
    """The image member of a sample given as (member name, extension) pairs, or None when it has none."""
    ranked = [(rank, name) for name, ext in members if (rank := _image_rank(ext)) is not None]
    return min(ranked)[1] if ranked else None


class UnreadableShard(DataError):
    """A tar that cannot be read (missing, corrupt, truncated): the whole shard, not one sample."""


def _tar_reason(e: BaseException) -> str:
    text = str(e).strip()
    if text.startswith("file could not be opened successfully"):  # tarfile's r:* lists each method it tried
        return "not a tar file (plain, gzip, bzip2 or xz)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return text.splitlines()[0] if text else type(e).__name__


def _members(path: str, read: Callable[[str], bool] | None) -> Iterator[tuple[str, bytes | None]]:
    """A tar's regular-file members in stored order: (name, its bytes where ``read(name)``, else None).

    ``read=None`` reads headers only (random access: a plain tar's data is seeked over); otherwise the tar is streamed
    and only the wanted members' data is read. Raises :class:`DataError` naming the shard.
    """
    try:
        with tarfile.open(path, "r:*" if read is None else "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                data = None
                if read is not None and read(m.name):
                    f = tar.extractfile(m)
                    data = f.read() if f is not None else b""
                yield m.name, data
    except _TAR_ERRORS as e:
        raise UnreadableShard(f"cannot read shard {path}: {_tar_reason(e)}") from None


def _groups(members: Iterable[tuple[str, bytes | None]], ignored: list[str] | None = None
            ) -> Iterator[tuple[str, list[tuple[str, str, bytes | None]]]]:
    """Consecutive members of one key: (key, [(name, ext, data)]); names without a key go to ``ignored``."""
    key, group = None, []
    for name, data in members:
        parts = split_member(name)
        if parts is None:
            if ignored is not None:
                ignored.append(name)
            continue
        if parts[0] != key and group:
            yield key, group
            group = []
        key = parts[0]
        group.append((name, parts[1], data))
    if group:
        yield key, group


# --------------------------------------------------------------------------------------------------- scanning


@dataclass
class Scan:
    """What :func:`scan_shards` found in the selected shards (headers only)."""

    shards: list[str]  # the readable ones, in order
    samples: int  # samples in them, bad ones included
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason), left out under skip_bad
    ignored: int = 0  # members webdataset ignores (no key.extension name)
    several_images: int = 0  # samples with more than one image member (the preferred one is embedded)


def scan_shards(paths: Sequence[str], skip_bad: bool = False, progress: bool = True) -> Scan:
    """Read the tar headers of ``paths``: count samples, refuse a key used twice (in one shard or two), and, unless
    ``skip_bad``, a sample with no image or an unreadable tar (with ``skip_bad`` such a tar is left out whole, named
    in ``unreadable``; a sample with no image is left out when it is read). Raises :class:`DataError`."""
    from tqdm.auto import tqdm

    owner: dict[str, int] = {}  # key -> position in paths of the shard that holds it
    scan = Scan([], 0)
    for si, path in enumerate(tqdm(paths, desc="scan", unit="shard", disable=not progress or len(paths) < 2)):
        ignored: list[str] = []
        keys: set[str] = set()
        several = 0
        try:
            for key, group in _groups(_members(path, None), ignored):
                exts = [ext for _, ext, _ in group]
                if key in keys or len(set(exts)) < len(exts):  # apart in the tar, or one extension twice
                    raise DataError(_duplicate(key, path, path))
                if key in owner:
                    raise DataError(_duplicate(key, paths[owner[key]], path))
                images = sum(_image_rank(ext) is not None for ext in exts)
                if images == 0 and not skip_bad:
                    raise DataError(f"{path}: sample {key!r} has no image member ({_listing(group)}); "
                                    f"--skip-bad leaves such samples out")
                several += images > 1
                keys.add(key)
        except UnreadableShard as e:
            if not skip_bad:
                raise
            scan.unreadable.append((path, str(e)))
            continue
        owner.update(dict.fromkeys(keys, si))
        scan.shards.append(path)
        scan.samples += len(keys)
        scan.ignored += len(ignored)
        scan.several_images += several
    return scan


def _duplicate(key: str, first: str, second: str) -> str:
    if first == second:
        return (f"sample key {key!r} occurs twice in shard {first} (a sample's files must be stored one after "
                f"another, each extension once); an index id must be unique")
    return f"sample key {key!r} occurs in shards {first} and {second}; an index id must be unique"


def _listing(group: Sequence[tuple[str, str, Any]]) -> str:
    names = [name for name, _, _ in group]
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


# --------------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    shard: str
    key: str
    member: str  # the image member
    image: bytes
    captions: tuple[str, ...]


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str
    reason: str


def iter_samples(path: str) -> Iterator[Sample | BadSample]:
    """Stream the samples of one tar, in stored order, holding one sample's image and caption bytes at a time."""

    def wanted(name: str) -> bool:
        parts = split_member(name)
        return parts is not None and (parts[1] in CAPTION_EXTS or _image_rank(parts[1]) is not None)

    for key, group in _groups(_members(path, wanted)):
        image = pick_image([(name, ext) for name, ext, _ in group])
        if image is None:
            yield BadSample(path, key, f"no image member ({_listing(group)})")
            continue
        try:
            captions = _captions(group)
        except DataError as e:
            yield BadSample(path, key, str(e))
            continue
        data = next(d for name, _, d in group if name == image)
        yield Sample(path, key, image, data or b"", captions)


def _captions(group: Sequence[tuple[str, str, bytes | None]]) -> tuple[str, ...]:
    """A sample's captions from its .txt / .caption / .json members, in that order, without repeats."""
    out: list[str] = []
    for want in CAPTION_EXTS:
        for name, ext, data in group:
            if ext != want:
                continue
            try:
                text = (data or b"").decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"caption member {name} is not UTF-8 text") from None
            if ext == "json":
                out += _json_captions(name, text)
            else:
                out += [line.strip() for line in text.splitlines() if line.strip()]
    return tuple(dict.fromkeys(c for c in out if c))


def _json_captions(name: str, text: str) -> list[str]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"caption member {name} is not valid JSON ({e})") from None
    if isinstance(doc, dict):  # metadata: the captions are in one of its fields, or it has none
        doc = next((doc[k] for k in JSON_CAPTION_FIELDS if k in doc), [])
    if isinstance(doc, str):
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(c, str) for c in doc):
        raise DataError(f"caption member {name}: expected a string, a list of strings, or an object with "
                        f"{'/'.join(JSON_CAPTION_FIELDS)}")
    return [c.strip() for c in doc]


# --------------------------------------------------------------------------------------------------- embedding


@dataclass
class ShardEmbedding:
    embeddings: np.ndarray  # float32 [N, E], L2-normalised
    rows: list[dict]  # the index line of each row
    skipped: list[BadSample]
    multi_page: list[str]  # "shard:key (pages)" of samples whose image has several pages (page 0 is embedded)


def embed_samples(encoder, samples: Iterable[Sample | BadSample], batch_size: int = 64, skip_bad: bool = False,
                  total: int | None = None, progress: bool = True) -> ShardEmbedding:
    """Embed streamed samples a batch at a time with the folder mode's own path
    (:func:`priorclip.retrieval.embed_images` on the image bytes).

    Each image's header is checked first (format, pixel limit, pages); a batch that fails to decode is read again one
    sample at a time to find which. A bad sample raises one :class:`DataError` line naming its shard and key, or with
    ``skip_bad`` is left out (in ``skipped``, with the reason).
    """
    from tqdm.auto import tqdm

    from priorclip.preprocess import preprocess_for
    from priorclip.retrieval import embed_images
    from priorclip.transforms import check_image

    transform = preprocess_for(encoder).transform
    chunks: list[np.ndarray] = []
    rows: list[dict] = []
    skipped: list[BadSample] = []
    multi: list[str] = []
    batch: list[tuple[Sample, int]] = []  # (sample, pages)

    def bad(s: Sample | BadSample, reason: str) -> None:
        if not skip_bad:
            raise DataError(f"{s.shard}: sample {s.key!r}: {reason}")
        skipped.append(BadSample(s.shard, s.key, reason))

    def named(e: DataError, member: str) -> str:  # transforms name an image read from bytes "<bytes>"
        return str(e).replace("<bytes>", member)

    def flush() -> None:
        good = list(batch)
        batch.clear()
        try:
            emb = embed_images(encoder, [s.image for s, _ in good], len(good), progress=False)
        except DataError:
            readable = []
            for s, pages in good:
                try:
                    transform.load(s.image)
                except DataError as e:
                    bad(s, named(e, s.member))
                    continue
                readable.append((s, pages))
            if len(readable) == len(good):
                raise
            good = readable
            if not good:
                return
            emb = embed_images(encoder, [s.image for s, _ in good], len(good), progress=False)
        chunks.append(emb.float().numpy())
        for s, pages in good:
            row = {"row": len(rows), "key": s.key, "shard": s.shard, "member": s.member}
            if s.captions:
                row["captions"] = list(s.captions)
            if pages > 1:
                row.update(page=0, pages=pages)
            rows.append(row)

    with tqdm(total=total, desc="samples", unit="sample", disable=not progress) as bar:
        for s in samples:
            bar.update(1)
            if isinstance(s, BadSample):
                bad(s, s.reason)
                continue
            try:
                pages = check_image(s.image, decode=False).pages
            except DataError as e:
                bad(s, named(e, s.member))
                continue
            if pages > 1:
                multi.append(f"{s.shard}:{s.key} ({pages})")
            batch.append((s, pages))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    dim = int(encoder.config.embed_dim)
    emb = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dim), np.float32)
    return ShardEmbedding(emb, rows, skipped, multi)
