"""Hostile and unusual image files on every entry point that reads images (issue 14, "Images").

Each class of input (a PNG header declaring 900 Mpx, a corrupt file, a non-image file in a folder, a GIF, a
multi-page TIFF, a 4000 x 3 strip, a large JPEG) is fed to embed (with and without --skip-bad), eval, the INT8
calibration loader and the benchmark's image decode; each must end as one line or be skipped and named.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from priorclip import create_model, transforms
from priorclip.checkpoint import save_checkpoint
from priorclip.cli import main
from priorclip.data import list_images
from priorclip.errors import DataError, PriorCLIPError
from priorclip.transforms import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    EvalTransform,
    center_crop,
    check_image,
    open_image,
    resize_center_crop,
    resize_shortest,
)

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A valid PNG header declaring w x h RGB pixels, with a few bytes of image data: PIL reads the size from it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def save_frames(path, colors, size=(40, 30)):
    frames = [Image.new("RGB", size, c) for c in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.fixture(autouse=True)
def _pil_guard(monkeypatch):
    """open_image lifts PIL's global guard (by design, for the process); give it back after each test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)


def run(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def one_error_line(result, *parts):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and all(p in errors[0] for p in parts), result.output


# ------------------------------------------------------------------------------------------------ the pixel limit


def test_bomb_header_is_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    for call in (lambda: open_image(tmp_path / "bomb.png"), lambda: check_image(tmp_path / "bomb.png", decode=False),
                 lambda: EvalTransform(64).load(tmp_path / "bomb.png")):
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert "bomb.png" in msg and "900,000,000 pixels" in msg and f"{DEFAULT_MAX_PIXELS:,}" in msg
        assert MAX_PIXELS_ENV in msg
    # just over the default limit, under PIL's error: refused by our header check, with the dimensions
    with pytest.raises(DataError, match=r"16385x16384 = 268,451,840 pixels"):
        check_image(bomb_png(16385, 16384), decode=False)
    assert check_image(bomb_png(16384, 16384), decode=False).size == (16384, 16384)  # the limit itself passes


def test_pixel_limit_from_the_environment_and_the_argument(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30), RED).save(tmp_path / "a.png")  # 1200 pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, "1199")
    with pytest.raises(DataError, match=r"a\.png declares 40x30 = 1,200 pixels .* limit of 1,199"):
        open_image(tmp_path / "a.png")
    assert open_image(tmp_path / "a.png", max_pixels=1200).size == (40, 30)  # the argument wins over the variable
    monkeypatch.setenv(MAX_PIXELS_ENV, "1_200")
    assert open_image(tmp_path / "a.png").size == (40, 30)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # no limit: PIL's own guard must not refuse the 900 Mpx header either
    assert check_image(bomb_png(), decode=False).size == (30000, 30000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(PriorCLIPError, match=r"PRIORCLIP_MAX_PIXELS='lots': expected a whole number"):
        open_image(tmp_path / "a.png")


def test_undecodable_files_raise_one_data_error(tmp_path):
    good = tmp_path / "g.png"
    Image.new("RGB", (64, 64), RED).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "dir.png").mkdir()
    for name, match in (("trunc.png", "cannot decode image"), ("text.jpg", "cannot decode image"),
                        ("dir.png", "is a folder"), ("none.png", "not found")):
        with pytest.raises(DataError, match=match) as e:
            check_image(tmp_path / name)
        assert name in str(e.value)


# ------------------------------------------------------------------------------------------- large JPEG, thin strips


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    n = 1800  # >= 2 * DRAFT_MARGIN * 112 * 8: decoded at 1/8 scale for S = 112 (a 4000 px tile is the same at S = 224)
    grad = Image.linear_gradient("L").resize((n, n))
    scene = Image.merge("RGB", (grad, Image.effect_noise((n, n), 40), grad.rotate(90)))  # smooth + fine detail
    buf = io.BytesIO()
    scene.save(buf, "JPEG", quality=30)
    return buf.getvalue()


def test_large_jpeg_decodes_at_reduced_scale_small_ones_exactly(big_jpeg, monkeypatch):
    big, n = big_jpeg, 1800
    # under DRAFT_MIN_PIXELS (16.8 Mpx) a JPEG decodes in full: exactly the reference pipeline's pixels
    assert open_image(big, draft_size=112).size == (n, n)
    assert torch.equal(EvalTransform(112).load(big), EvalTransform(112)(open_image(big)))
    monkeypatch.setattr(transforms, "DRAFT_MIN_PIXELS", n * n - 1)  # this scene stands in for a 100 Mpx tile
    assert open_image(big, draft_size=112).size == (225, 225) and open_image(big).size == (n, n)  # 64x fewer pixels
    full, drafted = EvalTransform(112)(open_image(big)), EvalTransform(112).load(big)
    # measured on this scene: cosine 0.99980, max |diff| 0.13 in normalised units (~9 uint8 levels, on the noise)
    assert torch.nn.functional.cosine_similarity(full.flatten(), drafted.flatten(), dim=0) > 0.9995
    assert not torch.equal(full, drafted)  # it really took the reduced path
    # an RSICD-sized 600 x 600 JPEG is below the draft threshold at S = 224: exactly the reference path
    buf = io.BytesIO()
    open_image(big).crop((0, 0, 600, 600)).save(buf, "JPEG", quality=90)
    assert torch.equal(EvalTransform(224).load(buf.getvalue()), EvalTransform(224)(open_image(buf.getvalue())))


