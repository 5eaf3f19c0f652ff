"""`priorclip index` end to end on the tiny model: built from a folder, a dataset JSON or `priorclip embed` outputs,
searched by id, caption and image against the engine's own embeddings, resumed after a crash, and its one-line
answers to bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("faiss")

from priorclip import create_model  # noqa: E402
from priorclip.checkpoint import save_checkpoint  # noqa: E402
from priorclip.cli import main  # noqa: E402
from priorclip.serve.index import VectorIndex  # noqa: E402
from priorclip.synthetic import make_sample  # noqa: E402

TINY = ("--model", "priorclip-tiny", "--device", "cpu")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    # a user mistake must end in SystemExit with a message, never in an uncaught exception
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def ok(*args):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


def user_error(result, match):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("Error: ") and match in lines[-1], result.output
    assert "Traceback" not in result.output


def hits(*args) -> list[dict]:
    return json.loads(ok("index", "search", *args, "--json").stdout)["hits"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("sample"), n_images=6, size=64)  # one image per scene class


@pytest.fixture(scope="module")
def built(sample, tmp_path_factory):
    path = tmp_path_factory.mktemp("built") / "ix"
    ok("index", "build", path, "--images", sample[1], *TINY)
    return path


@pytest.fixture(scope="module")
def engine():
    from priorclip.serve.loading import load_engine

    return load_engine(model_name="priorclip-tiny")


def halves(img_dir: Path, root: Path) -> tuple[Path, Path]:
    """The sample's images in two folders (alternate files, so both hold several scene classes)."""
    a, b = root / "a", root / "b"
    for i, p in enumerate(sorted(img_dir.iterdir())):
        (a if i % 2 == 0 else b).mkdir(exist_ok=True)
        shutil.copy(p, (a if i % 2 == 0 else b) / p.name)
    return a, b


def test_build_from_folder_then_search_by_id(built, sample):
    ix = VectorIndex.open(built)
    names = sorted(p.name for p in sample[1].iterdir())
    assert ix.ids == names and ix.dim == 32 and ix.kind == "flat" and ix.identity["model"] == "priorclip-tiny"
    assert ix.meta(names[0]) == {"path": str((sample[1] / names[0]).resolve())}
    found = hits(built, "--id", "lake_0.jpg")
    assert found[0]["id"] == "lake_0.jpg" and abs(found[0]["score"] - 1) < 1e-5
    assert len(found) == 6 and [h["rank"] for h in found] == list(range(1, 7))  # k 10, clipped to the index
    v = ix.vector("lake_0.jpg")
    want = sorted(((float(ix.vector(i) @ v), i) for i in names), reverse=True)
    assert [h["id"] for h in found] == [i for _, i in want]
    table = ok("index", "search", built, "--id", "lake_0.jpg", "-k", "3").stdout.splitlines()
    assert table[0].split() == ["rank", "score", "id", "path"] and len(table) == 4
    assert table[1].split()[:3] == ["1", "1.0000", "lake_0.jpg"]


def test_vectors_are_what_priorclip_embed_writes(built, sample, tmp_path):
    ok("embed", "--images", sample[1], "--out", tmp_path / "e.npy", *TINY)
    emb = np.load(tmp_path / "e.npy")
    rows = [json.loads(x) for x in (tmp_path / "e.index.jsonl").read_text().splitlines()]
    ix = VectorIndex.open(built)
    for r in rows:
        assert np.abs(ix.vector(Path(r["image"]).name) - emb[r["row"]]).max() < 1e-6


def test_search_text_is_the_engine_embedding(built, engine):
    from priorclip.retrieval import embed_texts

    text = "a red building at the top left of a lake area"
    t = embed_texts(engine.engine, [text], progress=False).numpy()[0]
    ix = VectorIndex.open(built)
    want = sorted(((float(ix.vector(i) @ t), i) for i in ix.ids), reverse=True)[:5]
    for extra in ((), TINY):  # the engine the index records, then the same one named
        got = hits(built, "--text", text, "-k", "5", *extra)
        assert [h["id"] for h in got] == [i for _, i in want]
        assert np.allclose([h["score"] for h in got], [s for s, _ in want], atol=1e-5)


def test_search_by_image_finds_itself(built, sample):
    got = hits(built, "--image", sample[1] / "road_3.jpg", "-k", "2")
    assert got[0]["id"] == "road_3.jpg" and abs(got[0]["score"] - 1) < 1e-5 and len(got) == 2


