"""Output files: checked before the work, written atomically under their exact names, no empty folders left behind;
and ``priorclip eval`` / ``demo`` using them."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from priorclip.cli import main
from priorclip.cliutils import (
    atomic_write,
    check_output_dir,
    check_output_file,
    output_dir,
    write_json,
    write_npy,
    write_npz,
)
from priorclip.errors import PriorCLIPError
from priorclip.synthetic import make_sample



def _permissions_enforced() -> bool:
    """False as root (with CAP_DAC_OVERRIDE), which writes into read-only folders anyway."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ro = os.path.join(d, "ro")
        os.mkdir(ro, 0o500)
        try:
            open(os.path.join(ro, "probe"), "w").close()
            return False
        except PermissionError:
            return True
        finally:
            os.chmod(ro, 0o700)


needs_permissions = pytest.mark.skipif(not _permissions_enforced(), reason="running as root: permissions not enforced")


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".priorclip"))


def test_suffix_is_normalised_exactly_as_numpy_does(tmp_path):
    # what np.savez / np.save really create for each name is the independent answer
    for name, suffix, saver in [("emb", ".npz", np.savez), ("emb.v1", ".npz", np.savez), ("e.npz", ".npz", np.savez),
                                ("x.NPY", ".npy", np.save), ("x.npy", ".npy", np.save)]:
        d = tmp_path / name.replace(".", "_") / suffix[1:]
        d.mkdir(parents=True)
        if saver is np.savez:
            np.savez(d / name, a=np.zeros(1))
        else:
            np.save(d / name, np.zeros(1))
        (written,) = d.iterdir()
        assert check_output_file(d / name, suffix) == written


def test_check_output_file_refuses_before_creating_anything(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(PriorCLIPError) as e:
        check_output_file(tmp_path / "afile" / "sub" / "m.json", option="--out")
    assert str(e.value) == (f"--out: cannot write {tmp_path / 'afile' / 'sub' / 'm.json'}: {tmp_path / 'afile'} is a "
                            "file, not a folder")
    with pytest.raises(PriorCLIPError, match=r"adir: it is a folder$"):
        check_output_file(tmp_path / "adir")
    with pytest.raises(PriorCLIPError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "afile")
    # a folder still to be made is fine, and is not made by the check
    assert check_output_file(tmp_path / "new" / "deeper" / "m.json") == tmp_path / "new" / "deeper" / "m.json"
    assert check_output_dir(tmp_path / "new2" / "x") == tmp_path / "new2" / "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


@needs_permissions
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PriorCLIPError, match=f"cannot write {ro / 'e.npz'}: cannot create files in {ro} "):
            check_output_file(ro / "e", ".npz")
        with pytest.raises(PriorCLIPError, match="not writable"):
            check_output_dir(ro / "sub")
        with pytest.raises(PriorCLIPError, match="cannot write"):
            write_json(ro / "m.json", {})
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_neither_a_half_file_nor_a_temp(tmp_path, interrupt):
    target = tmp_path / "m.json"
    target.write_text("previous")
    with pytest.raises(interrupt):
        with atomic_write(target) as tmp:
            tmp.write_text("half of the new")
            raise interrupt()
    assert target.read_text() == "previous"  # the old file is untouched, not half replaced
    fresh = tmp_path / "sub" / "deeper" / "new.npy"
    with pytest.raises(interrupt):
        with atomic_write(fresh) as tmp:
            tmp.write_bytes(b"\x93NUMPY partial")
            raise interrupt()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no temp file, no folder made for it


