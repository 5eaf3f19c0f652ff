"""`priorclip embed --shards ... --shard I/N` over webdataset tars (issue 17, bulk embedding), on the tiny model.

The independent references: the same images extracted to a folder and embedded with `embed --images` (shard mode
must decode exactly like folder mode), the unsharded run (the N jobs must cover it exactly once), hand-written
expectations for keys, members, captions and brace expansion, and engine_identity for the meta file.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from priorclip import create_model
from priorclip.cli import main
from priorclip.provenance import engine_identity
from priorclip.registry import get_config
from priorclip.shards import brace_expand, expand_shards, parse_shard, pick_image, select_shards, split_member
from priorclip.errors import DataError, PriorCLIPError
from priorclip.transforms import EvalTransform, open_image

TINY = ("--model", "priorclip-tiny", "--device", "cpu")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def one_error_line(result, *parts):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and all(p in errors[0] for p in parts), result.output


def image_bytes(fmt: str, seed: int, mode: str = "RGB", size=(72, 56), pages: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":  # a 16-bit grey tile, as remote-sensing PNGs often are
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))  # L, RGB or RGBA by its shape
    assert img.mode == mode
    buf = io.BytesIO()
    if pages > 1:
        more = [Image.new(mode, size, (255, 0, 0)) for _ in range(pages - 1)]
        img.save(buf, fmt, save_all=True, append_images=more)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def write_tar(path, members) -> None:
    """``members``: (name, bytes) in order; None bytes: a folder entry."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# key -> (members in the tar, the image member embedded, the captions the index must carry)
SHARDS = {
    "tiles-00.tar": {
        "a0": ([("a0.jpg", ("JPEG", 1, "RGB")), ("a0.txt", b"a harbour with boats\n\n  many boats \n")],
               "a0.jpg", ["a harbour with boats", "many boats"]),
        "a1": ([("a1.png", ("PNG", 2, "RGB")), ("a1.json", b'{"captions": ["a farm", "green fields"]}')],
               "a1.png", ["a farm", "green fields"]),
        "a2": ([("a2.png", ("PNG", 3, "I;16"))], "a2.png", None),
    },
    "tiles-01.tar": {
        "b0": ([("b0.png", ("PNG", 4, "RGBA")), ("b0.caption", b"a road")], "b0.png", ["a road"]),
        "b1": ([("b1.mask.png", ("PNG", 5, "L")), ("b1.jpg", ("JPEG", 6, "RGB")), ("b1.json", b'"a lake"')],
               "b1.jpg", ["a lake"]),
        "b2": ([("b2.tif", ("TIFF", 7, "RGB", 2)), ("b2.json", b'{"caption": "a stadium", "id": 3}')],
               "b2.tif", ["a stadium"]),
    },
    "tiles-02.tar": {
        "scene/c0": ([("scene/c0.jpg", ("JPEG", 8, "RGB"))], "scene/c0.jpg", None),
        "c1": ([("c1.PNG", ("PNG", 9, "RGB")), ("c1.json", b'["x", "x", "y"]')], "c1.PNG", ["x", "y"]),
        "c2": ([("c2.tiff", ("TIFF", 10, "RGB")), ("c2.txt", b"dense trees")], "c2.tiff", ["dense trees"]),
    },
    "tiles-03.tar": {
        "d0": ([("d0.jpg", ("JPEG", 11, "RGB")), ("d0.json", b'{"id": 5}')], "d0.jpg", None),
        "d1": ([("d1.webp", ("WEBP", 12, "RGB"))], "d1.webp", None),
        "d2": ([("d2.png", ("PNG", 13, "RGB"))], "d2.png", None),
    },
}
KEYS = [k for samples in SHARDS.values() for k in samples]


