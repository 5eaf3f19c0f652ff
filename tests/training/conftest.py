"""Tiny generated training data: 24 class-named images (64 px) x 5 captions, split 16 / 4 / 4."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:  # the DDP and script tests import helpers as tests.training.* (also under bare `pytest`)
    sys.path.insert(0, _REPO)

from priorclip.synthetic import make_sample


def make_tiny(root, n_images: int = 24, size: int = 64):
    json_path, img_dir = make_sample(root, n_images=n_images, size=size, seed=0, split="train")
    doc = json.loads(json_path.read_text())
    n_val = max(2, n_images // 6)
    for i, e in enumerate(doc["images"]):
        e["split"] = "train" if i < n_images - 2 * n_val else ("val" if i < n_images - n_val else "test")
    json_path.write_text(json.dumps(doc))
    return json_path, img_dir


def train_config(tiny_data, out, **kw):
    """A TrainConfig for the tiny data: clip-tiny, one epoch of batch 8, no workers, no validation, no epoch files."""
    from priorclip.training.trainer import TrainConfig

    json_path, img_dir = tiny_data
    base = dict(data=str(json_path), images=str(img_dir), out=str(out), model="clip-tiny", epochs=1, batch_size=8,
                workers=0, progress=False, tensorboard=False, val_split=None, test_split=None, warmup=2, lr=1e-3,
                log_every=1, epoch_checkpoints=False)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))
