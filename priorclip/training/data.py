"""Training data: image-caption pairs from a Karpathy-style JSON, a folder + CSV, or webdataset tars (RS5M keys).

Design points:

* **Decode once.** Small datasets (the RS retrieval sets are 10k images) are decoded once into an in-memory cache of
  uint8 arrays, downsized to at most the model's image size; workers forked afterwards share it copy-on-write.
* **Augmentation** (train): a RandomResizedCrop (scale 0.5-1, ratio 3/4-4/3, bicubic) and a horizontal flip, in PIL.
  Workers return uint8 [3, S, S]; the trainer normalises on the device (a quarter of the bytes through the loader).
* **Determinism.** Each sample's augmentation comes from a generator seeded by (seed, epoch, index), and each
  epoch's order from (seed, epoch), so results do not depend on the number of workers and a resumed run sees exactly
  the batches the uninterrupted run would have seen.
* **Bad images are skipped and counted, never silently**: unreadable or missing images are dropped from the cache
  (listed in the run folder) or, when decoded on the fly, dropped from their batch and reported with it.
* **Image identity.** Every batch carries ``image_ids`` [B] int64, the same on every process for the same image, so
  captions of one image can be recognised after an all-gather (the PIR loss's soft positives): the index of the image
  in its :class:`PairSource`, or, for webdataset streams, :func:`stable_image_id` of its name.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import io
import math
import tarfile
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from priorclip.data import read_karpathy_entries
from priorclip.errors import DataError
from priorclip.transforms import OPENAI_MEAN, OPENAI_STD, open_image

DATA_TYPES = ("auto", "karpathy", "csv", "wds")
CSV_IMAGE_KEYS = ("filepath", "image", "filename", "img", "path", "file")
CSV_CAPTION_KEYS = ("caption", "title", "text", "raw", "sentence")
WDS_IMAGE_KEYS = ("img_content", "jpg", "jpeg", "png", "webp", "tif", "tiff")  # RS5M first, then webdataset's usual
WDS_CAPTION_KEYS = ("caption", "txt")
WDS_NAME_KEYS = ("img_name",)


# --------------------------------------------------------------------------------------------------- sources


@dataclass
class PairSource:
    """Image-caption pairs over a list of unique images. ``labels`` is a class name per image (scene prior)."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # [N_pairs] index into images
    labels: list[str] | None = None
    description: str = ""

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.images]


def detect_type(data: str) -> str:
    p = Path(data)
    if p.suffix.lower() == ".json":
        return "karpathy"
    if p.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    if p.suffix.lower() == ".tar" or "{" in data or "*" in data or p.is_dir():
        return "wds"
    raise DataError(f"cannot tell the data type of {data!r}; pass --data-type karpathy|csv|wds")


def load_karpathy_pairs(json_path: str | Path, image_root: str | Path, split: str = "train") -> PairSource:
    """All (image, caption) pairs of one split of a Karpathy-style JSON, with each image's ``label`` if present."""
    json_path, image_root = Path(json_path), Path(image_root)
    entries = read_karpathy_entries(json_path, image_root)
    images, labels, captions, owner, splits = [], [], [], [], set()
    index: dict[str, int] = {}
    for i, e in enumerate(entries):
        splits.add(str(e.get("split")))
        if e.get("split") != split:
            continue
        name = str(Path(e.get("filepath", "")) / e["filename"])
        if name not in index:
            index[name] = len(images)
            images.append(image_root / name)
            labels.append(str(e["label"]) if e.get("label") is not None else Path(name).name.split("_", 1)[0])
        for j, s in enumerate(e["sentences"]):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                raise DataError(f"{json_path}: images[{i}].sentences[{j}] has no 'raw' string")
            captions.append(raw)
            owner.append(index[name])
    if not images:
        raise DataError(f"{json_path}: no images in split {split!r} (splits present: {', '.join(sorted(splits))})")
    return PairSource(images, captions, np.array(owner, dtype=np.int64), labels, f"{json_path} [{split}]")