def test_info(built):
    d = json.loads(ok("index", "info", built, "--json").stdout)
    assert (d["count"], d["dim"], d["kind"], d["metric"], d["checksums_ok"]) == (6, 32, "flat", "ip", True)
    assert d["identity"]["model"] == "priorclip-tiny" and d["identity"]["checkpoint_sha256"] == "random-init"
    assert d["build"]["engine"]["model_name"] == "priorclip-tiny" and d["build"]["input"] == "images"
    text = ok("index", "info", built).stdout
    assert "6 x 32 (flat, inner product)" in text and "ok (SHA-256 verified)" in text


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_embeds_only_what_is_missing(sample, built, tmp_path, monkeypatch):
    import priorclip.retrieval as retrieval
    from priorclip.serve.index import PartialWork

    real = retrieval.embed_images
    embedded: list[str] = []

    def counting(enc, paths, *a, crash_at=None, **kw):
        if crash_at is not None and len(embedded) >= crash_at:
            raise Crash("killed")
        embedded.extend(Path(p).name for p in paths)
        return real(enc, paths, *a, **kw)

    sizes = ("--batch-size", "2", "--chunk-size", "2")
    monkeypatch.setattr(retrieval, "embed_images", lambda *a, **kw: counting(*a, crash_at=4, **kw))
    r = CliRunner().invoke(main, ["index", "build", str(tmp_path / "ix"), "--images", str(sample[1]), *TINY, *sizes])
    assert isinstance(r.exception, Crash)
    assert sorted(p.name for p in (tmp_path / "ix" / ".partial").glob("chunk-*")) == \
        ["chunk-000000000000.npy", "chunk-000000000002.npy"]
    with pytest.raises(Exception, match="unfinished build"):
        VectorIndex.open(tmp_path / "ix")
    # other inputs are refused while the work is there
    user_error(run("index", "build", tmp_path / "ix", "--dataset", sample[0], *TINY),
               "unfinished work on other inputs")
    embedded.clear()
    monkeypatch.setattr(retrieval, "embed_images", counting)
    r = ok("index", "build", tmp_path / "ix", "--images", sample[1], *TINY, *sizes)
    names = sorted(p.name for p in sample[1].iterdir())
    assert embedded == names[4:] and "resuming: 4 of 6 images" in r.output
    # the same index as an uninterrupted build (which ran in batches of 64: equal up to float rounding)
    ref, got = VectorIndex.open(built), VectorIndex.open(tmp_path / "ix")
    assert got.ids == ref.ids and np.abs(got.all_vectors() - ref.all_vectors()).max() < 1e-6
    assert not (tmp_path / "ix" / ".partial").exists()
    assert "already built from these inputs" in ok("index", "build", tmp_path / "ix", "--images", sample[1],
                                                   *TINY).output
    # --restart discards saved work: everything is embedded again
    stale = PartialWork(tmp_path / "r", "other inputs", 6, 2, 32)
    stale.save(0, got.all_vectors()[:2])
    embedded.clear()
    ok("index", "build", tmp_path / "r", "--images", sample[1], *TINY, "--restart")
    assert embedded == names and len(VectorIndex.open(tmp_path / "r")) == 6


def test_add_skips_what_is_there_and_refuses_other_weights(sample, tmp_path):
    a, b = halves(sample[1], tmp_path)
    ix = tmp_path / "ix"
    ok("index", "build", ix, "--images", a, *TINY)
    r = ok("index", "add", ix, "--images", b)  # the engine recorded at build time
    assert "added 3 items" in r.output and len(VectorIndex.open(ix)) == 6
    assert "nothing to add: all 3 items are already in" in ok("index", "add", ix, "--images", b).output
    torch.manual_seed(3)
    other = save_checkpoint(create_model("priorclip-tiny"), tmp_path / "other.pt")
    user_error(run("index", "add", ix, "--images", b, "--checkpoint", other), "other weights (checkpoint_sha256")
    user_error(run("index", "search", ix, "--text", "a lake", "--checkpoint", other), "other weights")
    user_error(run("index", "add", ix, "--images", b, "--model", "priorclip-tiny", "--gate", "2belief"),
               "other weights (config_sha256")
    user_error(run("index", "add", ix, "--images", b, "--model", "pir-tiny", "--gate", "2belief"),
               "--gate does not apply to model 'pir-tiny'")
    user_error(run("index", "add", ix, "--images", b, "--model", "priorclip-tiny", "--mask-padding"),
               "--mask-padding does not apply")
    assert len(VectorIndex.open(ix)) == 6