def _bytes(spec):
    return image_bytes(*spec[:3], pages=spec[3] if len(spec) > 3 else 1) if isinstance(spec, tuple) else spec


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    (root / "data").mkdir()
    folder = root / "folder"  # the same images, for `embed --images`
    folder.mkdir()
    for shard, samples in SHARDS.items():
        members = [("scene", None)] if shard == "tiles-02.tar" else []
        for key, (files, image, _) in samples.items():
            for name, spec in files:
                members.append((name, _bytes(spec)))
                if name == image:
                    (folder / name.replace("/", "__")).write_bytes(_bytes(spec))
        if shard == "tiles-03.tar":
            members.append(("README", b"no extension: webdataset ignores it"))
        write_tar(root / "data" / shard, members)
    return root


def load(npy):
    rows = [json.loads(x) for x in npy.with_name(npy.stem + ".index.jsonl").read_text().splitlines()]
    return np.load(npy), rows, json.loads(npy.with_name(npy.stem + ".meta.json").read_text())


@pytest.fixture(scope="module")
def runs(data):
    d = data / "data"
    full = run("embed", *TINY, "--shards", d / "tiles-{00..01}.tar", "--shards", d / "tiles-0[23].tar",
               "--out", data / "full.npy", "--batch-size", "5")
    assert full.exit_code == 0, full.output
    part0 = run("embed", *TINY, "--shards", d / "tiles-{00..03}.tar", "--shard", "0/2", "--out", f"{data}/parts/")
    part1 = run("embed", *TINY, "--shards", d, "--shard", "1/2", "--out", f"{data}/parts/")  # a folder of shards
    folder = run("embed", *TINY, "--images", data / "folder", "--out", data / "folder.npy")
    for r in (part0, part1, folder):
        assert r.exit_code == 0, r.output
    return {"full": load(data / "full.npy"), "folder": load(data / "folder.npy"), "full_output": full.output,
            "parts": [load(data / "parts" / f"embeddings-0000{i}-of-00002.npy") for i in (0, 1)]}


def by_key(emb, rows):
    return {r["key"]: emb[r["row"]] for r in rows}


def test_shard_rows_equal_folder_rows(runs):
    """Every image of the shards, whatever its mode (16-bit grey, RGBA, 2-page TIFF, WebP), is embedded exactly as
    the same file in a folder."""
    emb, rows, _ = runs["full"]
    assert [r["key"] for r in rows] == KEYS and [r["row"] for r in rows] == list(range(len(KEYS)))
    femb, frows, _ = runs["folder"]
    folder = {r["image"].rsplit("/", 1)[1].split(".")[0].replace("__", "/"): femb[r["row"]] for r in frows}
    assert sorted(folder) == sorted(KEYS)
    for key, row in by_key(emb, rows).items():
        assert np.abs(row - folder[key]).max() < 1e-5, key
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5) and emb.dtype == np.float32
    # distinct images, distinct rows: a mix-up between samples could not hide behind equal embeddings
    assert min(np.abs(emb[i] - emb[j]).max() for i in range(len(emb)) for j in range(i)) > 1e-3


def test_index_rows_name_shard_member_and_captions(runs, data):
    _, rows, _ = runs["full"]
    want = {k: (shard, image, caps) for shard, samples in SHARDS.items() for k, (_, image, caps) in samples.items()}
    for r in rows:
        shard, image, caps = want[r["key"]]
        assert r["shard"] == str(data / "data" / shard) and r["member"] == image
        assert r.get("captions") == caps, r
    assert [(r["key"], r.get("page"), r.get("pages")) for r in rows if "pages" in r] == [("b2", 0, 2)]
    assert "1 tar member without a key.extension name ignored" in runs["full_output"]
    assert "1 sample hold several images" in runs["full_output"]


def test_jobs_cover_every_sample_once(runs, data):
    emb, rows, _ = runs["full"]
    full = by_key(emb, rows)
    seen = []
    for i, (pemb, prows, meta) in enumerate(runs["parts"]):
        assert meta["shard"] == {"index": i, "count": 2} and meta["count"] == len(prows) == len(pemb)
        assert meta["sources"] == [str(data / "data" / f"tiles-0{j}.tar") for j in (i, i + 2)]  # i % 2 == I
        for key, row in by_key(pemb, prows).items():
            assert np.abs(row - full[key]).max() < 1e-5, key
        seen += [r["key"] for r in prows]
    assert sorted(seen) == sorted(KEYS) and len(seen) == len(set(seen))


