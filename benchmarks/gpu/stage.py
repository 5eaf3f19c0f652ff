"""Stage AID/RSICD data inside the checkout, in git-ignored folders, so that GPU calls can carry it.

``../shared`` does not travel to the GPU machine, at most 64 MiB (the ~2.6 MiB working tree included) travels per call,
and the images' licence grants nothing (``../shared/data/README.md``): they go into ignored folders only, never into
git. Every selection is class-spread and seeded (:func:`priorclip.data.RetrievalSet.subset`), never "the first N":
the data files sort by class.

    python benchmarks/gpu/stage.py slice   # .bench-data/: queue entries 1 and 3 (speed, ONNX Runtime CUDA)
    python benchmarks/gpu/stage.py train   # .dtrain1, .dtrain2, .dtrain3: queue entry 2 (training)
    python benchmarks/gpu/stage.py unpack --manifest .dtrain3/parts.json --parts /tmp/dparts --dst /tmp/data
                                           # on the GPU machine (q2-train.sh does it): check every part, unpack

``slice`` writes ``.bench-data/aid-rsicd/`` (one ``dataset_rsicd_aid.json`` + ``images/``): 360 test images (12 per
class, enough for every precision's ΔmR verdict) and 256 train images for INT8 calibration (never the evaluated
split), about 9 MiB; ``.bench-data/STAGED.json`` records what was drawn.

``train`` packs the whole train split, a class-spread val subset (300 images) and the whole test split, with a
compact JSON, as one gzip'd tar cut into parts of at most ``--part-mib`` MiB in ``.dtrain1``, ``.dtrain2``, ...;
the last folder also holds ``parts.json`` (names, sizes, SHA-256 of every part) so the training call can tell a
missing part from a complete set. The raw bytes are 131 MiB (train 112.3 MiB, test 14.5, val subset 4.2, JSON 0.3
gzip'd), more than two calls can carry (2 x 62 MiB): the first parts travel in calls of their own and the last one
rides with the training call; ``python benchmarks/gpu/calls.py 2`` prints those calls.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, Path(__file__).resolve().parent):  # the package without an install; calls.py beside this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from calls import LIMIT_MIB as CALL_LIMIT_MIB, MIB, du  # noqa: E402
from priorclip.provenance import git_revision  # noqa: E402

DATA_NAME = "dataset_rsicd_aid.json"  # the name priorclip.export.report and the queue scripts look for


def _revision() -> str:
    return git_revision(ROOT) or "unknown"


def _source(src: Path) -> tuple[Path, Path, list[dict]]:
    """(dataset JSON, image folder, its validated entries)."""
    from priorclip.data import read_karpathy_entries, resolve_dataset

    json_path, images = resolve_dataset(src)
    return json_path, images, read_karpathy_entries(json_path, images)


def _pick(json_path: Path, images: Path, split: str, n: int, seed: int):
    """Class-spread subset of one split (the whole split for n <= 0): (set of file names, describe())."""
    from priorclip.data import load_karpathy

    ds = load_karpathy(json_path, images, split)
    if n > 0:
        ds = ds.subset(n, seed=seed)
    names = {str(p.relative_to(images)) for p in ds.images}
    return names, ds.describe()


def _compact(entries: list[dict], keep: dict[str, set[str]]) -> dict:
    """The kept entries with only what the readers use (file name, split, label, raw captions)."""
    out = []
    for e in entries:
        name = str(Path(e.get("filepath", "")) / e["filename"])
        if name not in keep.get(e.get("split"), ()):
            continue
        c = {k: e[k] for k in ("filepath", "filename", "split", "label") if k in e}
        c["sentences"] = [{"raw": s["raw"]} for s in e["sentences"]]
        out.append(c)
    return {"dataset": "aid-rsicd (staged for a GPU call; not for redistribution)", "images": out}


def _ignore(folder: Path, folder_pattern: str) -> None:
    """Make sure git ignores the staged folder: .gitignore covers the default names, not a --dst or --prefix of
    one's own (the images' licence forbids committing them), so this adds only what git does not already ignore."""
    exclude = ROOT / ".git" / "info" / "exclude"
    if not exclude.parent.is_dir():
        return
    if subprocess.run(["git", "check-ignore", "-q", str(folder)], cwd=ROOT).returncode == 0:
        return
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if folder_pattern not in lines:
        exclude.write_text("\n".join(lines + [folder_pattern]) + "\n")


def stage_slice(a) -> int:
    json_path, images, entries = _source(a.src)
    test, test_desc = _pick(json_path, images, "test", a.test, a.seed)
    keep = {"test": test}
    manifest = {"purpose": "queue entries 1 (speed) and 3 (ONNX Runtime CUDA): parity/recall set and calibration",
                "source": str(a.src), "test": test_desc}
    if a.calib > 0:
        calib, calib_desc = _pick(json_path, images, "train", a.calib, a.seed)
        keep["train"] = calib
        manifest["train_for_calibration"] = calib_desc
    dst = a.dst
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "images").mkdir(parents=True)
    compact = _compact(entries, keep)
    (dst / DATA_NAME).write_text(json.dumps(compact, separators=(",", ":")), encoding="utf-8")
    for e in compact["images"]:
        name = str(Path(e.get("filepath", "")) / e["filename"])
        (dst / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / name, dst / "images" / name)
    size = du(dst)
    manifest.update(revision=_revision(), date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    bytes=size, command=" ".join(sys.argv))
    (dst.parent / "STAGED.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if dst.parent.resolve().parent == ROOT.resolve():
        _ignore(dst.parent, f"/{dst.parent.name}/")
    print(f"staged {dst}: test {test_desc['coverage']}"
          + (f"; calibration (train) {manifest['train_for_calibration']['coverage']}" if a.calib > 0 else "")
          + f"; {size / MIB:.1f} MiB. Carry [\"{dst.parent.name}\"] (with \".whl\").")
    if size > a.max_mib * MIB:
        print(f"stage.py: {size / MIB:.1f} MiB is over --max-mib {a.max_mib}: stage fewer images", file=sys.stderr)
        return 2
    return 0


def stage_train(a) -> int:
    json_path, images, entries = _source(a.src)
    splits = {e.get("split") for e in entries}
    for s in ("train", "test"):
        if s not in splits:
            raise SystemExit(f"stage.py: {json_path} has no {s!r} split")
    keep, describe = {}, {}
    keep["train"], describe["train"] = _pick(json_path, images, "train", 0, a.seed)
    if "val" in splits and a.val != 0:
        keep["val"], describe["val"] = _pick(json_path, images, "val", a.val, a.seed)
    keep["test"], describe["test"] = _pick(json_path, images, "test", 0, a.seed)
    compact = _compact(entries, keep)
    prefix = a.prefix
    for old in ROOT.glob(f".{prefix}[0-9]*") if a.out_root is None else a.out_root.glob(f".{prefix}[0-9]*"):
        shutil.rmtree(old)
    out_root = a.out_root or ROOT
    with tempfile.TemporaryDirectory(prefix="priorclip-stage-") as tmp:
        blob = Path(tmp) / "data.tar.gz"
        # gzip -1: JPEG bytes do not shrink, but the tar headers (512 B per file, ~9,000 files) do
        with gzip.GzipFile(blob, "wb", compresslevel=1, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            data = json.dumps(compact, separators=(",", ":")).encode()
            info = tarfile.TarInfo(f"aid-rsicd/{DATA_NAME}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for e in compact["images"]:
                name = str(Path(e.get("filepath", "")) / e["filename"])
                tar.add(images / name, arcname=f"aid-rsicd/images/{name}", recursive=False)
        total = blob.stat().st_size
        part_bytes = int(a.part_mib * MIB)
        n_parts = max(1, -(-total // part_bytes))
        parts = []
        with blob.open("rb") as f:
            for i in range(n_parts):
                chunk = f.read(part_bytes)
                folder = out_root / f".{prefix}{i + 1}"
                folder.mkdir(parents=True)
                name = f"part.{i:02d}"
                (folder / name).write_bytes(chunk)
                parts.append({"name": name, "folder": folder.name, "bytes": len(chunk),
                              "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"format": "priorclip-train-parts/1", "unpack": "cat part.* | tar -xz (gives aid-rsicd/)",
                "parts": parts, "bytes": total, "splits": describe, "source": str(a.src), "revision": _revision(),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    last = out_root / f".{prefix}{n_parts}"
    (last / "parts.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if out_root.resolve() == ROOT.resolve():
        _ignore(last, f"/.{prefix}*/")
    print(f"staged {total / MIB:.1f} MiB in {n_parts} part(s) of at most {a.part_mib} MiB: "
          + ", ".join(f".{prefix}{i + 1} ({p['bytes'] / MIB:.1f} MiB)" for i, p in enumerate(parts)))
    print("splits: " + "; ".join(f"{k} {v['coverage']}" for k, v in describe.items()))
    print(f"the device calls, back to back: python benchmarks/gpu/calls.py 2 ({n_parts - 1} data call(s), then the "
          "training call)")
    if parts[-1]["bytes"] > a.part_mib * MIB or (n_parts > 1 and max(p["bytes"] for p in parts) > (CALL_LIMIT_MIB - 4) * MIB):
        print("stage.py: a part is too large for one call", file=sys.stderr)
        return 2
    return 0


def unpack(a) -> int:
    """Check that every part is there and intact (size, SHA-256), then stream them into ``tar -xz`` under --dst."""
    if not a.manifest.is_file():
        print(f"Error: {a.manifest} not found: carry the last part folder (the one holding parts.json) with this call",
              file=sys.stderr)
        return 2
    man = json.loads(a.manifest.read_text(encoding="utf-8"))
    marker = a.dst / f".unpacked-{hashlib.sha256(a.manifest.read_bytes()).hexdigest()[:16]}"
    if marker.is_file():
        print(f"unpack: {a.dst}/aid-rsicd is already unpacked from these parts")
        return 0
    where = [a.parts, a.manifest.parent]
    found = []
    n = len(man["parts"])
    for i, p in enumerate(man["parts"]):
        path = next((d / p["name"] for d in where if (d / p["name"]).is_file()), None)
        if path is None:
            print(f"Error: data part {p['name']} ({i + 1} of {n}, carried as {p['folder']}) is not in "
                  f"{' or '.join(map(str, where))}: make the data calls back to back on the same machine "
                  "(it stays warm ~30 s), then this one (benchmarks/gpu/README.md, entry 2)", file=sys.stderr)
            return 3
        if path.stat().st_size != p["bytes"] or hashlib.sha256(path.read_bytes()).hexdigest() != p["sha256"]:
            print(f"Error: data part {path} is damaged or from another staging ({path.stat().st_size} bytes, "
                  f"expected {p['bytes']}): stage and carry the parts again", file=sys.stderr)
            return 3
        found.append(path)

    class _Cat(io.RawIOBase):
        def __init__(self, paths):
            self.files = iter(paths)
            self.cur = None

        def readable(self):
            return True

        def readinto(self, b):
            while True:
                if self.cur is None:
                    nxt = next(self.files, None)
                    if nxt is None:
                        return 0
                    self.cur = open(nxt, "rb")
                n = self.cur.readinto(b)
                if n:
                    return n
                self.cur.close()
                self.cur = None

    a.dst.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.dst / "aid-rsicd", ignore_errors=True)
    with tarfile.open(fileobj=io.BufferedReader(_Cat(found), 1 << 20), mode="r|gz") as tar:
        tar.extractall(a.dst, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    marker.write_text(json.dumps({k: man[k] for k in ("bytes", "revision", "date")}) + "\n")
    n_img = sum(1 for _ in (a.dst / "aid-rsicd" / "images").iterdir())
    print(f"unpacked {man['bytes'] / MIB:.1f} MiB from {n} parts into {a.dst / 'aid-rsicd'} ({n_img} images; "
          + "; ".join(f"{k} {v['coverage']}" for k, v in man["splits"].items()) + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("slice", help="class-spread test slice (+ train images for INT8 calibration) in .bench-data/")
    s.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "aid-rsicd",
                   help="dataset folder (one Karpathy JSON + images/) or JSON; default ../shared/data/aid-rsicd")
    s.add_argument("--dst", type=Path, default=ROOT / ".bench-data" / "aid-rsicd")
    s.add_argument("--test", type=int, default=360, help="test images, class-spread (default 360: 12 per class)")
    s.add_argument("--calib", type=int, default=256, help="train images for INT8 calibration (0: none)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-mib", type=float, default=16, help="refuse a slice larger than this")
    t = sub.add_parser("train", help="train + val subset + test split as carried parts .dtrain1, .dtrain2, ...")
    t.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "aid-rsicd")
    t.add_argument("--val", type=int, default=300, help="val images, class-spread (0: no val split)")
    t.add_argument("--part-mib", type=float, default=50, help="largest part (one call carries 64 MiB with the tree)")
    t.add_argument("--prefix", default="dtrain", help="part folders .PREFIX1, .PREFIX2, ...")
    t.add_argument("--out-root", type=Path, default=None, help="where the part folders go (default: the checkout)")
    t.add_argument("--seed", type=int, default=0)
    u = sub.add_parser("unpack", help="on the GPU machine: check the carried parts and unpack them")
    u.add_argument("--manifest", type=Path, required=True, help="parts.json from the last part folder")
    u.add_argument("--parts", type=Path, default=Path("/tmp/dparts"), help="where the earlier calls copied parts")
    u.add_argument("--dst", type=Path, default=Path("/tmp/data"))
    a = ap.parse_args(argv)
    if a.what == "unpack":
        return unpack(a)
    from priorclip.errors import PriorCLIPError

    try:
        return stage_slice(a) if a.what == "slice" else stage_train(a)
    except PriorCLIPError as e:
        print(f"stage.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