def load_csv_pairs(csv_path: str | Path, image_root: str | Path | None = None) -> PairSource:
    """Pairs from a CSV/TSV with a header: an image column (filepath/image/filename/...) and a caption column
    (caption/title/text/...). Relative image paths are taken from ``image_root`` (default: the CSV's folder)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"CSV file not found: {csv_path}")
    root = Path(image_root) if image_root else csv_path.parent
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    try:
        text = csv_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not UTF-8 text") from None
    first = text.split("\n", 1)[0]
    delim = "\t" if csv_path.suffix.lower() == ".tsv" or first.count("\t") > first.count(",") else ","
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delim))
    fields = [f.strip().lower() for f in (rows[0].keys() if rows else [])]
    img_key = next((k for k in CSV_IMAGE_KEYS if k in fields), None)
    cap_key = next((k for k in CSV_CAPTION_KEYS if k in fields), None)
    if not rows or img_key is None or cap_key is None:
        raise DataError(
            f"{csv_path}: needs a header with an image column ({'/'.join(CSV_IMAGE_KEYS)}) and a caption column "
            f"({'/'.join(CSV_CAPTION_KEYS)}); found {fields or 'no rows'}"
        )
    images, captions, owner, index = [], [], [], {}
    for r in rows:
        r = {k.strip().lower(): v for k, v in r.items() if k is not None}
        rel, cap = (r.get(img_key) or "").strip(), r.get(cap_key)
        if not rel or cap is None:
            continue
        if rel not in index:
            index[rel] = len(images)
            images.append(root / rel)
        captions.append(cap)
        owner.append(index[rel])
    if not images:
        raise DataError(f"{csv_path}: no rows with both an image and a caption")
    labels = [p.name.split("_", 1)[0] for p in images]
    return PairSource(images, captions, np.array(owner, dtype=np.int64), labels, str(csv_path))


# --------------------------------------------------------------------------------------------------- images


def fit_within(img: Image.Image, size: int) -> Image.Image:
    """RGB, shortest side at most ``size`` (bicubic); smaller images are kept as they are."""
    img = img.convert("RGB")
    w, h = img.size
    short = min(w, h)
    if short > size:
        img = img.resize((max(1, round(w * size / short)), max(1, round(h * size / short))), Image.Resampling.BICUBIC)
    return img


def decode_cache(
    paths: Sequence[Path], size: int, workers: int = 8, progress: bool = False
) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
    """Decode every image once (threads: PIL releases the GIL). Returns (arrays or None, [(index, error)])."""
    from tqdm.auto import tqdm

    def load(p: Path) -> np.ndarray | str:
        try:
            return np.asarray(fit_within(open_image(p), size), dtype=np.uint8)
        except Exception as e:  # DataError and anything PIL raises for a malformed file
            return str(e)

    arrays: list[np.ndarray | None] = []
    bad: list[tuple[int, str]] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        it = pool.map(load, paths, chunksize=16)
        for i, r in enumerate(tqdm(it, total=len(paths), desc="decode", unit="img", disable=not progress)):
            if isinstance(r, str):
                arrays.append(None)
                bad.append((i, r))
            else:
                arrays.append(r)
    return arrays, bad


def random_resized_crop(
    img: Image.Image, size: int, rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """torchvision's RandomResizedCrop parameters, cropped and resized (bicubic) by PIL in one call."""
    w, h = img.size
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:  # fallback: centre crop at the clamped ratio
        in_ratio = w / h
        cw, ch = (w, int(round(w / ratio[0]))) if in_ratio < ratio[0] else (
            (int(round(h * ratio[1])), h) if in_ratio > ratio[1] else (w, h)
        )
        cw, ch = min(cw, w), min(ch, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))


class TrainTransform:
    """Random resized crop + horizontal flip -> uint8 tensor [3, S, S] (``augment=False``: resize + centre crop).

    ``randaugment``: then RandAugment(N=2, M=7), PIR-pytorch's training augmentation (spec §5B)."""

    def __init__(self, image_size: int, augment: bool = True, scale=(0.5, 1.0), randaugment: bool = False) -> None:
        from priorclip.training.randaugment import RandAugment

        self.image_size, self.augment, self.scale = image_size, augment, scale
        self.randaugment = RandAugment() if randaugment and augment else None

    def __call__(self, img: Image.Image | np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        img = img.convert("RGB")
        s = self.image_size
        if self.augment:
            img = random_resized_crop(img, s, rng, self.scale)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.randaugment is not None:
                img = self.randaugment(img, rng)
        else:
            from priorclip.transforms import resize_center_crop

            img = resize_center_crop(img, s)  # the eval transform's resize and crop, memory bounded for thin images
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, S, S]