def test_search_rebuilds_the_recorded_checkpoint_or_asks_for_one(sample, tmp_path):
    torch.manual_seed(4)
    ckpt = save_checkpoint(create_model("priorclip-tiny"), tmp_path / "m.pt")
    ix = tmp_path / "ix"
    ok("index", "build", ix, "--images", sample[1], "--checkpoint", ckpt, "--device", "cpu")
    recorded = hits(ix, "--text", "a lake", "-k", "3")
    assert recorded == hits(ix, "--text", "a lake", "-k", "3", "--checkpoint", ckpt)
    ckpt.rename(tmp_path / "moved.pt")
    user_error(run("index", "search", ix, "--text", "a lake"), "cannot rebuild the engine")
    assert hits(ix, "--text", "a lake", "-k", "3", "--checkpoint", tmp_path / "moved.pt") == recorded
    assert hits(ix, "--id", "lake_0.jpg")[0]["id"] == "lake_0.jpg"  # an id query needs no engine


def _embed_output(folder: Path, out: Path, shard: tuple[int, int]) -> None:
    """`priorclip embed` over a folder, its meta then marked as job ``shard`` of a fan-out (as if it were one)."""
    ok("embed", "--images", folder, "--out", out, *TINY)
    meta_path = out.with_name(out.stem + ".meta.json")
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == "priorclip-embeddings/1" and meta["kind"] == "image"
    meta_path.write_text(json.dumps({**meta, "shard": {"index": shard[0], "count": shard[1]}}))


def test_merge_embed_outputs(sample, built, engine, tmp_path):
    a, b = halves(sample[1], tmp_path)
    _embed_output(a, tmp_path / "out" / "a.npy", (0, 3))
    _embed_output(b, tmp_path / "out" / "b.npy", (1, 3))
    ix = tmp_path / "ix"
    r = ok("index", "build", ix, "--embeddings", tmp_path / "out" / "a.npy", "--embeddings", tmp_path / "out")
    assert "merging 2 of 3 shards (missing: 2)" in r.output
    got, ref = VectorIndex.open(ix), VectorIndex.open(built)
    assert sorted(got.ids) == ref.ids
    assert all(np.abs(got.vector(i) - ref.vector(i)).max() < 1e-6 for i in ref.ids)
    assert all(got.meta(i)["path"] == str(((a if (a / i).exists() else b) / i).resolve()) for i in ref.ids)
    r = ok("index", "add", ix, "--embeddings", str(tmp_path / "out" / "*.npy"))  # a merge run again: harmless
    assert "added 0 items" in r.output and "skipped 6 items already in the index" in r.output
    # the random-init engine is rebuilt from the identity alone, so caption queries work on a merged index
    top = lambda path: [(h["id"], round(h["score"], 5)) for h in hits(path, "--text", "a lake", "-k", "3")]  # noqa: E731
    assert top(ix) == top(built)
    # bad inputs, each one line
    bad = tmp_path / "bad"
    bad.mkdir()

    def variant(name: str, array: np.ndarray, **meta_changes) -> Path:
        npy = bad / f"{name}.npy"
        np.save(npy, array)
        shutil.copy(tmp_path / "out" / "a.index.jsonl", bad / f"{name}.index.jsonl")
        meta = json.loads((tmp_path / "out" / "a.meta.json").read_text())
        meta.update(count=len(array), embed_dim=array.shape[1], sources=[str(a)], **meta_changes)
        (bad / f"{name}.meta.json").write_text(json.dumps(meta))
        return npy

    good = np.load(tmp_path / "out" / "a.npy")
    user_error(run("index", "add", ix, "--embeddings", variant("twice", good * 2)), "not L2-normalised")
    narrow = good[:, :16] / np.linalg.norm(good[:, :16], axis=1, keepdims=True)
    user_error(run("index", "add", ix, "--embeddings", variant("narrow", narrow)), "16 wide, the index holds 32-d")
    user_error(run("index", "add", ix, "--embeddings", variant("text", good, kind="text")), "text embeddings")
    user_error(run("index", "add", ix, "--embeddings", variant("f64", good.astype(np.float64))), "float32")
    other = dict(engine.identity, checkpoint_sha256="0" * 64)
    user_error(run("index", "add", ix, "--embeddings", variant("other", good, identity=other)),
               "other weights (checkpoint_sha256")
    user_error(run("index", "build", tmp_path / "mix", "--embeddings", tmp_path / "out" / "a.npy", "--embeddings",
                   variant("other2", good, identity=other)), "other weights")
    (bad / "nometa.npy").write_bytes((tmp_path / "out" / "a.npy").read_bytes())
    user_error(run("index", "add", ix, "--embeddings", bad / "nometa.npy"), "nometa.meta.json is missing")
    user_error(run("index", "build", tmp_path / "e", "--embeddings", tmp_path / "out" / "a.npy", *TINY),
               "--embeddings are merged as they are")
    user_error(run("index", "build", tmp_path / "e", "--embeddings", tmp_path / "none" / "*.npy"), "no .npy files")
    assert len(VectorIndex.open(ix)) == 6