def test_atomic_write_replaces_and_keeps_usual_permissions(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("previous")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not the 0o600 of a mkstemp file
    assert leftovers(tmp_path) == []


def test_numpy_writers_write_the_exact_name(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert write_npy(tmp_path / "rows.bin", a) == tmp_path / "rows.bin"
    assert write_npz(tmp_path / "emb", images=a, ids=np.array([3, 1])) == tmp_path / "emb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "rows.bin"]  # nothing appended
    np.testing.assert_array_equal(np.load(tmp_path / "rows.bin"), a)
    with np.load(tmp_path / "emb") as z:
        np.testing.assert_array_equal(z["images"], a)
        np.testing.assert_array_equal(z["ids"], [3, 1])


def test_output_dir_removes_only_the_empty_folders_it_made(tmp_path):
    new = tmp_path / "a" / "b" / "c"
    with pytest.raises(KeyboardInterrupt):
        with output_dir(new) as d:
            assert d.is_dir()
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # a, b and c were made by the call and are gone again

    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(ValueError):
        with output_dir(existing / "run"):
            raise ValueError
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list(existing.iterdir()) == []

    with pytest.raises(ValueError):
        with output_dir(tmp_path / "x" / "y") as d:
            (d / "result.json").write_text("{}")  # work done is never removed
            raise ValueError
    assert (tmp_path / "x" / "y" / "result.json").is_file()

    with output_dir(tmp_path / "ok") as d:
        pass
    assert d.is_dir()  # success keeps the folder, empty or not
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PriorCLIPError, match="not writable"):
        with output_dir(tmp_path / "afile" / "run"):
            pass


# --- priorclip eval / demo -----------------------------------------------------------------------------------------


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture
def no_evaluation(monkeypatch):
    """eval must refuse an unwritable output before it loads the dataset or the model, or evaluates."""

    def never(*a, **k):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr("priorclip.data.load_karpathy", never)
    monkeypatch.setattr("priorclip.retrieval.evaluate", never)
    monkeypatch.setattr("priorclip.cli.build_model", never)


def one_error_line(result):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("option", ["--out", "--save-embeddings"])
def test_eval_checks_outputs_before_the_evaluation(tmp_path, no_evaluation, option):
    (tmp_path / "afile").write_text("x")
    folder = tmp_path / ("adir.npz" if option == "--save-embeddings" else "adir")  # named as the writer would
    folder.mkdir()
    base = ["eval", "--model", "priorclip-tiny", "--dataset", tmp_path / "d.json", "--images", tmp_path]
    line = one_error_line(run(*base, option, tmp_path / "afile" / "out"))
    written = tmp_path / "afile" / ("out.npz" if option == "--save-embeddings" else "out")
    assert line == f"Error: {option}: cannot write {written}: {tmp_path / 'afile'} is a file, not a folder"
    line = one_error_line(run(*base, option, folder))
    assert line == f"Error: {option}: cannot write {folder}: it is a folder"
    line = one_error_line(run(*base, "--out", tmp_path / "e.npz", "--save-embeddings", tmp_path / "e"))
    assert line == f"Error: --out and --save-embeddings name the same file: {tmp_path / 'e.npz'}"


@needs_permissions
def test_eval_refuses_a_read_only_folder_before_the_evaluation(tmp_path, no_evaluation):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = one_error_line(run("eval", "--dataset", tmp_path / "d.json", "--images", tmp_path,
                                  "--save-embeddings", ro / "emb"))
    finally:
        ro.chmod(0o700)
    assert line.startswith(f"Error: --save-embeddings: cannot write {ro / 'emb.npz'}: cannot create files in {ro}")


def test_eval_prints_the_exact_paths_it_wrote(tmp_path):
    json_path, img_dir = make_sample(tmp_path / "s", n_images=4, size=48)
    out, emb = tmp_path / "res" / "m.json", tmp_path / "res" / "emb"  # res/ does not exist yet
    r = run("eval", "--model", "priorclip-tiny", "--dataset", json_path, "--images", img_dir, "--out", out,
            "--save-embeddings", emb)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}\n" in r.output
    npz = tmp_path / "res" / "emb.npz"
    dim = json.loads(out.read_text())["model"]["embed_dim"]
    assert f"wrote {npz} (images [4, {dim}], texts [20, {dim}], caption_image [20]" in r.output
    with np.load(npz) as z:
        assert z["images"].shape == (4, dim) and z["texts"].shape == (20, dim)
        np.testing.assert_array_equal(z["caption_image"], np.repeat(np.arange(4), 5))  # 5 captions per image
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["emb.npz", "m.json"]  # no temp files


def test_failed_demo_leaves_no_output_folder(tmp_path):
    line = one_error_line(run("demo", "--model", "no-such-model", "--out", tmp_path / "demo" / "out"))
    assert "unknown model 'no-such-model'" in line
    assert list(tmp_path.iterdir()) == []