def test_meta_files(runs, data, tmp_path):
    _, _, meta = runs["full"]
    assert meta["identity"] == engine_identity(get_config("priorclip-tiny"), "random-init")
    assert {k: meta[k] for k in ("format", "kind", "count", "embed_dim", "precision", "device", "shard", "skipped")} \
        == {"format": "priorclip-embeddings/1", "kind": "image", "count": 12, "embed_dim": 32, "precision": "fp32",
            "device": "cpu", "shard": None, "skipped": 0}
    assert meta["sources"] == [str(data / "data" / f"tiles-0{i}.tar") for i in range(4)] and meta["created"]
    _, _, fmeta = runs["folder"]
    assert fmeta["kind"] == "image" and fmeta["count"] == 12 and fmeta["sources"] == [str(data / "folder")]
    assert fmeta["identity"] == meta["identity"] and fmeta["shard"] is None
    (tmp_path / "c.txt").write_text("a lake\nsome farmland\n")
    assert run("embed", *TINY, "--captions", tmp_path / "c.txt", "--out", tmp_path / "c.npy").exit_code == 0
    _, crows, cmeta = load(tmp_path / "c.npy")
    assert cmeta["kind"] == "text" and cmeta["count"] == 2 and cmeta["embed_dim"] == 32 and cmeta["shard"] is None
    assert cmeta["identity"] == meta["identity"] and crows[1] == {"row": 1, "caption": "some farmland"}