def test_merge_webdataset_fan_out(tmp_path):
    """Three `embed --shards ... --shard I/3` jobs over two tars (one job gets none and writes empty outputs) merge
    into one index whose ids are the samples' keys and whose items keep their captions."""
    import io
    import tarfile

    tars = tmp_path / "tars"
    tars.mkdir()
    want = {}
    for t, keys in enumerate((("k00", "k01"), ("k10",))):
        with tarfile.open(tars / f"part-{t}.tar", "w") as tar:
            for j, key in enumerate(keys):
                img = io.BytesIO()
                Image.new("RGB", (48, 40), (60 * j + 20, 90, 40 * t + 30)).save(img, "PNG")
                for name, data in ((f"{key}.png", img.getvalue()), (f"{key}.txt", f"tile {key}\n".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                want[key] = (str(tars / f"part-{t}.tar"), f"{key}.png", [f"tile {key}"])
    for i in range(3):
        ok("embed", "--shards", str(tars / "*.tar"), "--shard", f"{i}/3", "--out", f"{tmp_path / 'out'}/", *TINY)
    ix = tmp_path / "ix"
    ok("index", "build", ix, "--embeddings", tmp_path / "out")
    got = VectorIndex.open(ix)
    assert sorted(got.ids) == sorted(want)
    for key, (shard, member, captions) in want.items():
        assert got.meta(key) == {"shard": shard, "member": member, "captions": captions}
    # each row is the job's own embedding of that sample
    for npy in sorted((tmp_path / "out").glob("*.npy")):
        rows = [json.loads(x) for x in npy.with_name(npy.stem + ".index.jsonl").read_text().splitlines()]
        emb = np.load(npy)
        assert all(np.array_equal(got.vector(r["key"]), emb[r["row"]]) for r in rows)
    assert hits(ix, "--id", "k10", "-k", "1")[0]["meta"]["captions"] == ["tile k10"]


def test_dataset_items_keep_their_captions(sample, tmp_path):
    json_path, img_dir = sample
    ok("index", "build", tmp_path / "ix", "--dataset", json_path, *TINY)
    ix = VectorIndex.open(tmp_path / "ix")
    entries = json.loads(json_path.read_text())["images"]
    assert sorted(ix.ids) == sorted(e["filename"] for e in entries)
    lake = next(e for e in entries if e["filename"] == "lake_0.jpg")
    assert ix.meta("lake_0.jpg") == {"path": str((img_dir / "lake_0.jpg").resolve()), "split": "test",
                                     "label": "lake", "captions": [s["raw"] for s in lake["sentences"]]}
    table = ok("index", "search", tmp_path / "ix", "--id", "lake_0.jpg", "-k", "1").stdout.splitlines()
    assert table[0].split()[-1] == "caption" and table[1].endswith(lake["sentences"][0]["raw"])
    user_error(run("index", "build", tmp_path / "t", "--dataset", json_path, "--split", "train", *TINY),
               "no images in split 'train' (splits present: test")
    doc = json.loads(json_path.read_text())
    doc["images"].append(dict(doc["images"][2], split="test"))
    (tmp_path / "dup.json").write_text(json.dumps(doc))
    user_error(run("index", "build", tmp_path / "t", "--dataset", tmp_path / "dup.json", "--image-root", img_dir, *TINY),
               f"image {doc['images'][2]['filename']!r} is listed twice (entries 2 and 6)")


def test_bad_images_stop_the_run_or_are_skipped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    pages = [Image.new("RGB", (32, 32), c) for c in ((10, 200, 10), (10, 10, 200))]
    pages[0].save(folder / "scan.tif", save_all=True, append_images=pages[1:])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cut.jpg")  # a sound header, its data cut short: only decoding finds it
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:1500])
    (folder / "README.txt").write_text("not an image")
    user_error(run("index", "build", tmp_path / "ix", "--images", folder, *TINY), "broken.jpg")
    assert not (tmp_path / "ix").exists()  # a failed first build leaves no folder behind
    r = ok("index", "build", tmp_path / "ix", "--images", folder, *TINY, "--skip-bad")
    assert "page 0 of each is embedded: scan.tif (2)" in r.output
    ix = VectorIndex.open(tmp_path / "ix")
    assert ix.ids == ["red.png", "scan.tif"] and ix.meta("scan.tif")["pages"] == 2 and ix.meta("scan.tif")["page"] == 0
    skipped = (tmp_path / "ix" / "skipped.txt").read_text()
    assert "broken.jpg" in skipped and "cut.jpg" in skipped and "README.txt" in skipped