@pytest.mark.parametrize("shape", [(3, 2000, 3), (2000, 5, 3), (37, 1500)])
def test_thin_image_path_equals_resize_then_crop(shape):
    rng = np.random.default_rng(1)  # noise: the worst case for PIL's 8-bit rounding between passes
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    ref = np.asarray(center_crop(resize_shortest(img, 224), 224), dtype=np.int16)
    got = np.asarray(resize_center_crop(img, 224), dtype=np.int16)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1


def test_thin_image_never_builds_the_long_intermediate(monkeypatch):
    sizes = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    x = EvalTransform(224)(Image.new("RGB", (4000, 3), GREEN))
    assert x.shape == (3, 224, 224)
    assert sizes and max(w * h for w, h in sizes) <= 224 * 224  # the reference path would build 298666 x 224
    sizes.clear()
    EvalTransform(224)(Image.new("RGB", (600, 400), GREEN))  # ordinary aspect: the reference resize, unchanged
    assert sizes == [(336, 224)]


# ------------------------------------------------------------------------------------------------ folders and embed


@pytest.fixture()
def mixed_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (70, 70), RED).save(d / "a_red.jpg")
    save_frames(d / "b_anim.gif", [BLUE, RED])  # first frame blue
    save_frames(d / "c_pages.tif", [GREEN, RED, BLUE])  # page 0 green
    (d / "README.txt").write_text("tiles from survey 3")
    (d / "sub").mkdir()
    return d


def test_list_images_takes_what_pil_reads_and_names_the_rest(mixed_folder):
    listing = list_images(mixed_folder)
    assert [p.name for p in listing.files] == ["a_red.jpg", "b_anim.gif", "c_pages.tif"]
    assert [(p.name, r) for p, r in listing.skipped] == [("README.txt", "not an image format PIL reads (.txt)")]


