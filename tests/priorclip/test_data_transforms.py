"""Dataset JSON reading (spec §6A ordering), image loading and the eval transform, with bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from priorclip.data import list_images, load_karpathy, read_captions
from priorclip.errors import DataError
from priorclip.transforms import OPENAI_MEAN, OPENAI_STD, EvalTransform, open_image


def write_dataset(tmp_path, entries, images=()):
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "img" / name)
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"images": entries}))
    return p, tmp_path / "img"


def entry(name, split, *caps):
    return {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": []} for c in caps]}


def test_karpathy_order_grouping_and_split(tmp_path):
    p, img = write_dataset(
        tmp_path,
        [entry("b_2.jpg", "test", "two b", "other b"), entry("a_1.jpg", "test", "one a"), entry("c_3.jpg", "train", "x")],
        ["a_1.jpg", "b_2.jpg", "c_3.jpg"],
    )
    ds = load_karpathy(p, img)
    assert [x.name for x in ds.images] == ["a_1.jpg", "b_2.jpg"]  # sorted like np.unique
    assert ds.captions == ["One a", "Two b", "Other b"]  # capitalize(), grouped per image in file order
    assert ds.caption_image.tolist() == [0, 1, 1]
    assert ds.labels == ["a", "b"]
    assert load_karpathy(p, img, "train").captions == ["X"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps([1, 2]), "'images' list"),
        (json.dumps({"images": [{"filename": "a.jpg"}]}), "needs a 'filename'"),
        (json.dumps({"images": [entry("a.jpg", "train", "x")]}), "no images in split 'test'"),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"tokens": []}]}]}), "no 'raw'"),
        (json.dumps({"images": [entry("zz.jpg", "test", "x")]}), "missing"),
    ],
)
def test_karpathy_bad_inputs(tmp_path, content, match):
    (tmp_path / "img").mkdir()
    p = tmp_path / "d.json"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_karpathy(p, tmp_path / "img")


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_karpathy(tmp_path / "none.json", tmp_path)
    with pytest.raises(DataError, match="no image files"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_captions(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no captions"):
        read_captions(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="JSON list"):
        read_captions(tmp_path / "bad.json")


def test_open_image_rejects_corrupt(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot decode"):
        open_image(tmp_path / "x.jpg")
    good = tmp_path / "g.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "t.jpg").write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(DataError):
        open_image(tmp_path / "t.jpg")


def test_eval_transform_geometry_and_values():
    # 300x200 (w x h): shortest side 200 -> 224, long side int(224*300/200) = 336; centre crop left = (336-224)/2 = 56
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[:, :150] = 255  # left half white: after resize+crop, columns left of x = 150*336/300 - 56 = 112 are white
    x = EvalTransform(224)(Image.fromarray(arr))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    white = torch.tensor([(1 - m) / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)])
    black = torch.tensor([(0 - m) / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)])
    assert torch.allclose(x[:, 100, 100], white, atol=1e-5)
    assert torch.allclose(x[:, 100, 124], black, atol=1e-5)
    assert torch.allclose(x[:, 100, 110], white, atol=1e-2)  # 2 px from the edge: bicubic support is 2 px
    # grey-scale and RGBA inputs become 3 channels; a square image already at size is not resampled
    assert EvalTransform(64)(Image.new("L", (64, 64), 128)).shape == (3, 64, 64)
    assert EvalTransform(64)(Image.new("RGBA", (80, 64), (255, 0, 0, 10))).shape == (3, 64, 64)
    exact = EvalTransform(4)(Image.fromarray(np.full((4, 4, 3), 51, np.uint8)))
    assert torch.allclose(exact[0], torch.full((4, 4), (0.2 - OPENAI_MEAN[0]) / OPENAI_STD[0]), atol=1e-6)


def test_high_bit_depth_tiles_are_scaled_not_clipped(tmp_path):
    a16 = np.full((40, 50), 32896, dtype=np.uint16)  # mid-grey in 16 bits: 32896 / 257 = 128
    Image.fromarray(a16).save(tmp_path / "g16.png")
    img = open_image(tmp_path / "g16.png")
    assert img.mode == "L" and np.asarray(img).max() == 128
    Image.fromarray(np.full((40, 50), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")  # reflectance in [0, 1]
    assert np.asarray(open_image(tmp_path / "f.tif")).max() == 128
    x = EvalTransform(32)(open_image(tmp_path / "g16.png"))
    assert torch.allclose(x[0], torch.full((32, 32), (128 / 255 - OPENAI_MEAN[0]) / OPENAI_STD[0]), atol=1e-5)
