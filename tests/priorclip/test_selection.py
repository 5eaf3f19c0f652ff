"""Class-spread selection: parity, recall, calibration and validation subsets cover the scene classes, never "the
first N" of a class-sorted file list."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from priorclip.data import (RetrievalSet, default_dataset, describe_selection, load_karpathy, resolve_dataset,
                            spread, spread_indices)
from priorclip.errors import DataError


def class_sorted(n_classes: int, per_class: list[int]) -> list[str]:
    return [f"c{k:02d}" for k in range(n_classes) for _ in range(per_class[k])]


@pytest.mark.parametrize("n", [1, 7, 30, 31, 64, 100, 299, 300])
def test_every_selection_is_balanced_over_classes(n):
    rng = np.random.default_rng(n)
    per_class = list(rng.integers(3, 15, size=30))
    labels = class_sorted(30, per_class)
    idx = spread_indices(labels, n, seed=0)
    assert idx == sorted(set(idx)) and len(idx) == min(n, len(labels))
    counts = Counter(labels[i] for i in idx)
    # each class gives n // 30 or one more, except a class that runs out (then it gives all it has)
    fair = n // 30
    for k in range(30):
        c = counts.get(f"c{k:02d}", 0)
        assert c == per_class[k] or fair <= c <= fair + 1 or (n < 30 and c <= 1), (k, c, per_class[k])
    if n >= 30:
        assert len(counts) == 30
    if n < len(labels):  # never the first N
        assert idx != list(range(n))


def test_deterministic_per_seed_and_different_across_seeds():
    labels = class_sorted(5, [20] * 5)
    assert spread_indices(labels, 10, seed=3) == spread_indices(labels, 10, seed=3)
    assert spread_indices(labels, 10, seed=3) != spread_indices(labels, 10, seed=4)
    assert spread(list("abcdefghij"), list("aabbccddee"), 0) == list("abcdefghij")  # 0 = all
    assert spread_indices(labels, 0) == [] and spread_indices(labels, 1000) == list(range(100))


def _retrieval_set(n_classes=6, per=5, caps=(5, 3)) -> RetrievalSet:
    images = [Path(f"cls{k}_{i}.jpg") for k in range(n_classes) for i in range(per)]
    captions, owner = [], []
    for j, p in enumerate(images):
        for c in range(caps[j % len(caps)]):
            captions.append(f"{p.stem} caption {c}")
            owner.append(j)
    return RetrievalSet(images, captions, np.array(owner))


def test_subset_keeps_each_images_own_captions_and_records_coverage():
    ds = _retrieval_set()
    sub = ds.subset(12, seed=1)
    assert len(sub.images) == 12
    for cap, owner in zip(sub.captions, sub.caption_image):
        assert cap.startswith(sub.images[owner].stem + " ")  # captions still point at their own image
    want = [c for c, o in zip(ds.captions, ds.caption_image) if ds.images[o] in sub.images]
    assert sub.captions == want
    d = sub.describe()
    assert d["n_classes"] == 6 and d["per_class_min"] == d["per_class_max"] == 2
    assert d["selection"] == {"method": "class-spread", "seed": 1, "from_images": 30, "from_classes": 6}
    assert d["coverage"].startswith("12 images over 6 of 6 classes (2-2 per class)")
    assert ds.subset(100) is ds  # asking for at least the whole set returns it unchanged
    assert describe_selection(["a", "a", "b"])["coverage"] == "3 images over 2 classes (1-2 per class)"


def test_calibration_draw_spreads_images_and_captions_over_classes():
    ds = _retrieval_set()  # 6 classes x 5 images, 5 or 3 captions each, class-sorted
    images, captions, d = ds.spread_draw(12, 18, seed=2)
    assert Counter(p.name.split("_")[0] for p in images) == {f"cls{k}": 2 for k in range(6)}
    owner = {c: ds.images[o].name.split("_")[0] for c, o in zip(ds.captions, ds.caption_image)}
    assert Counter(owner[c] for c in captions) == {f"cls{k}": 3 for k in range(6)}  # captions by their image's class
    assert images != ds.images[:12] and captions != ds.captions[:18]
    assert d["n_images"] == 12 and d["n_captions"] == 18 and d["coverage"].startswith("12 images over 6 of 6 classes")
    all_images, all_captions, _ = ds.spread_draw(0, 0)
    assert all_images == ds.images and all_captions == ds.captions


def test_export_calibration_from_a_karpathy_json_is_class_spread(tmp_path):
    from priorclip.export.cli import load_calibration
    from priorclip.synthetic import SCENES, make_sample

    j, _ = make_sample(tmp_path, n_images=4 * len(SCENES), size=32, split="train")
    calib = load_calibration(j, None, "train", len(SCENES), 2 * len(SCENES))
    assert Counter(p.name.split("_")[0] for p in calib.images) == {s: 1 for s in SCENES}
    assert len(calib.captions) == 2 * len(SCENES) and f"over {len(SCENES)} of {len(SCENES)} classes" in calib.source
    with pytest.raises(DataError, match="no images in split 'test'"):
        load_calibration(j, None, "test", 4, 4)


@pytest.mark.data
def test_real_test_split_subsets_cover_all_classes(aid_rsicd):
    test = load_karpathy(aid_rsicd / "dataset_rsicd_aid.json", aid_rsicd / "images", "test")
    first32 = {p.name.split("_")[0] for p in test.images[:32]}
    assert len(first32) == 1  # why "the first N" is wrong here: one class
    sub = test.subset(256)
    d = sub.describe()
    assert d["n_classes"] == 30 and d["per_class_min"] >= 8 and d["per_class_max"] <= 9
    assert len(sub.captions) == 5 * 256


def test_dataset_resolution(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    (folder / "d.json").write_text("{}")
    assert resolve_dataset(folder) == (folder / "d.json", folder / "images")
    assert resolve_dataset(folder / "d.json", tmp_path) == (folder / "d.json", tmp_path)
    (folder / "e.json").write_text("{}")
    with pytest.raises(DataError, match="expected one Karpathy-style JSON"):
        resolve_dataset(folder)
    with pytest.raises(DataError, match="not found"):
        resolve_dataset(tmp_path / "nowhere.json")
    monkeypatch.chdir(tmp_path)  # none of the default folders exists here
    monkeypatch.delenv("PRIORCLIP_DATASET", raising=False)
    assert default_dataset() is None
    monkeypatch.setenv("PRIORCLIP_DATASET", str(folder / "d.json"))
    assert default_dataset() == (folder / "d.json", folder / "images")
    monkeypatch.setenv("PRIORCLIP_DATASET", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="PRIORCLIP_DATASET"):
        default_dataset()