def test_embed_gif_and_multipage_tiff_embed_page_zero(tmp_path, mixed_folder):
    torch.manual_seed(0)
    model = create_model("priorclip-tiny").eval()
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    r = run("embed", "--checkpoint", ckpt, "--images", mixed_folder, "--out", tmp_path / "e.npy")
    assert r.exit_code == 0, r.output
    assert "README.txt" in r.output and "c_pages.tif (3)" in r.output and "b_anim.gif (2)" in r.output
    assert "page 0" in r.output
    emb = np.load(tmp_path / "e.npy")
    rows = [json.loads(x) for x in (tmp_path / "e.index.jsonl").read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == ["a_red.jpg", "b_anim.gif", "c_pages.tif"]
    assert [(r.get("page"), r.get("pages")) for r in rows] == [(None, None), (0, 2), (0, 3)]  # the page embedded
    assert "README.txt\tnot an image format PIL reads" in (tmp_path / "e.skipped.txt").read_text()
    assert "1 file left out (0 unreadable images, 1 other file)" in r.output
    (mixed_folder / "README.txt").unlink()  # a rerun with nothing left out must not keep the old list beside it
    assert run("embed", "--checkpoint", ckpt, "--images", mixed_folder, "--out", tmp_path / "e.npy").exit_code == 0
    assert not (tmp_path / "e.skipped.txt").exists()
    # independent value: the GIF row is the embedding of its first frame's colour, the TIFF row that of page 0
    with torch.no_grad():
        want = {c: model.encode_image(EvalTransform(64)(Image.new("RGB", (40, 30), c)).unsqueeze(0))[0].numpy()
                for c in (BLUE, GREEN, RED)}
    assert np.abs(emb[1] - want[BLUE]).max() < 1e-5 and np.abs(emb[2] - want[GREEN]).max() < 1e-5
    assert np.abs(emb[2] - want[RED]).max() > 1e-3  # and not another page's


def test_embed_bomb_and_corrupt_files(tmp_path, mixed_folder):
    (mixed_folder / "d_bomb.png").write_bytes(bomb_png())
    (mixed_folder / "e_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (4000, 3), GREEN).save(mixed_folder / "f_strip.png")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(good, "PNG")
    (mixed_folder / "g_trunc.png").write_bytes(good.getvalue()[:60])  # a valid header: fails only when decoded
    out = tmp_path / "e.npy"
    one_error_line(run("embed", "--model", "priorclip-tiny", "--images", mixed_folder, "--out", out),
                   "d_bomb.png", "900,000,000 pixels", MAX_PIXELS_ENV)
    assert not out.exists()  # nothing partial
    r = run("embed", "--model", "priorclip-tiny", "--images", mixed_folder, "--out", out, "--skip-bad")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    index = [json.loads(x)["image"].rsplit("/", 1)[1] for x in (tmp_path / "e.index.jsonl").read_text().splitlines()]
    assert index == ["a_red.jpg", "b_anim.gif", "c_pages.tif", "f_strip.png"] and np.load(out).shape == (4, 32)
    skipped = dict(line.split("\t") for line in (tmp_path / "e.skipped.txt").read_text().splitlines())
    by_name = {k.rsplit("/", 1)[1]: v for k, v in skipped.items()}
    assert set(by_name) == {"README.txt", "d_bomb.png", "e_broken.jpg", "g_trunc.png"}
    assert "900,000,000 pixels" in by_name["d_bomb.png"] and "cannot decode" in by_name["e_broken.jpg"]
    assert "cannot decode" in by_name["g_trunc.png"]


def test_embed_honours_the_pixel_limit_variable(tmp_path, mixed_folder):
    r = run("embed", "--model", "priorclip-tiny", "--images", mixed_folder, "--out", tmp_path / "e.npy",
            env={MAX_PIXELS_ENV: "4000"})  # the 70 x 70 JPEG (4900 px) is over it
    one_error_line(r, "a_red.jpg", "70x70 = 4,900 pixels", "limit of 4,000")
    one_error_line(run("embed", "--model", "priorclip-tiny", "--images", mixed_folder, "--out", tmp_path / "e.npy",
                       env={MAX_PIXELS_ENV: "-1"}), MAX_PIXELS_ENV, "whole number")


# ------------------------------------------------------------------------------------------- eval, calibration, bench


def write_karpathy(folder, names):
    entries = [{"filename": n, "split": "test", "sentences": [{"raw": f"scene {i}"}, {"raw": f"view {i}"}]}
               for i, n in enumerate(names)]
    (folder / "d.json").write_text(json.dumps({"images": entries}))
    return folder / "d.json"


def test_eval_reads_gif_and_strips_and_refuses_a_bomb_in_one_line(tmp_path, mixed_folder):
    Image.new("RGB", (4000, 3), GREEN).save(mixed_folder / "f_strip.png")
    names = ["a_red.jpg", "b_anim.gif", "c_pages.tif", "f_strip.png"]
    r = run("eval", "--model", "priorclip-tiny", "--dataset", write_karpathy(tmp_path, names), "--images", mixed_folder,
            "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == 4
    (mixed_folder / "d_bomb.png").write_bytes(bomb_png())
    r = run("eval", "--model", "priorclip-tiny", "--dataset", write_karpathy(tmp_path, names + ["d_bomb.png"]),
            "--images", mixed_folder, "--workers", "2", "--batch-size", "2")
    one_error_line(r, "d_bomb.png", "900,000,000 pixels")


def test_calibration_checks_images_before_export(tmp_path, mixed_folder, capsys):
    from priorclip.export.cli import load_calibration

    (mixed_folder / "captions.txt").write_text("a lake\nsome farmland\n")
    for i in range(4):
        Image.new("RGB", (70, 70), (40 * i, 0, 0)).save(mixed_folder / f"lake_{i}.jpg")
    (mixed_folder / "d_bomb.png").write_bytes(bomb_png())
    (mixed_folder / "e_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    calib = load_calibration(mixed_folder, None, "train", 0, 0)
    names = sorted(p.name for p in calib.images)
    assert names == ["a_red.jpg", "b_anim.gif", "c_pages.tif"] + [f"lake_{i}.jpg" for i in range(4)]
    assert "2 unreadable left out" in calib.source
    err = capsys.readouterr().err
    assert "README.txt" in err and "captions.txt" not in err
    notes = [ln for ln in err.splitlines() if ln.startswith("note: calibration image left out")]
    assert len(notes) == 2 and "d_bomb.png" in notes[0] + notes[1] and "e_broken.jpg" in notes[0] + notes[1]
    for i in range(6):  # now 8 of 15 unreadable: more than half, refused in one line
        (mixed_folder / f"z_bad_{i}.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"only 7 of the 15 calibration images drawn can be read"):
        load_calibration(mixed_folder, None, "train", 0, 0)


def test_bench_image_decode_paths(tmp_path, big_jpeg):
    from priorclip.benchmarks.harness import _decode
    from priorclip.retrieval import iter_image_batches

    # both read through EvalTransform.load: the large JPEG takes the reduced decode, not the full one
    (tmp_path / "big.jpg").write_bytes(big_jpeg)
    want = EvalTransform(112).load(big_jpeg)
    assert torch.equal(_decode(EvalTransform(112), big_jpeg), want)
    assert torch.equal(next(iter_image_batches([tmp_path / "big.jpg"], EvalTransform(112), 1, workers=1))[0], want)

    with pytest.raises(DataError, match=r"<bytes> declares 900,000,000 pixels"):
        _decode(EvalTransform(64), bomb_png())
    Image.new("RGB", (70, 70), RED).save(tmp_path / "a.jpg")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(DataError, match=r"bomb\.png declares 900,000,000 pixels"):  # what bench --dataset embeds with
        list(iter_image_batches([tmp_path / "a.jpg", tmp_path / "bomb.png"], EvalTransform(64), 2, workers=2))
