"""open_clip's entry points (priorclip.tokenize / get_tokenizer / create_model_and_transforms /
create_model_from_pretrained): same call shapes and results as open_clip's, on our models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import priorclip
from priorclip.checkpoint import save_checkpoint
from priorclip.errors import PriorCLIPError
from priorclip.transforms import OPENAI_MEAN, OPENAI_STD

CAPTIONS = ["Many planes are parked near the terminal.", "a river crosses the farmland", "storage tanks " * 40]


def test_tokenize_and_get_tokenizer_match_open_clip(open_clip):
    ref = open_clip.tokenizer.SimpleTokenizer()  # open_clip.get_tokenizer("ViT-B-32") returns this tokenizer
    want = ref(CAPTIONS)
    assert torch.equal(priorclip.tokenize(CAPTIONS), want)
    for name in ("priorclip-vit-b32", "PIR", "clip-tiny", ""):
        assert torch.equal(priorclip.get_tokenizer(name)(CAPTIONS), want), name
    assert torch.equal(priorclip.get_tokenizer("PIR", context_length=16)(CAPTIONS), ref(CAPTIONS, context_length=16))
    assert priorclip.get_tokenizer("PIR")(CAPTIONS, context_length=24).shape == (3, 24)  # per-call length, as open_clip


def test_unknown_model_name_is_one_line():
    with pytest.raises(PriorCLIPError, match=r"unknown model 'ViT-H-14'.*priorclip-vit-b32.*open_clip names: PIR"):
        priorclip.get_tokenizer("ViT-H-14")
    with pytest.raises(PriorCLIPError, match="unknown model"):
        priorclip.create_model_and_transforms("ViT-H-14")


def test_model_and_transforms_as_open_clip_returns_them(tmp_path):
    torch.manual_seed(3)
    src = priorclip.create_model("priorclip-tiny")
    path = save_checkpoint(src, tmp_path / "tiny.pt")
    model, train_pre, val_pre = priorclip.create_model_and_transforms(pretrained=str(path))  # config from the file
    assert model.cfg.name == "priorclip-tiny" and not model.training
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    x = val_pre(img)
    # the eval transform by hand: shortest side 90 -> 64 (bicubic), centre crop 64, OpenAI mean/std
    r = img.resize((int(64 * 120 / 90), 64), Image.Resampling.BICUBIC)
    left = int(round((r.width - 64) / 2.0))
    by_hand = (torch.from_numpy(np.asarray(r.crop((left, 0, left + 64, 64)), dtype=np.float64)).permute(2, 0, 1) / 255.0
               - torch.tensor(OPENAI_MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(OPENAI_STD, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(x.double(), by_hand, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x[None]), src.encode_image(x[None]))
        torch.testing.assert_close(model.encode_text(priorclip.get_tokenizer("priorclip-tiny")(CAPTIONS)),
                                   src.encode_text(priorclip.tokenize(CAPTIONS)))
    # checkpoint= is this package's name for pretrained=
    same, _, _ = priorclip.create_model_and_transforms("priorclip-tiny", checkpoint=path)
    assert torch.equal(same.logit_scale, src.logit_scale)


def test_train_preprocess_augments_and_normalises():
    _, train_pre, _ = priorclip.create_model_and_transforms("priorclip-tiny", seed=0)
    flat = Image.new("RGB", (100, 80), (200, 10, 90))  # crops, flips and bicubic resizes keep a flat image flat
    want = (torch.tensor([200, 10, 90]) / 255.0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    y = train_pre(flat)
    assert y.shape == (3, 64, 64) and y.dtype == torch.float32
    torch.testing.assert_close(y, want.view(3, 1, 1).expand(3, 64, 64), atol=1e-6, rtol=0)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    a, b = train_pre(img), train_pre(img)
    assert not torch.equal(a, b)  # a fresh random crop per call
    _, again, _ = priorclip.create_model_and_transforms("priorclip-tiny", seed=0)
    again(flat)
    assert torch.equal(again(img), a)  # seeded: the same draws in the same order


def test_from_pretrained_precision_and_bad_arguments(tmp_path):
    torch.manual_seed(4)
    src = priorclip.create_model("priorclip-tiny")
    path = save_checkpoint(src, tmp_path / "tiny.safetensors")
    model, pre = priorclip.create_model_from_pretrained("priorclip-tiny", str(path), precision="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert isinstance(priorclip.create_model_from_pretrained(pretrained=path, return_transform=False), torch.nn.Module)
    x = pre(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[None]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model.encode_image(x.bfloat16()).float(), src.encode_image(x))
    assert cos.item() > 0.99
    with pytest.raises(PriorCLIPError, match="needs weights"):
        priorclip.create_model_from_pretrained("priorclip-tiny")
    with pytest.raises(PriorCLIPError, match="not both"):
        priorclip.create_model_and_transforms(pretrained=path, checkpoint=path)
    with pytest.raises(PriorCLIPError, match=r"pretrained='openai': no such file.*download tags"):
        priorclip.create_model_and_transforms("PIR", pretrained="openai")
    with pytest.raises(PriorCLIPError, match="precision='amp'"):
        priorclip.create_model_and_transforms("priorclip-tiny", precision="amp")
    with pytest.raises(PriorCLIPError, match="checkpoint not found"):
        priorclip.create_model_and_transforms("priorclip-tiny", pretrained=tmp_path / "missing.pt")
