"""Put back together the wheels that ``../shared/tools/wheel-chunks`` cut into parts, check them, install them.

    python benchmarks/gpu/wheels.py --names .chunk5/names.txt --parts /tmp/chunks --site /tmp/site
    python benchmarks/gpu/wheels.py --site /tmp/site .whl/*.whl      (lib.sh: the carried small wheels, e.g. ftfy)

``wheel-chunks NAME==VERSION`` concatenates the wheels, cuts the stream into 52 MiB parts (``part.aa``, ``part.ab``,
... in ``.chunk1``, ``.chunk2``, ...) and puts ``names.txt`` and ``sizes.txt`` beside the last part. The earlier
calls copy their parts to ``/tmp/chunks``; the call that carries the last folder runs this (``q3-ort-cuda.sh`` does):
parts are looked for in ``--parts`` and beside ``names.txt``. A missing part is named by what is missing (the parts
must add up to the wheels' sizes) instead of surfacing later as a broken zip; every wheel is checked as a zip before
``pip install --no-index --no-deps --target SITE``. That install command is spelled out only here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

MIB = 1 << 20


def assemble(names_file: Path, parts_dir: Path, out_dir: Path) -> list[Path]:
    folder = names_file.parent
    names = names_file.read_text().split()
    sizes_file = folder / "sizes.txt"
    if not sizes_file.is_file():
        raise SystemExit(f"Error: {sizes_file} not found beside {names_file.name} (carry the whole last .chunk folder)")
    sizes = [int(s) for s in sizes_file.read_text().split()]
    if len(sizes) != len(names):
        raise SystemExit(f"Error: {names_file} lists {len(names)} wheels but {sizes_file} {len(sizes)} sizes")
    parts = {p.name: p for d in (parts_dir, folder) if d.is_dir() for p in sorted(d.glob("part.*"))}
    ordered = [parts[k] for k in sorted(parts)]
    have, need = sum(p.stat().st_size for p in ordered), sum(sizes)
    if have != need:
        raise SystemExit(
            f"Error: the wheel parts found ({len(ordered)}: {', '.join(sorted(parts)) or 'none'}, in {parts_dir} and "
            f"{folder}) hold {have / MIB:.1f} MiB but the wheels need {need / MIB:.1f} MiB: a part is missing or "
            "damaged. Make the wheel-chunks calls back to back on the same machine (it stays warm ~30 s), then this one")
    out_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    it = iter(ordered)
    cur = open(next(it), "rb")
    try:
        for name, size in zip(names, sizes):
            dst = out_dir / name
            with dst.open("wb") as w:
                left = size
                while left:
                    chunk = cur.read(min(left, 8 * MIB))
                    if not chunk:
                        cur.close()
                        cur = open(next(it), "rb")
                        continue
                    w.write(chunk)
                    left -= len(chunk)
            if not zipfile.is_zipfile(dst):
                raise SystemExit(f"Error: {name} put back together is not a valid wheel (parts out of order or damaged)")
            wheels.append(dst)
    finally:
        cur.close()
    return wheels


def install(wheels: list[Path], site: Path) -> int:
    """pip-install wheel files, without an index or dependencies, into ``site`` (a folder put on PYTHONPATH)."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)])
    if r.returncode:
        print(f"Error: pip could not install {', '.join(w.name for w in wheels)} into {site}", file=sys.stderr)
        return r.returncode
    print(f"installed {', '.join(f'{w.name} ({w.stat().st_size / MIB:.1f} MiB)' for w in wheels)} into {site}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheels", nargs="*", type=Path, help="wheel files to install as they are (instead of --names)")
    ap.add_argument("--names", type=Path, help="names.txt in the last .chunk folder (carried)")
    ap.add_argument("--parts", type=Path, default=Path("/tmp/chunks"), help="where the earlier calls copied parts")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site"), help="pip --target folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/chunk-wheels"))
    a = ap.parse_args(argv)
    if a.wheels:
        return install(a.wheels, a.site)
    if a.names is None:
        ap.error("give wheel files, or --names of the wheel parts")
    if not a.names.is_file():
        print(f"Error: {a.names} not found: carry the last folder that ../shared/tools/wheel-chunks made", file=sys.stderr)
        return 2
    return install(assemble(a.names, a.parts, a.work), a.site)


if __name__ == "__main__":
    sys.exit(main())
