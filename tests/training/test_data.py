"""Training data: the three input forms, bad inputs, the sampler's partition, the augmentation."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from priorclip.errors import DataError
from priorclip.training import data as tdata


def _jpeg(color=(10, 120, 200), size=40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def test_karpathy_pairs_and_labels(tiny_data):
    json_path, img_dir = tiny_data
    src = tdata.load_karpathy_pairs(json_path, img_dir, "train")
    assert len(src.images) == 16 and len(src.captions) == 80
    assert src.labels[0] == src.images[0].name.split("_")[0]
    assert np.bincount(src.caption_image).tolist() == [5] * 16
    with pytest.raises(DataError, match="no images in split 'nope'"):
        tdata.load_karpathy_pairs(json_path, img_dir, "nope")
    with pytest.raises(DataError, match="image folder not found"):
        tdata.load_karpathy_pairs(json_path, img_dir / "missing", "train")
    with pytest.raises(DataError, match="dataset JSON not found"):
        tdata.load_karpathy_pairs(img_dir / "x.json", img_dir, "train")


def test_csv_pairs(tmp_path):
    (tmp_path / "im").mkdir()
    for n in ("a_1.jpg", "b_2.jpg"):
        (tmp_path / "im" / n).write_bytes(_jpeg())
    (tmp_path / "d.tsv").write_text("filepath\ttitle\na_1.jpg\tone\nb_2.jpg\ttwo\na_1.jpg\tthree\n")
    src = tdata.load_csv_pairs(tmp_path / "d.tsv", tmp_path / "im")
    assert [p.name for p in src.images] == ["a_1.jpg", "b_2.jpg"]
    assert src.captions == ["one", "two", "three"] and src.caption_image.tolist() == [0, 1, 0]
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match="image column"):
        tdata.load_csv_pairs(tmp_path / "bad.csv", tmp_path / "im")


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_rs5m_keys_drop_and_count(tmp_path):
    good = [(f"s{i:03d}", {"img_content": _jpeg((i * 20, 50, 50)), "caption": f"scene {i}".encode(),
                           "img_name": f"farm_{i}.jpg".encode()}) for i in range(6)]
    bad = [("nocap", {"img_content": _jpeg()}), ("broken", {"img_content": b"not an image", "caption": b"x"})]
    _write_shard(tmp_path / "000.tar", good[:3] + bad)
    _write_shard(tmp_path / "001.tar", good[3:])
    shards = tdata.expand_shards(str(tmp_path / "{000..001}.tar"))
    assert len(shards) == 2 and tdata.count_tar_samples(shards) == 8
    ds = tdata.WebDatasetStream(shards, 32, seed=0, shuffle_buffer=2)
    it = iter(ds)
    items = [next(it) for _ in range(8)]  # one pass (the stream is endless)
    skipped = [i["skipped"] for i in items if "skipped" in i]
    ok = [i for i in items if "skipped" not in i]
    assert len(skipped) == 2 and any("missing caption" in s[1] for s in skipped)
    assert any("cannot decode" in s[1] for s in skipped)
    assert {i["name"] for i in ok} <= {f"farm_{k}.jpg" for k in range(6)}
    assert ok[0]["pixels"].shape == (3, 32, 32) and ok[0]["pixels"].dtype == torch.uint8
    batch = tdata.collate(next(tdata.batched_stream(iter(items), 3)))
    assert batch["tokens"].shape[0] == 3
    with pytest.raises(DataError, match="not found"):
        tdata.expand_shards(str(tmp_path / "{000..003}.tar"))


def test_cache_skips_and_counts_corrupt_images(tmp_path):
    paths = []
    for i, data in enumerate([_jpeg(), b"garbage", _jpeg(size=400)]):
        p = tmp_path / f"c_{i}.jpg"
        p.write_bytes(data)
        paths.append(p)
    paths.append(tmp_path / "missing_9.jpg")
    arrays, bad = tdata.decode_cache(paths, 64, workers=2)
    assert [i for i, _ in bad] == [1, 3]
    assert arrays[0].shape == (40, 40, 3)  # small images stay at their size
    assert min(arrays[2].shape[:2]) == 64  # large ones are reduced once


@pytest.mark.parametrize("world,accum", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_sampler_partition_matches_the_big_batch(world, accum):
    n, b = 50, 3
    big = list(tdata.EpochBatchSampler(n, b * accum * world, epoch=4, seed=1))
    parts = [list(tdata.EpochBatchSampler(n, b, 4, 1, rank=r, world=world, accum=accum)) for r in range(world)]
    steps = len(big)
    assert all(len(p) == steps * accum for p in parts)
    for t in range(steps):
        got = [k for r in range(world) for j in range(accum) for k in parts[r][t * accum + j]]
        assert got == big[t]
    resumed = list(tdata.EpochBatchSampler(n, b, 4, 1, world=1, accum=accum, start_step=2))
    assert resumed == list(tdata.EpochBatchSampler(n, b, 4, 1, world=1, accum=accum))[2 * accum:]


def test_augmentation_is_reproducible_and_varied():
    arr = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    tf = tdata.TrainTransform(32)
    a = tf(arr, tdata.sample_rng(0, 1, 5))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, tf(arr, tdata.sample_rng(0, 1, 5)))
    assert not torch.equal(a, tf(arr, tdata.sample_rng(0, 2, 5)))
    plain = tdata.TrainTransform(32, augment=False)(arr, tdata.sample_rng(0, 0, 0))
    assert plain.shape == (3, 32, 32)


def test_normalisation_matches_eval_transform():
    from priorclip.transforms import to_normalized_tensor

    arr = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    ref = to_normalized_tensor(Image.fromarray(arr))
    got = tdata.normalize_on_device(torch.from_numpy(arr).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(got, ref)
