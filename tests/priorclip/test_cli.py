"""The `priorclip` CLI end to end on the tiny model, and its one-line answers to bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from priorclip import create_model
from priorclip.checkpoint import save_checkpoint
from priorclip.cli import main
from priorclip.synthetic import make_sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("sample"), n_images=12, size=72)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    # a user mistake must end in SystemExit with a message, never in an uncaught exception
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def user_error(result, match):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("Error: ") and match in lines[-1], result.output
    assert "Traceback" not in result.output


def test_info_lists_configs():
    r = run("info", "--json")
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert rows["priorclip-vit-b32"]["params_total"] == 188_939_105
    assert abs(rows["priorclip-vit-b32"]["gflop_text"] - 5.96) < 0.01  # spec §8A: 5.96 GFLOP per 77-token caption


def test_embed_images_and_captions(tmp_path, sample):
    _, img_dir = sample
    r = run("embed", "--model", "priorclip-tiny", "--images", img_dir, "--out", tmp_path / "img.npy", "--device", "cpu")
    assert r.exit_code == 0, r.output
    emb = np.load(tmp_path / "img.npy")
    index = [json.loads(x) for x in (tmp_path / "img.index.jsonl").read_text().splitlines()]
    assert emb.shape == (12, 32) and len(index) == 12 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert index[0]["image"].endswith(sorted(p.name for p in img_dir.iterdir())[0])
    caps = tmp_path / "c.txt"
    caps.write_text("a lake\n\nsome farmland\n")
    r = run("embed", "--model", "priorclip-tiny", "--captions", caps, "--out", tmp_path / "cap", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "cap.npy").shape == (2, 32)


def test_embed_is_the_model(tmp_path, sample):
    """The CLI's rows equal encode_image on the same preprocessing (checkpoint round trip included)."""
    from priorclip.transforms import EvalTransform, open_image

    torch.manual_seed(4)
    model = create_model("priorclip-tiny")
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    _, img_dir = sample
    assert run("embed", "--checkpoint", ckpt, "--images", img_dir, "--out", tmp_path / "e.npy").exit_code == 0
    first = sorted(img_dir.iterdir())[0]
    with torch.no_grad():
        want = model.encode_image(EvalTransform(64)(open_image(first)).unsqueeze(0))[0].numpy()
    assert np.abs(np.load(tmp_path / "e.npy")[0] - want).max() < 1e-5


def test_eval_writes_metrics(tmp_path, sample):
    json_path, img_dir = sample
    out = tmp_path / "m.json"
    r = run("eval", "--model", "priorclip-tiny", "--dataset", json_path, "--images", img_dir, "--out", out, "--batch-size", "5")
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["n_images"] == 12 and rep["n_captions"] == 60
    assert set(rep["metrics"]) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR"}
    assert "chance (random ranking)" in r.output


def test_bad_inputs(tmp_path, sample):
    json_path, img_dir = sample
    user_error(run("eval", "--dataset", tmp_path / "none.json", "--images", img_dir), "not found")
    (tmp_path / "shape.json").write_text('{"images": {"a": 1}}')
    user_error(run("eval", "--model", "priorclip-tiny", "--dataset", tmp_path / "shape.json", "--images", img_dir), "'images' list")
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(run("embed", "--model", "priorclip-tiny", "--images", empty, "--out", tmp_path / "x.npy"), "no image files")
    user_error(run("embed", "--model", "priorclip-tiny", "--out", tmp_path / "x.npy"), "exactly one of")
    user_error(run("embed", "--model", "nope", "--captions", tmp_path / "none.txt", "--out", tmp_path / "x.npy"), "not found")
    user_error(run("info", "--model", "nope"), "unknown model 'nope'")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    user_error(run("eval", "--checkpoint", tmp_path / "bad.pt", "--dataset", json_path, "--images", img_dir), "not a readable")
    torch.save(create_model("clip-tiny").state_dict(), tmp_path / "clip.pt")
    user_error(run("eval", "--model", "priorclip-tiny", "--checkpoint", tmp_path / "clip.pt", "--dataset", json_path, "--images", img_dir), "missing keys")
    if not torch.cuda.is_available():
        user_error(run("eval", "--model", "priorclip-tiny", "--dataset", json_path, "--images", img_dir, "--device", "cuda"), "no CUDA")


def test_corrupt_image_in_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (70, 70), (i * 50, 0, 0)).save(folder / f"lake_{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    user_error(run("embed", "--model", "priorclip-tiny", "--images", folder, "--out", tmp_path / "e.npy"), "broken.jpg")
    r = run("embed", "--model", "priorclip-tiny", "--images", folder, "--out", tmp_path / "e.npy", "--skip-bad")
    assert r.exit_code == 0
    assert np.load(tmp_path / "e.npy").shape[0] == 3
    assert "broken.jpg" in (tmp_path / "e.skipped.txt").read_text()
    assert len((tmp_path / "e.index.jsonl").read_text().splitlines()) == 3


@pytest.mark.data
def test_eval_on_aid_rsicd_subset(tmp_path, aid_rsicd):
    """Real data end to end (tiny model, first 40 test images); the full-size run is in benchmarks/results/."""
    out = tmp_path / "m.json"
    r = run("eval", "--model", "priorclip-tiny", "--dataset", aid_rsicd / "dataset_rsicd_aid.json",
            "--images", aid_rsicd / "images", "--limit", "40", "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["n_images"] == 40 and rep["n_captions"] == 200