def test_hnsw_build_and_tune(sample, tmp_path):
    ix = tmp_path / "ix"
    ok("index", "build", ix, "--images", sample[1], *TINY, "--kind", "hnsw", "--ef-search", "32")
    assert VectorIndex.open(ix).params["efSearch"] == 32
    assert hits(ix, "--id", "road_3.jpg", "--ef-search", "8")[0]["id"] == "road_3.jpg"
    out = json.loads(ok("index", "tune", ix, "--ef-search", "64", "--json").stdout)
    assert out["recall"] == 1.0 and out["params"]["efSearch"] == 64 and out["queries"] == 6
    assert json.loads(ok("index", "info", ix, "--json").stdout)["params"]["efSearch"] == 64
    user_error(run("index", "search", ix, "--id", "road_3.jpg", "--nprobe", "2"), "nprobe applies to ivf")


def test_user_errors(built, sample, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cases = [
        (("build", tmp_path / "i1", "--images", tmp_path / "missing", *TINY), "image folder not found"),
        (("build", tmp_path / "i1", "--images", tmp_path / "empty", *TINY), "no image files"),
        (("build", tmp_path / "i1", *TINY), "give exactly one input"),
        (("build", tmp_path / "i1", "--images", sample[1], "--dataset", sample[0]), "got --images and --dataset"),
        (("build", tmp_path / "afile", "--images", sample[1], *TINY), "is a file"),
        (("build", tmp_path / "busy", "--images", sample[1], *TINY), "holding other files (e.g. notes.txt)"),
        (("build", tmp_path / "i1", "--images", sample[1], *TINY, "--kind", "ivf"), "too few vectors to train"),
        (("build", tmp_path / "i1", "--images", sample[1], *TINY, "--ef-search", "5"), "--ef-search applies to"),
        (("build", built, "--images", sample[1], "--model", "priorclip-tiny", "--gate", "2belief"),
         "already holds an index"),
        (("add", tmp_path / "nowhere", "--images", sample[1]), "index not found"),
        (("search", built, "--id", "nope.jpg"), "no item 'nope.jpg'"),
        (("search", built), "give exactly one query"),
        (("search", built, "--id", "lake_0.jpg", "-k", "0"), "Invalid value for '-k'"),
        (("search", built, "--image", tmp_path / "afile"), "afile"),
        (("search", tmp_path / "nowhere", "--id", "x"), "index not found"),
        (("tune", built), "nothing to tune"),
    ]
    for args, match in cases:
        user_error(run("index", *args), match)
    assert not (tmp_path / "i1").exists()
    # a flipped byte in a copy of the index: every command that opens it says which file
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    items = next(copy.glob("items-*.jsonl"))
    data = bytearray(items.read_bytes())
    data[5] ^= 0x20
    items.write_bytes(bytes(data))
    for cmd in (("info", copy), ("search", copy, "--id", "lake_0.jpg"), ("add", copy, "--images", sample[1])):
        user_error(run("index", *cmd), f"index file {items} is corrupt")