def test_more_jobs_than_shards_write_empty_outputs(data, tmp_path):
    r = run("embed", *TINY, "--shards", data / "data" / "tiles-{00..03}.tar", "--shard", "6/8", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "jobs 4..7 have none" in r.output
    emb, rows, meta = load(tmp_path / "embeddings-00006-of-00008.npy")
    assert emb.shape == (0, 32) and rows == [] and meta["count"] == 0 and meta["sources"] == []
    assert meta["shard"] == {"index": 6, "count": 8}


def test_brace_and_glob_expansion(data):
    assert brace_expand("t-{00..03}.tar") == ["t-00.tar", "t-01.tar", "t-02.tar", "t-03.tar"]
    assert brace_expand("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert brace_expand("{0..10..5}|{3..1}|{x}|{}|{a,{b,c}d}") == [
        f"{n}|{m}|{{x}}|{{}}|{s}" for n in (0, 5, 10) for m in (3, 2, 1) for s in ("a", "bd", "cd")]
    assert brace_expand("plain.tar") == ["plain.tar"]
    d = data / "data"
    every = [str(d / f"tiles-0{i}.tar") for i in range(4)]
    assert expand_shards([str(d / "tiles-{00,02}.tar")]) == [every[0], every[2]]
    assert expand_shards([str(d / "*.tar"), str(d / "tiles-{03..00}.tar"), f"{d}/./tiles-01.tar"]) == every
    assert expand_shards([str(d / "tiles-0[13].tar"), str(d)]) == every
    assert select_shards(every, 1, 3) == [every[1]] and select_shards(every, 0, 3) == [every[0], every[3]]
    assert parse_shard(" 3 / 16 ") == (3, 16)
    for bad in ("x", "2/2", "1/0", "-1/4", "1/2/3"):
        with pytest.raises(PriorCLIPError):
            parse_shard(bad)
    for bad in ([str(d / "*.zip")], [str(d / "tiles-{00..04}.tar")], [str(d / "none.tar")]):
        with pytest.raises(DataError):
            expand_shards(bad)


def test_member_names_and_image_choice():
    assert split_member("dir/0001.rgb.TIF") == ("dir/0001", "rgb.tif")
    assert split_member("a/.hidden") is None and split_member("README") is None and split_member("x.") is None
    assert pick_image([("k.json", "json"), ("k.png", "png"), ("k.jpg", "jpg")]) == "k.jpg"
    assert pick_image([("k.mask.jpg", "mask.jpg"), ("k.bmp", "bmp")]) == "k.bmp"  # a plain <key>.<image> first
    assert pick_image([("k.img_content", "img_content"), ("k.caption", "caption")]) == "k.img_content"  # RS5M
    assert pick_image([("k.txt", "txt"), ("k.cls", "cls")]) is None


def test_bad_options_and_patterns(data, tmp_path):
    d = data / "data"
    pattern = d / "tiles-{00..03}.tar"
    for shard, msg in (("2/2", "out of range for 2 jobs"), ("x", "expected I/N"), ("1/0", "at least 1")):
        r = run("embed", *TINY, "--shards", pattern, "--shard", shard, "--out", tmp_path / "e.npy")
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    one_error_line(run("embed", *TINY, "--images", data / "folder", "--shard", "0/2", "--out", tmp_path / "e.npy"),
                   "--shard I/N splits --shards")
    one_error_line(run("embed", *TINY, "--images", data / "folder", "--shards", pattern, "--out", tmp_path / "e"),
                   "exactly one of", "got --images and --shards")
    one_error_line(run("embed", *TINY, "--shards", d / "*.zip", "--out", tmp_path / "e.npy"), "no shard file matches")
    one_error_line(run("embed", *TINY, "--shards", d / "tiles-{00..05}.tar", "--out", tmp_path / "e.npy"),
                   "shard not found", "tiles-04.tar", "2 of the 6")
    assert not list(tmp_path.iterdir())  # nothing written by a refused run


def test_corrupt_tars(tmp_path):
    good = image_bytes("PNG", 0)
    write_tar(tmp_path / "ok.tar", [("g0.png", good), ("g0.txt", b"a bridge")])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all " * 40)
    write_tar(tmp_path / "whole.tar", [("h0.png", good), ("h1.png", good)])
    (tmp_path / "cut.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[: 512 + len(good) // 2])
    out = tmp_path / "out" / "e.npy"
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "junk.tar", "--out", out),
                   "cannot read shard", "junk.tar", "not a tar file")
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "cut.tar", "--out", out),
                   "cannot read shard", "cut.tar", "unexpected end of data")
    r = run("embed", *TINY, "--shards", tmp_path / "*.tar", "--out", out, "--skip-bad")  # cut, junk, ok, whole
    assert r.exit_code == 0, r.output
    emb, rows, meta = load(out)
    assert [r["key"] for r in rows] == ["g0", "h0", "h1"] and meta["skipped"] == 2
    assert meta["sources"] == [str(tmp_path / "ok.tar"), str(tmp_path / "whole.tar")]
    skipped = [ln.split("\t") for ln in (tmp_path / "out" / "e.skipped.txt").read_text().splitlines()]
    assert [(s, k) for s, k, _ in skipped] == [(str(tmp_path / "cut.tar"), ""), (str(tmp_path / "junk.tar"), "")]
    assert "not a tar file" in skipped[1][2]
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "junk.tar", "--out", out, "--skip-bad"),
                   "none of the 1 selected shard could be read", "not a tar file")
    with tarfile.open(tmp_path / "whole.tar.gz", "w:gz") as tar:  # compressed shards stream the same way
        for name in ("h0.png", "h1.png"):
            info = tarfile.TarInfo(name)
            info.size = len(good)
            tar.addfile(info, io.BytesIO(good))
    assert run("embed", *TINY, "--shards", tmp_path / "whole.tar.gz", "--out", out).exit_code == 0
    gz, gz_rows, _ = load(out)
    assert [r["key"] for r in gz_rows] == ["h0", "h1"] and np.abs(gz - emb[1:]).max() < 1e-5


