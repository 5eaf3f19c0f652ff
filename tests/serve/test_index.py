"""The vector index library (priorclip.serve.index): exact search against numpy, approximate recall against exact,
persistence, checksums, and writes that a SIGKILL at any step leaves as the old or the new index, never a broken one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from priorclip.errors import DataError, PriorCLIPError  # noqa: E402
from priorclip.serve.index import PartialWork, VectorIndex, add_to_index, set_index_params, write_index  # noqa: E402

IDENT = {"model": "priorclip-tiny", "config_sha256": "c" * 16, "checkpoint_sha256": "random-init"}
REPO = Path(__file__).resolve().parents[2]


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, seed: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around a few centres: embeddings cluster by scene class, unlike uniform random vectors."""
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(len(centres), size=n)] + 1.2 * rng.standard_normal((n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids_of(n: int, start: int = 0) -> list[str]:
    return [f"scene{i % 7}_{i}.jpg" for i in range(start, start + n)]


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    x = unit(500, 24, 0)
    path = tmp_path_factory.mktemp("flat") / "ix"
    ids = ids_of(500)
    write_index(path, x, ids, [{"n": i, "captions": [f"caption {i}"]} for i in range(500)], identity=IDENT)
    return path, x, ids


def test_flat_equals_numpy_brute_force(flat):
    path, x, ids = flat
    ix = VectorIndex.open(path)
    q = unit(30, 24, 1)
    order, scores = brute_force(x, q, 10)
    hits = ix.search(q, 10)
    assert [[h.id for h in row] for row in hits] == [[ids[j] for j in r] for r in order]
    assert np.allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
    assert hits[3][0].meta == {"n": int(order[3][0]), "captions": [f"caption {order[3][0]}"]}
    # one vector is one query; k is clipped to the index size
    assert [h.id for h in ix.search(q[0], 3)[0]] == [ids[j] for j in order[0][:3]]
    everything = ix.search(q[:2], 10_000)
    assert [len(r) for r in everything] == [500, 500]
    assert [h.id for h in everything[1]] == [ids[j] for j in brute_force(x, q[1:2], 500)[0][0]]


def test_lookups_and_bad_queries(flat):
    path, x, ids = flat
    ix = VectorIndex.open(path)
    assert len(ix) == 500 and ix.dim == 24 and ix.kind == "flat" and ix.metric == "ip" and ix.identity == IDENT
    assert ids[7] in ix and "nope" not in ix and 7 not in ix
    assert np.array_equal(ix.vector(ids[7]), x[7]) and ix.meta(ids[7])["n"] == 7
    ix.meta(ids[7])["n"] = 99  # a copy: the index is not changed through it
    assert ix.meta(ids[7])["n"] == 7
    with pytest.raises(KeyError, match="nope"):
        ix.vector("nope")
    with pytest.raises(KeyError):
        ix.meta("nope")
    for bad, match in (((unit(2, 23, 0), 5), "queries must be"), ((unit(2, 24, 0), 0), "k must be"),
                       ((unit(2, 24, 0), -3), "k must be"), ((np.full((1, 24), np.nan), 3), "finite")):
        with pytest.raises(ValueError, match=match) as e:
            ix.search(*bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="efSearch applies to hnsw"):
        ix.search(x[:1], 3, ef_search=10)
    info = ix.info()
    assert info["count"] == 500 and info["dim"] == 24 and info["checksums_ok"] is True
    assert set(info["files"]) == {"vectors", "items"} and all(f["bytes"] > 0 for f in info["files"].values())
    assert info["created"] and info["updated"]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall_vs_flat(tmp_path, kind):
    d = 32
    centres = np.random.default_rng(5).standard_normal((40, d))
    x, q = clustered(3000, d, 6, centres), clustered(200, d, 7, centres)
    ids = ids_of(3000)
    flat_ix = write_index(tmp_path / "flat", x, ids, identity=IDENT)
    approx = write_index(tmp_path / kind, x, ids, identity=IDENT, kind=kind)
    exact = [{h.id for h in row} for row in flat_ix.search(q, 10)]
    got = [{h.id for h in row} for row in approx.search(q, 10)]
    recall = np.mean([len(a & b) / 10 for a, b in zip(got, exact)])
    print(f"{kind} recall@10 vs flat (clustered): {recall:.4f}, params {approx.info()['params']}")
    assert recall >= 0.9
    # reopening gives the same answers (ids and scores)
    again = VectorIndex.open(tmp_path / kind)
    assert [[(h.id, h.score) for h in r] for r in again.search(q[:20], 10)] == \
        [[(h.id, h.score) for h in r] for r in approx.search(q[:20], 10)]
    if kind == "hnsw":  # uniform random unit vectors too (IVF's worst case, so only HNSW is held to it)
        xu, qu = unit(1500, d, 8), unit(200, d, 9)
        fu = write_index(tmp_path / "fu", xu, ids[:1500], identity=IDENT)
        hu = write_index(tmp_path / "hu", xu, ids[:1500], identity=IDENT, kind="hnsw")
        ru = np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(hu.search(qu, 10), fu.search(qu, 10))])
        print(f"hnsw recall@10 vs flat (uniform): {ru:.4f}")
        assert ru >= 0.9
        # efSearch: stored, overridable per call, settable; a wider search is never worse here
        low = {"ef_search": 10}
    else:
        p = approx.info()["params"]
        assert p["nlist"] == min(round(4 * np.sqrt(3000)), 3000 // 39) and p["trained_on"] == 3000
        low = {"nprobe": 1}
        with pytest.raises(ValueError, match="nprobe must be between 1 and nlist"):
            approx.search(q, 10, nprobe=p["nlist"] + 1)
    # a narrower search (this call only) finds less; stored, the same setting is what a reopened index uses
    narrow = approx.search(q, 10, **low)
    assert np.mean([len({h.id for h in a} & e) / 10 for a, e in zip(narrow, exact)]) < recall
    assert [[h.id for h in r] for r in approx.search(q, 10)] == [[h.id for h in r] for r in again.search(q, 10)]
    stored = set_index_params(tmp_path / kind, **low)
    assert stored == {**approx.info()["params"], "efSearch" if kind == "hnsw" else "nprobe": [*low.values()][0]}
    reopened = VectorIndex.open(tmp_path / kind)
    assert [[(h.id, h.score) for h in r] for r in reopened.search(q, 10)] == \
        [[(h.id, h.score) for h in r] for r in narrow]


def test_ivf_refuses_too_few_and_retrains_as_it_grows(tmp_path):
    x = unit(3000, 16, 3)
    with pytest.raises(PriorCLIPError, match="too few vectors to train an ivf index: 600"):
        write_index(tmp_path / "small", x[:600], ids_of(600), identity=IDENT, kind="ivf")
    with pytest.raises(PriorCLIPError, match="ivf with 50 lists needs at least 1950"):
        write_index(tmp_path / "small", x[:700], ids_of(700), identity=IDENT, kind="ivf", params={"nlist": 50})
    assert not (tmp_path / "small" / "manifest.json").exists()
    write_index(tmp_path / "ivf", x[:700], ids_of(700), identity=IDENT, kind="ivf")
    assert VectorIndex.open(tmp_path / "ivf").params == {"nlist": 17, "nprobe": 3, "trained_on": 700}
    add_to_index(tmp_path / "ivf", x[700:1500], ids_of(800, 700), identity=IDENT)  # < 4x: same lists
    assert VectorIndex.open(tmp_path / "ivf").params["trained_on"] == 700
    add_to_index(tmp_path / "ivf", x[1500:], ids_of(1500, 1500), identity=IDENT)  # > 4x: retrained on all
    ix = VectorIndex.open(tmp_path / "ivf")
    assert ix.params["trained_on"] == 3000 and ix.params["nlist"] == 76 and len(ix) == 3000
    assert np.array_equal(ix.all_vectors(), x) and ix.ids == ids_of(3000)


def test_add_skips_existing_refuses_duplicates_and_other_weights(tmp_path):
    x = unit(60, 8, 4)
    write_index(tmp_path / "ix", x[:40], ids_of(40), [{"i": i} for i in range(40)], identity=IDENT)
    res = add_to_index(tmp_path / "ix", x[30:], ids_of(30, 30), [{"i": i} for i in range(30, 60)], identity=IDENT)
    assert (res.added, len(res.skipped), res.count) == (20, 10, 60) and res.skipped[0] == ids_of(1, 30)[0]
    ix = VectorIndex.open(tmp_path / "ix")
    assert ix.ids == ids_of(60) and np.array_equal(ix.all_vectors(), x) and ix.meta(ids_of(1, 45)[0]) == {"i": 45}
    assert [h["op"] for h in ix.info()["history"]] == ["build", "add"]
    gen = ix.info()["generation"]
    res = add_to_index(tmp_path / "ix", x[:5], ids_of(5), identity=IDENT)  # nothing new: nothing written
    assert (res.added, len(res.skipped)) == (0, 5) and VectorIndex.open(tmp_path / "ix").info()["generation"] == gen
    with pytest.raises(DataError, match="appears twice"):
        add_to_index(tmp_path / "ix", x[:2], ["new.jpg", "new.jpg"], identity=IDENT)
    with pytest.raises(PriorCLIPError, match="other weights .checkpoint_sha256"):
        add_to_index(tmp_path / "ix", x[:1], ["new.jpg"], identity={**IDENT, "checkpoint_sha256": "f" * 64})
    with pytest.raises(PriorCLIPError, match="other weights .config_sha256"):
        add_to_index(tmp_path / "ix", x[:1], ["new.jpg"], identity={**IDENT, "config_sha256": "0" * 16})
    with pytest.raises(PriorCLIPError, match="already holds an index"):
        write_index(tmp_path / "ix", x, ids_of(60), identity=IDENT)
    assert len(VectorIndex.open(tmp_path / "ix")) == 60


@pytest.mark.parametrize("vectors, match", [
    (unit(4, 8, 0).astype(np.float64), "expected float32"),
    (unit(4, 7, 0), "7 wide, the index holds 8"),
    (unit(4, 8, 0) * 3, "not L2-normalised .row 0 has norm 3"),
    (np.vstack([unit(3, 8, 0), np.zeros((1, 8), np.float32)]), "row 3 has norm 0"),
    (np.full((4, 8), np.inf, np.float32), "NaN or infinite"),
    (unit(4, 8, 0)[None], "expected a non-empty .N, D."),
])
def test_bad_vectors_refused_in_one_line(tmp_path, vectors, match):
    write_index(tmp_path / "ix", unit(5, 8, 1), ids_of(5), identity=IDENT)
    with pytest.raises(DataError, match=match) as e:
        add_to_index(tmp_path / "ix", vectors, ids_of(len(vectors), 100), identity=IDENT)
    assert "\n" not in str(e.value)
    assert len(VectorIndex.open(tmp_path / "ix")) == 5


def test_bad_ids_metas_kind_identity(tmp_path):
    x = unit(3, 8, 0)
    for kw, match, exc in (({"ids": ["a", "b"]}, "2 ids for 3 vectors", DataError),
                           ({"ids": ["a", "", "c"]}, "item 1 has no id", DataError),
                           ({"metas": [{}, {}, {"x": object()}]}, "not JSON-serialisable", DataError),
                           ({"kind": "annoy"}, "unknown index kind", PriorCLIPError),
                           ({"identity": {"model": "m"}}, "identity of the weights", PriorCLIPError),
                           ({"kind": "flat", "params": {"efSearch": 5}}, "efSearch applies to hnsw", PriorCLIPError)):
        args = {"ids": ["a", "b", "c"], "metas": None, "identity": IDENT, **kw}
        with pytest.raises(exc, match=match):
            write_index(tmp_path / "ix", x, args.pop("ids"), args.pop("metas"), **args)
    assert not (tmp_path / "ix" / "manifest.json").exists()


def test_reopen_and_checksums(tmp_path, flat):
    src, x, ids = flat
    path = tmp_path / "ix"
    shutil.copytree(src, path)
    q = unit(5, 24, 2)
    before = [[(h.id, h.score, h.meta) for h in r] for r in VectorIndex.open(src).search(q, 7)]
    assert [[(h.id, h.score, h.meta) for h in r] for r in VectorIndex.open(path).search(q, 7)] == before
    manifest = json.loads((path / "manifest.json").read_text())
    for role in ("vectors", "items"):
        f = path / manifest["files"][role]["name"]
        good = f.read_bytes()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01  # one flipped bit, same size: only the checksum can tell
        f.write_bytes(bytes(bad))
        with pytest.raises(DataError, match=f"index file {f} is corrupt: its SHA-256 differs") as e:
            VectorIndex.open(path)
        assert "\n" not in str(e.value)
        f.write_bytes(good[:-10])  # truncated: caught from the size even without verifying
        with pytest.raises(DataError, match=f"{f.name} is corrupt: {len(good) - 10} bytes"):
            VectorIndex.open(path, verify=False)
        f.unlink()
        with pytest.raises(DataError, match=f"index file {f} is missing"):
            VectorIndex.open(path)
        f.write_bytes(good)
    assert VectorIndex.open(path).info()["checksums_ok"] is True
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": {"vectors": manifest["files"]["vectors"]}}))
    with pytest.raises(DataError, match="manifest.json: corrupt index manifest .its 'files' do not name"):
        VectorIndex.open(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: corrupt index manifest"):
        VectorIndex.open(path)
    with pytest.raises(DataError, match="index not found"):
        VectorIndex.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a priorclip index"):
        VectorIndex.open(tmp_path / "empty")


def test_reader_racing_a_writer_reads_the_new_generation(tmp_path, monkeypatch):
    """A reader that read the manifest just before a writer switched generations (and removed the old files)
    retries with the new manifest instead of failing."""
    from priorclip.serve import index as index_module

    x = unit(6, 8, 0)
    write_index(tmp_path / "ix", x[:4], ids_of(4), identity=IDENT)
    stale = index_module.read_manifest(tmp_path / "ix")
    add_to_index(tmp_path / "ix", x[4:], ids_of(2, 4), identity=IDENT)
    real, calls = index_module.read_manifest, []

    def racing(path):
        calls.append(path)
        return stale if len(calls) == 1 else real(path)

    monkeypatch.setattr(index_module, "read_manifest", racing)
    assert len(VectorIndex.open(tmp_path / "ix")) == 6 and len(calls) == 3


def test_missing_faiss_is_one_line(flat, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what an environment without faiss-cpu imports
    with pytest.raises(PriorCLIPError, match="pip install faiss-cpu"):
        VectorIndex.open(flat[0])


def test_second_writer_is_refused(tmp_path):
    import fcntl

    write_index(tmp_path / "ix", unit(3, 8, 0), ids_of(3), identity=IDENT)
    fd = os.open(tmp_path / "ix", os.O_RDONLY)  # another process's writer lock, as a build holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PriorCLIPError, match="being written by another process"):
            add_to_index(tmp_path / "ix", unit(1, 8, 1), ["x"], identity=IDENT)
    finally:
        os.close(fd)
    assert add_to_index(tmp_path / "ix", unit(1, 8, 1), ["x"], identity=IDENT).added == 1


def test_partial_work_resumes_only_the_same_inputs(tmp_path):
    w = PartialWork(tmp_path, "fp-1", 10, 4, 8)
    assert w.chunks() == [(0, 4), (4, 8), (8, 10)] and w.done() == 0
    w.save(4, unit(4, 8, 0))
    again = PartialWork(tmp_path, "fp-1", 10, 3, 8)  # the first run's chunk size is kept
    assert again.chunk_size == 4 and again.done() == 4 and np.array_equal(again.load(4, 8), unit(4, 8, 0))
    assert again.load(0, 4) is None
    (again.dir / "chunk-000000000008.npy").write_bytes(b"torn")  # unusable: embedded again, not trusted
    assert again.load(8, 10) is None
    with pytest.raises(PriorCLIPError, match="unfinished work on other inputs.*--restart"):
        PartialWork(tmp_path, "fp-2", 10, 4, 8)
    fresh = PartialWork(tmp_path, "fp-2", 10, 4, 8, restart=True)
    assert fresh.done() == 0


# --- kills during a write ------------------------------------------------------------------------------------------

CHILD = r"""
import os, signal, sys
import numpy as np
import faiss
sys.path.insert(0, {repo!r})
from priorclip.serve import index as I

path, kill_at, torn = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "torn"
calls = [0]

def hook(owner, name):
    real = getattr(owner, name)
    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == kill_at:
            if torn and name == "write_index":  # a torn data file: half written, then killed
                real(*a, **kw)
                os.truncate(a[1], os.path.getsize(a[1]) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    setattr(owner, name, wrapped)

if kill_at:
    for owner, name in ((os, "replace"), (os, "unlink"), (faiss, "write_index")):
        hook(owner, name)
data = np.load(sys.argv[4])
step = int(sys.argv[5])
ids = [f"v{{i}}" for i in range(len(data))]
while True:
    m = I.read_manifest(path)
    n = 0 if m is None else m["count"]
    if n >= len(data):
        break
    if m is None:
        I.write_index(path, data[:step], ids[:step], [{{"i": i}} for i in range(step)], identity={ident!r})
    else:
        I.add_to_index(path, data[n:n + step], ids[n:n + step], [{{"i": i}} for i in range(n, n + step)],
                       identity={ident!r})
    if sys.argv[6] == "once":
        break
"""


def _child(tmp_path: Path) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(CHILD.format(repo=str(REPO), ident=IDENT))
    return script


def _state(path: Path, data: np.ndarray, step: int) -> int | None:
    """The index's item count after checking it is a complete state of the writer: None (no index yet) or the
    first n rows (n a multiple of ``step``), every file verified."""
    try:
        ix = VectorIndex.open(path, verify=True)
    except DataError as e:
        assert "index not found" in str(e) or "not a priorclip index" in str(e), e
        return None
    n = len(ix)
    assert n % step == 0 and 0 < n <= len(data)
    assert ix.ids == [f"v{i}" for i in range(n)] and np.array_equal(ix.all_vectors(), data[:n])
    assert ix.meta(f"v{n - 1}") == {"i": n - 1}
    return n


def test_sigkill_at_every_step_of_a_commit_leaves_old_or_new(tmp_path, monkeypatch):
    """Kill an add just before each operation that changes what is on disk in its commit (writing the FAISS file,
    each rename, each removal of the old generation; once with a torn FAISS file): the index always opens as the
    old or the new complete state, and the next writer finishes and leaves no stray files. (fsync only matters for
    power loss: a SIGKILL loses nothing from the page cache.)"""
    import faiss

    data = unit(300, 16, 11)
    np.save(tmp_path / "data.npy", data)
    base = tmp_path / "base"
    write_index(base, data[:200], [f"v{i}" for i in range(200)], [{"i": i} for i in range(200)], identity=IDENT)
    # count the commit's file operations, in this process, on a copy
    events = []
    for owner, name in ((os, "replace"), (os, "unlink"), (faiss, "write_index")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _r=real, _n=name, **kw: (events.append(_n), _r(*a, **kw))[1])
    shutil.copytree(base, tmp_path / "probe")
    add_to_index(tmp_path / "probe", data[200:], [f"v{i}" for i in range(200, 300)],
                 [{"i": i} for i in range(200, 300)], identity=IDENT)
    monkeypatch.undo()
    assert events == ["write_index", "replace", "replace", "replace", "unlink", "unlink"], events
    script, seen = _child(tmp_path), set()
    plans = [(k, "clean") for k in range(1, len(events) + 1)] + [(events.index("write_index") + 1, "torn")]
    for k, mode in plans:
        path = tmp_path / f"k{k}{mode}"
        shutil.copytree(base, path)
        r = subprocess.run([sys.executable, str(script), str(path), str(k), mode, str(tmp_path / "data.npy"), "100",
                            "once"], capture_output=True, text=True, timeout=60)
        assert r.returncode == -signal.SIGKILL, (k, r.stderr)
        seen.add(_state(path, data, 100))
        res = add_to_index(path, data[200:], [f"v{i}" for i in range(200, 300)],
                           [{"i": i} for i in range(200, 300)], identity=IDENT)
        assert _state(path, data, 100) == 300 and res.count == 300
        # leftovers of the killed writer (stray temporary files, a generation never switched to) are gone
        assert sorted(p.name for p in path.iterdir()) == ["items-000002.jsonl", "manifest.json", "vectors-000002.faiss"]
    assert seen == {200, 300}  # kills landed both before and after the switch


def test_sigkill_at_random_moments(tmp_path):
    """A writer looping over appends, killed at seeded random moments: after each kill the index is a complete
    state; the loop then finishes from there."""
    data = unit(12000, 32, 12)
    np.save(tmp_path / "data.npy", data)
    path, script = tmp_path / "ix", _child(tmp_path)
    cmd = [sys.executable, str(script), "PATH", "0", "clean", str(tmp_path / "data.npy"), "400", "loop"]
    # the kill moments are drawn within one uninterrupted run's duration on this machine, so they land while the
    # writer runs however fast or loaded the machine is
    t0 = time.monotonic()
    subprocess.run([str(tmp_path / "timing") if a == "PATH" else a for a in cmd], check=True, timeout=120,
                   stderr=subprocess.DEVNULL)
    duration = time.monotonic() - t0
    rng = np.random.default_rng(0)
    counts, running = [], 0
    for _ in range(3):
        p = subprocess.Popen([str(path) if a == "PATH" else a for a in cmd], stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.4, 0.9)) * duration)
        running += p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        counts.append(_state(path, data, 400))
    print("items present after each kill:", counts, f"({running} of 3 kills hit a running writer)")
    assert running >= 1
    r = subprocess.run([sys.executable, str(script), str(path), "0", "clean", str(tmp_path / "data.npy"), "400",
                        "loop"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _state(path, data, 400) == 12000
