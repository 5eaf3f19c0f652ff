"""Evaluation data: Karpathy-style dataset JSON (RSICD, RSITMD, UCM, Sydney), image folders and caption files.

:func:`load_karpathy` follows the reference ``retrieval.py`` (spec §6A): only the requested split, images
deduplicated and sorted by file name (``np.unique``), each image's ``raw`` sentences grouped under it in file order,
``str.capitalize`` applied (harmless for lower-casing tokenizers, kept for fidelity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from priorclip.errors import DataError
from priorclip.transforms import IMAGE_SUFFIXES


@dataclass
class RetrievalSet:
    """Images, captions and which image each caption describes."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # [N_txt] int64: index into ``images``

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

    @property
    def labels(self) -> list[str]:
        """Scene class of each image: the file name up to the first underscore (the reference's affiliation label)."""
        return [p.name.split("_", 1)[0] for p in self.images]

    def subset(self, n_images: int) -> RetrievalSet:
        """The first ``n_images`` images with their captions (for quick runs)."""
        keep = self.caption_image < n_images
        return RetrievalSet(self.images[:n_images], [c for c, k in zip(self.captions, keep) if k], self.caption_image[keep])


def load_karpathy(json_path: str | Path, image_root: str | Path, split: str = "test", check_files: bool = True) -> RetrievalSet:
    """Read one split of a Karpathy-style dataset JSON; raises :class:`DataError` on any malformed input."""
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
    names = sorted(grouped)  # np.unique order
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


def read_karpathy_entries(json_path: Path, image_root: Path) -> list[dict]:
    """The validated ``images`` entries of a Karpathy-style JSON (each has a ``filename`` and a ``sentences`` list)."""
    if not json_path.is_file():
        raise DataError(f"dataset JSON not found: {json_path}")
    if not image_root.is_dir():
        raise DataError(f"image folder not found: {image_root}")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{json_path}: expected a Karpathy-style object with an 'images' list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("filename"), str) or not isinstance(e.get("sentences"), list):
            raise DataError(f"{json_path}: images[{i}] needs a 'filename' string and a 'sentences' list")
    return entries


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; raises :class:`DataError` if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


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