def test_duplicate_keys_and_samples_without_an_image(tmp_path):
    img = image_bytes("PNG", 1)
    write_tar(tmp_path / "p.tar", [("x.png", img), ("y.png", img)])
    write_tar(tmp_path / "q.tar", [("z.png", img), ("x.jpg", image_bytes("JPEG", 2))])
    write_tar(tmp_path / "apart.tar", [("u.png", img), ("v.png", img), ("u.txt", b"u again, after v")])
    write_tar(tmp_path / "noimg.tar", [("w.png", img), ("n.txt", b"a caption"), ("n.cls", b"3")])
    out = tmp_path / "e.npy"
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "{p,q}.tar", "--out", out),
                   "'x'", f"shards {tmp_path / 'p.tar'} and {tmp_path / 'q.tar'}", "unique")
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "apart.tar", "--out", out),
                   "'u'", "occurs twice in shard", "apart.tar")
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "p.tar", "--shards", tmp_path / "q.tar",
                       "--skip-bad", "--out", out), "'x'", "p.tar and")  # --skip-bad: still refused
    # jobs that do not share a shard do not see each other's keys: each job alone runs
    assert run("embed", *TINY, "--shards", tmp_path / "{p,q}.tar", "--shard", "1/2", "--out", out).exit_code == 0
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "noimg.tar", "--out", out),
                   "noimg.tar", "sample 'n' has no image member", "n.txt, n.cls")
    r = run("embed", *TINY, "--shards", tmp_path / "noimg.tar", "--out", out, "--skip-bad")
    assert r.exit_code == 0, r.output
    _, rows, _ = load(out)
    assert [r["key"] for r in rows] == ["w"]
    assert (tmp_path / "e.skipped.txt").read_text() == f"{tmp_path / 'noimg.tar'}\tn\tno image member (n.txt, n.cls)\n"


def test_corrupt_images_with_and_without_skip_bad(tmp_path):
    good = {k: image_bytes("PNG", 20 + i) for i, k in enumerate(("g0", "g1", "g2"))}
    trunc = image_bytes("PNG", 30)[:80]  # a valid header: fails only when decoded, inside a batch
    write_tar(tmp_path / "imgs.tar", [("g0.png", good["g0"]), ("b_junk.jpg", b"\xff\xd8\xff\xe0 not a jpeg"),
                                      ("g1.png", good["g1"]), ("b_trunc.png", trunc), ("g2.png", good["g2"]),
                                      ("b_json.png", good["g0"]), ("b_json.json", b"{not json")])
    write_tar(tmp_path / "trunc.tar", [("g0.png", good["g0"]), ("b_trunc.png", trunc)])
    out = tmp_path / "e.npy"
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "imgs.tar", "--out", out),
                   "imgs.tar", "sample 'b_junk'", "cannot decode image b_junk.jpg")
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "trunc.tar", "--out", out),
                   "trunc.tar", "sample 'b_trunc'", "cannot decode image b_trunc.png")
    assert not out.exists()
    r = run("embed", *TINY, "--shards", tmp_path / "imgs.tar", "--out", out, "--skip-bad", "--batch-size", "2")
    assert r.exit_code == 0, r.output
    emb, rows, meta = load(out)
    assert [r["key"] for r in rows] == ["g0", "g1", "g2"] and meta["count"] == 3 and meta["skipped"] == 3
    skipped = {k: reason for _, k, reason in (ln.split("\t") for ln in (tmp_path / "e.skipped.txt").read_text()
                                                .splitlines())}
    assert list(skipped) == ["b_junk", "b_trunc", "b_json"]
    assert "cannot decode image b_junk.jpg" in skipped["b_junk"] and "b_trunc.png" in skipped["b_trunc"]
    assert "b_json.json is not valid JSON" in skipped["b_json"]
    # the rows left are the model's own embeddings of those images (b_trunc shared a batch with g2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the CLI's seeded random weights
        model = create_model("priorclip-tiny").eval()
    with torch.no_grad():
        want = model.encode_image(torch.stack([EvalTransform(64)(open_image(good[k])) for k in ("g0", "g1", "g2")]))
    assert np.abs(emb - want.numpy()).max() < 1e-5
    write_tar(tmp_path / "allbad.tar", [("b_junk.jpg", b"junk"), ("b_trunc.png", trunc)])
    one_error_line(run("embed", *TINY, "--shards", tmp_path / "allbad.tar", "--out", out, "--skip-bad"),
                   "none of the 2 samples could be embedded", "sample 'b_junk'")