@functools.lru_cache(maxsize=8)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1), torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1))


def normalize_on_device(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 normalised with the OpenAI mean/std (the eval transform's normalisation)."""
    mean, std = _mean_std(pixels.device)
    return (pixels.float().div_(255.0) - mean) / std


# --------------------------------------------------------------------------------------------------- datasets


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


class PairDataset(torch.utils.data.Dataset):
    """Map-style pairs; an item is addressed by ``(epoch, index)`` so its augmentation is reproducible."""

    def __init__(
        self,
        source: PairSource,
        image_size: int,
        tokens: torch.Tensor | None,
        cache: list[np.ndarray | None] | None = None,
        augment: bool = True,
        seed: int = 0,
        class_ids: list[int] | None = None,
        randaugment: bool = False,
    ) -> None:
        self.source, self.cache, self.seed = source, cache, seed
        self.tokens = tokens  # [N_pairs, L] int32, or None for classification
        self.transform = TrainTransform(image_size, augment, randaugment=randaugment)
        self.class_ids = class_ids  # per image, for classification
        self.index = np.arange(len(source.caption_image))  # pairs left after dropping bad images
        if cache is not None:
            good = np.array([a is not None for a in cache], dtype=bool)
            self.index = self.index[good[source.caption_image]]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        pair = int(self.index[i])
        img_i = int(self.source.caption_image[pair])
        path = self.source.images[img_i]
        if self.cache is not None:
            img = self.cache[img_i]
        else:
            try:
                img = open_image(path)
            except DataError as e:
                return {"skipped": (str(path), str(e))}
        item = {"pixels": self.transform(img, sample_rng(self.seed, epoch, i)), "name": path.name, "image_id": img_i}
        if self.tokens is not None:
            item["tokens"] = self.tokens[pair]
        if self.class_ids is not None:
            item["label"] = self.class_ids[img_i]
        return item


class EpochBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of ``(epoch, index)`` keys for one process.

    Each epoch shuffles with (seed, epoch). Step t takes the global batch perm[t·G:(t+1)·G] with
    G = world · accum · batch; process r takes its contiguous part and yields it as ``accum`` micro-batches. So
    accum=2 × batch 4 on one process sees exactly the samples (and the order) of batch 8, and 2 processes × batch 4
    see them too. The incomplete last global batch is dropped. ``start_step`` skips the steps a resumed run has done.
    """

    def __init__(
        self, n: int, batch_size: int, epoch: int, seed: int = 0, rank: int = 0, world: int = 1, accum: int = 1,
        start_step: int = 0, shuffle: bool = True,
    ) -> None:
        self.n, self.b, self.epoch, self.seed = n, batch_size, epoch, seed
        self.rank, self.world, self.accum, self.start_step, self.shuffle = rank, world, accum, start_step, shuffle

    @property
    def steps(self) -> int:
        return self.n // (self.world * self.accum * self.b)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        local = self.accum * self.b
        for t in range(self.start_step, self.steps):
            base = t * self.world * local + self.rank * local
            for j in range(self.accum):
                s = base + j * self.b
                yield [(self.epoch, perm[k]) for k in range(s, s + self.b)]


def collate(items: list[dict]) -> dict:
    """Stack good items; unreadable ones are left out and listed under ``skipped`` (the trainer counts them)."""
    good = [it for it in items if "skipped" not in it]
    out = {"skipped": [it["skipped"] for it in items if "skipped" in it], "names": [it["name"] for it in good]}
    if good:
        out["pixels"] = torch.stack([it["pixels"] for it in good])
        if "tokens" in good[0]:
            out["tokens"] = pad_rows([it["tokens"] for it in good])
        if "label" in good[0]:
            out["labels"] = torch.tensor([it["label"] for it in good], dtype=torch.long)
        if "image_id" in good[0]:
            out["image_ids"] = torch.tensor([it["image_id"] for it in good], dtype=torch.long)
    return out


def pad_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack 1-D token rows as int64 [B, L], right-padding shorter ones with 0 (CLIP's and BERT's padding id): CLIP
    rows all have the context length; PIR's WordPiece rows have their own lengths."""
    n = max(len(r) for r in rows)
    out = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def tokenize_pairs(src: PairSource, tokenizer: Callable[[Sequence[str]], torch.Tensor]
                   ) -> tuple[PairSource, torch.Tensor, int]:
    """(the pairs whose caption the tokenizer takes, their ids [N, L] int32, how many pairs it refused).

    Each distinct caption is tokenised once (RSICD repeats many). PIR's cleaning (pre_caption) refuses a caption with
    no words left, as the reference does, where it would stop the run (AID/RSICD's train split has two): only then
    are the distinct captions tried one by one, to leave those pairs out.
    """
    uniq = sorted(set(src.captions))
    try:
        table = tokenizer(uniq)
        refused: set[str] = set()
    except DataError:
        def takes(c: str) -> bool:
            try:
                tokenizer([c])
                return True
            except DataError:
                return False

        refused = {c for c in uniq if not takes(c)}
        uniq = [c for c in uniq if c not in refused]
        table = tokenizer(uniq)
    keep = np.array([i for i, c in enumerate(src.captions) if c not in refused], dtype=np.int64)
    n_refused = len(src.captions) - len(keep)
    if n_refused:
        src = dataclasses.replace(src, captions=[src.captions[i] for i in keep],
                                  caption_image=np.asarray(src.caption_image)[keep])
    where = {c: i for i, c in enumerate(uniq)}
    return src, table.to(torch.int32)[torch.tensor([where[c] for c in src.captions], dtype=torch.long)], n_refused


# --------------------------------------------------------------------------------------------------- webdataset


def expand_shards(spec: str) -> list[str]:
    """``a/{000..127}.tar``, a glob, a folder of .tar files, or a comma/space separated list of those."""
    out: list[str] = []
    for part in spec.replace(",", " ").split():
        if "{" in part:
            pre, rest = part.split("{", 1)
            rng, post = rest.split("}", 1)
            lo, hi = rng.split("..")
            out += [f"{pre}{str(i).zfill(len(lo))}{post}" for i in range(int(lo), int(hi) + 1)]
        elif any(c in part for c in "*?["):
            out += sorted(glob.glob(part))
        elif Path(part).is_dir():
            out += sorted(str(p) for p in Path(part).glob("*.tar"))
        else:
            out.append(part)
    missing = [s for s in out if not Path(s).is_file()]
    if not out:
        raise DataError(f"no webdataset shards match {spec!r}")
    if missing:
        raise DataError(f"{len(missing)} of {len(out)} webdataset shards not found, e.g. {missing[0]}")
    return out


def iter_tar_samples(path: str) -> Iterator[dict[str, bytes]]:
    """Group tar members into samples by key (the name up to the first dot of the base name), webdataset-style."""
    try:
        with tarfile.open(path, "r|*") as tar:
            cur_key, cur = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                d, base = m.name.rsplit("/", 1) if "/" in m.name else ("", m.name)
                key, _, ext = base.partition(".")
                key = f"{d}/{key}" if d else key
                if key != cur_key and cur:
                    yield cur
                    cur = {}
                cur_key = key
                f = tar.extractfile(m)
                cur["__key__"] = key.encode()
                cur[ext.lower()] = f.read() if f else b""
            if cur:
                yield cur
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read webdataset shard {path}: {e}") from None


def stable_image_id(name: str) -> int:
    """A 63-bit id of an image name (blake2b, so the same on every process and run, unlike ``hash``); distinct names
    collide with probability about k²/2⁶⁴ for k names in a global batch."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def count_tar_samples(paths: Sequence[str]) -> int:
    return sum(1 for p in paths for _ in iter_tar_samples(p))


@dataclass
class WdsCounters:
    missing_keys: int = 0
    bad_images: int = 0
    examples: list[str] = field(default_factory=list)


class WebDatasetStream(torch.utils.data.IterableDataset):
    """An endless, resampled stream of samples from RS5M-style tars (``img_content``, ``caption``, ``img_name``).

    Every (epoch, process, worker) reads the shards in its own seeded order (all shards when there are fewer shards
    than readers, a disjoint share otherwise) through a seeded shuffle buffer. Samples without a caption or an image
    are dropped and counted; undecodable images too (both reported in the batch's ``skipped``).
    """

    def __init__(
        self, shards: list[str], image_size: int, seed: int = 0, rank: int = 0, world: int = 1, epoch: int = 0,
        shuffle_buffer: int = 1000, context_length: int = 77, augment: bool = True,
        tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None, randaugment: bool = False,
    ) -> None:
        self.shards, self.seed, self.rank, self.world, self.epoch = shards, seed, rank, world, epoch
        self.buffer, self.context_length = shuffle_buffer, context_length
        self.tokenizer = tokenizer  # default: CLIP's for context_length
        self.transform = TrainTransform(image_size, augment, randaugment=randaugment)

    def _samples(self, rng: np.random.Generator, reader: int, readers: int) -> Iterator[dict]:
        from priorclip.tokenizer import clip_tokenizer

        tok = self.tokenizer or clip_tokenizer(self.context_length)
        while True:
            order = list(rng.permutation(len(self.shards)))
            mine = order[reader::readers] if len(self.shards) >= readers else order
            for s in mine:
                for raw in iter_tar_samples(self.shards[s]):
                    img_b = next((raw[k] for k in WDS_IMAGE_KEYS if k in raw), None)
                    cap_b = next((raw[k] for k in WDS_CAPTION_KEYS if k in raw), None)
                    key = raw["__key__"].decode("utf-8", "replace")
                    if img_b is None or cap_b is None:
                        yield {"skipped": (f"{self.shards[s]}:{key}", "missing caption or img_content")}
                        continue
                    name_b = next((raw[k] for k in WDS_NAME_KEYS if k in raw), None)
                    name = name_b.decode("utf-8", "replace").strip() if name_b else key
                    try:
                        img = open_image(img_b)
                    except DataError as e:
                        yield {"skipped": (f"{self.shards[s]}:{key}", str(e))}
                        continue
                    try:
                        tokens = tok(cap_b.decode("utf-8", "replace"))[0]
                    except DataError as e:  # a caption PIR's cleaning leaves empty
                        yield {"skipped": (f"{self.shards[s]}:{key}", str(e))}
                        continue
                    yield {
                        "pixels": self.transform(img, rng),
                        "tokens": tokens,
                        "name": name,
                        "image_id": stable_image_id(name),
                    }

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * nw + wid, self.world * nw
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, reader])
        buf: list[dict] = []
        for item in self._samples(rng, reader, readers):
            if "skipped" in item:
                yield item
                continue
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item


def batched_stream(stream: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group a stream into lists holding ``batch_size`` good items (skipped items ride along with their batch)."""
    items, good = [], 0
    for it in stream:
        items.append(it)
        good += "skipped" not in it
        if good == batch_size:
            yield items
            items, good = [], 0


class _BatchedWds(torch.utils.data.IterableDataset):
    def __init__(self, ds: WebDatasetStream, batch_size: int) -> None:
        self.ds, self.batch_size = ds, batch_size

    def __iter__(self):
        for items in batched_stream(iter(self.ds), self.batch_size):
            yield collate(items)


def wds_loader(
    ds: WebDatasetStream, batch_size: int, workers: int, pin: bool, worker_init_fn=None
) -> torch.utils.data.DataLoader:
    """Batches are formed inside each worker (full micro-batches of good samples)."""
    return torch.utils.data.DataLoader(
        _BatchedWds(ds, batch_size), batch_size=None, num_workers=workers, pin_memory=pin,
        persistent_workers=False, prefetch_factor=4 if workers else None, worker_init_fn=worker_init_fn,
    )
