"""Evaluation data: Karpathy-style dataset JSON (RSICD, RSITMD, UCM, Sydney), PIR-pytorch's split JSON, image
folders and caption files.

Two evaluation protocols order a test set (:func:`load_retrieval_set`):

- ``priorclip`` (spec §6A, PriorCLIP's ``retrieval.py``): only the requested split, images deduplicated and sorted by
  file name (``np.unique``), each image's ``raw`` sentences grouped under it in file order, ``str.capitalize``
  applied (harmless for lower-casing tokenizers, kept for fidelity);
- ``pir`` (spec §6B, PIR-pytorch's ``itm_eval``): images and their captions in file order. The ranking maths are the
  same; the order matters to PIR, whose caption embeddings depend on which captions share a chunk of 128.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from priorclip.errors import DataError
from priorclip.transforms import image_suffixes


@dataclass
class RetrievalSet:
    """Images, captions and which image each caption describes."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # [N_txt] int64: index into ``images``
    selection: dict | None = field(default=None, compare=False)  # how a subset was drawn (see :meth:`subset`)

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.caption_image) != len(self.captions):
            raise ValueError("caption_image must have one entry per caption")
        if len(self.images) == 0 or len(self.captions) == 0:
            raise DataError("retrieval set is empty")
        if self.caption_image.min() < 0 or self.caption_image.max() >= len(self.images):
            raise ValueError("caption_image indexes outside the image list")
        if len(np.unique(self.caption_image)) != len(self.images):
            raise DataError("every image needs at least one caption")

    @cached_property  # computed once: callers index it per caption
    def labels(self) -> list[str]:
        """Scene class of each image: the file name up to the first underscore (the reference's affiliation label)."""
        return [image_label(p) for p in self.images]

    def subset(self, n_images: int, seed: int = 0) -> RetrievalSet:
        """``n_images`` images spread over the scene classes (:func:`spread_indices`), with their captions.

        Never "the first N": dataset files sort by class, so the first 32 AID/RSICD test images are all airports.
        The kept images stay in dataset order; ``selection`` records how they were drawn.
        """
        if n_images >= len(self.images):
            return self
        keep = spread_indices(self.labels, n_images, seed)
        new_index = np.full(len(self.images), -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        mask = new_index[self.caption_image] >= 0
        selection = {"method": "class-spread", "seed": seed, "from_images": len(self.images),
                     "from_classes": len(set(self.labels))}
        return RetrievalSet([self.images[i] for i in keep], [c for c, k in zip(self.captions, mask) if k],
                            new_index[self.caption_image[mask]], selection)

    def describe(self) -> dict:
        """Size and class coverage, as reports state them."""
        return describe_selection(self.labels, n_captions=len(self.captions), selection=self.selection)

    def spread_draw(self, n_images: int, n_captions: int, seed: int = 0) -> tuple[list[Path], list[str], dict]:
        """``n_images`` images and ``n_captions`` captions (0: all), each spread over the scene classes (captions by
        their image's class), and the images' :func:`describe_selection` record: an INT8 calibration draw."""
        labels = self.labels
        keep = spread_indices(labels, n_images, seed) if n_images > 0 else list(range(len(labels)))
        captions = spread(self.captions, [labels[i] for i in self.caption_image], n_captions, seed)
        desc = describe_selection([labels[i] for i in keep], n_captions=len(captions),
                                  selection={"method": "class-spread", "seed": seed, "from_images": len(labels),
                                             "from_classes": len(set(labels))})
        return [self.images[i] for i in keep], captions, desc


def spread_indices(labels: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` items spread evenly over the classes in ``labels``, deterministic for a ``seed``.

    Classes take turns (in a seeded order), each giving its next item from a seeded shuffle of its own, so every class
    gets ``n // n_classes`` or one more (fewer only when it runs out). Returned in ascending order.
    """
    if n >= len(labels):
        return list(range(len(labels)))
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    classes = sorted(groups)
    queues = [list(rng.permutation(groups[c])) for c in classes]
    turn = [queues[i] for i in rng.permutation(len(classes))]
    picked: list[int] = []
    while len(picked) < n:
        for q in turn:
            if q and len(picked) < n:
                picked.append(int(q.pop(0)))
        turn = [q for q in turn if q]
    return sorted(picked)


def spread(items: Sequence, labels: Sequence[str], n: int, seed: int = 0) -> list:
    """``n`` of ``items`` spread over their ``labels`` (all of them when ``n`` is 0 or at least their number)."""
    if n <= 0:
        return list(items)
    return [items[i] for i in spread_indices(labels, n, seed)]


def describe_selection(labels: Sequence[str], n_captions: int | None = None, selection: dict | None = None) -> dict:
    """``{"n_images", "n_captions", "n_classes", "per_class_min", "per_class_max", "coverage", ...}`` of a set."""
    counts = Counter(labels)
    out = {"n_images": len(labels), "n_classes": len(counts),
           "per_class_min": min(counts.values(), default=0), "per_class_max": max(counts.values(), default=0)}
    if n_captions is not None:
        out["n_captions"] = n_captions
    if selection:
        out["selection"] = dict(selection)
    of = f" of {selection['from_classes']}" if selection and "from_classes" in selection else ""
    out["coverage"] = (f"{len(labels)} images over {len(counts)}{of} classes "
                       f"({out['per_class_min']}-{out['per_class_max']} per class)"
                       + (f", drawn class-spread (seed {selection['seed']}) from {selection['from_images']}"
                          if selection and selection.get("method") == "class-spread" else ""))
    return out


def image_label(path: str | Path) -> str:
    """Scene class of an image file: its name up to the first underscore (the reference's affiliation label)."""
    return Path(path).name.split("_", 1)[0]


PROTOCOL_PRIORCLIP = "priorclip"  # spec §6A
PROTOCOL_PIR = "pir"  # spec §6B
PROTOCOLS = (PROTOCOL_PRIORCLIP, PROTOCOL_PIR)


def load_retrieval_set(json_path: str | Path, image_root: str | Path, split: str = "test",
                       protocol: str = PROTOCOL_PRIORCLIP) -> RetrievalSet:
    """One split of a Karpathy-style JSON in the ``protocol``'s order, or a PIR-pytorch split file (a JSON list of
    ``{"image", "caption": [...]}`` records, itself one split, always in file order)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown evaluation protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    json_path, image_root = Path(json_path), Path(image_root)
    doc = _read_json(json_path, image_root)
    if isinstance(doc, list):
        return _pir_records(doc, json_path, image_root)
    return load_karpathy(json_path, image_root, split, order="file" if protocol == PROTOCOL_PIR else "sorted")


def _pir_records(doc: list, json_path: Path, image_root: Path) -> RetrievalSet:
    paths, captions, owner = [], [], []
    for i, e in enumerate(doc):
        caps = e.get("caption") if isinstance(e, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(caps, list) or not caps \
                or not all(isinstance(c, str) for c in caps):
            raise DataError(f"{json_path}: record [{i}] needs an 'image' string and a 'caption' string or list of strings")
        owner += [len(paths)] * len(caps)
        captions += caps
        paths.append(image_root / e["image"])
    if not paths:
        raise DataError(f"{json_path}: no records")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} images are missing under {image_root}, e.g. {missing[0].name}")
    return RetrievalSet(paths, captions, np.array(owner))


def load_karpathy(json_path: str | Path, image_root: str | Path, split: str = "test", check_files: bool = True,
                  order: str = "sorted") -> RetrievalSet:
    """Read one split of a Karpathy-style dataset JSON; raises :class:`DataError` on any malformed input.

    ``order``: ``"sorted"`` by file name (PriorCLIP's ``np.unique``) or ``"file"`` (first appearance, PIR-pytorch)."""
    json_path, image_root = Path(json_path), Path(image_root)
    entries = read_karpathy_entries(json_path, image_root)
    grouped: dict[str, list[str]] = {}
    splits: set[str] = set()
    for i, e in enumerate(entries):
        splits.add(str(e.get("split")))
        if e.get("split") != split:
            continue
        name = str(Path(e.get("filepath", "")) / e["filename"])
        for j, s in enumerate(e["sentences"]):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                raise DataError(f"{json_path}: images[{i}].sentences[{j}] has no 'raw' string")
            grouped.setdefault(name, []).append(raw.capitalize())
        grouped.setdefault(name, [])
    if not grouped:
        raise DataError(f"{json_path}: no images in split {split!r} (splits present: {', '.join(sorted(splits)) or 'none'})")
    names = sorted(grouped) if order == "sorted" else list(grouped)  # np.unique order, or the file's
    captionless = [n for n in names if not grouped[n]]
    if captionless:
        raise DataError(f"{json_path}: {len(captionless)} {split} images have no captions, e.g. {captionless[0]}")
    paths = [image_root / n for n in names]
    if check_files:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(paths)} {split} images are missing under {image_root}, e.g. {missing[0].name}")
    captions = [c for n in names for c in grouped[n]]
    owner = [i for i, n in enumerate(names) for _ in grouped[n]]
    return RetrievalSet(paths, captions, np.array(owner))


# Where a real retrieval dataset is looked for when none is named: $PRIORCLIP_DATASET first, then the folders this
# project's machines use (relative to the working directory). Parity, recall and calibration default to it, so a
# verdict rests on real images whenever they are reachable; generated scenes are the labelled fallback.
DATASET_ENV = "PRIORCLIP_DATASET"
DEFAULT_DATASET_DIRS = ("../shared/data/aid-rsicd", "shared/data/aid-rsicd", ".bench-data/aid-rsicd",
                        "/tmp/data/aid-rsicd")


def resolve_dataset(path: str | Path, images: str | Path | None = None) -> tuple[Path, Path]:
    """(dataset JSON, image folder) from a Karpathy JSON or a folder holding exactly one JSON and ``images/``."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise DataError(f"{path}: expected one Karpathy-style JSON in the folder, found {len(found)}")
        return found[0], Path(images) if images else path / "images"
    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    return path, Path(images) if images else path.parent / "images"


def default_dataset() -> tuple[Path, Path] | None:
    """The real dataset to use when none is named (``$PRIORCLIP_DATASET``, then :data:`DEFAULT_DATASET_DIRS`)."""
    env = os.environ.get(DATASET_ENV)
    for cand in ([env] if env else []) + list(DEFAULT_DATASET_DIRS):
        try:
            json_path, images = resolve_dataset(cand)
        except DataError:
            if cand == env:
                raise DataError(f"${DATASET_ENV}={env}: not a Karpathy JSON or a folder holding one") from None
            continue
        if images.is_dir():
            return json_path, images
    return None


def has_split(json_path: str | Path, image_root: str | Path, split: str) -> bool:
    """Whether a (valid) Karpathy-style JSON has images in ``split``; a malformed file raises :class:`DataError`."""
    return any(e.get("split") == split for e in read_karpathy_entries(Path(json_path), Path(image_root)))


def _read_json(json_path: Path, image_root: Path):
    if not json_path.is_file():
        raise DataError(f"dataset JSON not found: {json_path}")
    if not image_root.is_dir():
        raise DataError(f"image folder not found: {image_root}")
    try:
        return json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None


def read_karpathy_entries(json_path: Path, image_root: Path) -> list[dict]:
    """The validated ``images`` entries of a Karpathy-style JSON (each has a ``filename`` and a ``sentences`` list)."""
    doc = _read_json(json_path, image_root)
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{json_path}: expected a Karpathy-style object with an 'images' list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("filename"), str) or not isinstance(e.get("sentences"), list):
            raise DataError(f"{json_path}: images[{i}] needs a 'filename' string and a 'sentences' list")
    return entries


@dataclass
class ImageListing:
    """What :func:`list_images` found: the image files, and the other files it left out with the reason."""

    files: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_images(folder: str | Path) -> ImageListing:
    """Files directly inside ``folder`` in a format PIL decodes (by suffix: :func:`priorclip.transforms.image_suffixes`,
    GIF and TIFF included), sorted by name; every other file is named in ``skipped`` (world files, READMEs, ...).

    Only the suffix is looked at: a listed file that does not decode fails (or is skipped) where it is read. Sub-folders
    are not entered. Raises :class:`DataError` if the folder is missing or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    suffixes = image_suffixes()
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if p.suffix.lower() in suffixes:
            files.append(p)
        else:
            skipped.append((p, f"not an image format PIL reads ({p.suffix or 'no suffix'})"))
    if not files:
        seen = f"; {len(skipped)} other files, e.g. {skipped[0][0].name}" if skipped else ""
        raise DataError(f"no image files (any format PIL reads: .jpg, .png, .tif, .gif, ...) in {folder}{seen}")
    return ImageListing(files, skipped)


@dataclass
class CheckedImages:
    """What :func:`check_images` found: the readable images, the page count of multi-page ones (page 0 is embedded)
    and the unreadable ones with the reason."""

    paths: list[Path]
    pages: dict[Path, int] = field(default_factory=dict)
    bad: list[tuple[Path, str]] = field(default_factory=list)

    def multi_page_note(self, name=lambda p: Path(p).name) -> str | None:
        """The one-line note every tool prints for multi-page files (None when there are none)."""
        if not self.pages:
            return None
        multi = [f"{name(p)} ({n})" for p, n in self.pages.items()]
        return (f"note: {len(multi)} images have several pages or frames; page 0 of each is embedded: "
                + ", ".join(multi[:5]) + (", ..." if len(multi) > 5 else ""))


def check_images(paths: Sequence[str | Path], skip_bad: bool, draft_size: int) -> CheckedImages:
    """The check every embedding tool makes before its first batch (``priorclip embed``, ``priorclip index``): each
    image's header (format, pixel limit, pages), and with ``skip_bad`` a full decode as embedding will decode it, so
    no batch fails half-way and rows stay aligned with their files. Without ``skip_bad`` the first unreadable file
    raises :class:`DataError`; with it, it is listed in ``bad``, and if none is readable :class:`DataError` says so."""
    from priorclip.transforms import check_image

    out = CheckedImages([])
    for p in paths:
        try:
            info = check_image(p, decode=skip_bad, draft_size=draft_size)
        except DataError as e:
            if not skip_bad:
                raise
            out.bad.append((Path(p), str(e)))
            continue
        out.paths.append(p)
        if info.pages > 1:
            out.pages[p] = info.pages
    if not out.paths and out.bad:
        raise DataError(f"none of the {len(out.bad)} images could be read, e.g. {out.bad[0][0]}: {out.bad[0][1]}")
    return out


def read_captions(path: str | Path) -> list[str]:
    """Captions from a text file (one per non-empty line) or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: caption file is not UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            caps = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DataError(f"{path}: expected a JSON list of caption strings")
    else:
        caps = [line.strip() for line in text.splitlines() if line.strip()]
    if not caps:
        raise DataError(f"no captions in {path}")
    return caps
