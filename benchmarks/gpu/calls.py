"""Print the exact device calls of a GPU queue entry, after checking that everything they carry is staged and fits.

    python benchmarks/gpu/calls.py 1|2|3|4|5|6|7 [--revision SHA]

One JSON object per call (``carry``, ``command``, ``timeout_s``), in order, ready for the device tool's ``run``,
each after a comment line with the MiB it sends; the revision is filled in (``.git`` does not travel). This is the
one place that spells the calls out (the scripts' headers and the README point here). Checks, with one ``Error:``
line each: the ftfy/wcwidth wheels in ``.whl/`` (entry 7: also the service's wheels and hey in ``.whl/serve/``), the
staged folders the entry carries, every call's size (the working
tree that travels plus its carries, at most 64 MiB) and every command's length (at most 2,000 characters).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout where the package is not installed
    sys.path.insert(0, str(ROOT))

from priorclip.provenance import git_revision  # noqa: E402

MIB = 1 << 20
LIMIT_MIB = 64
# A queue call is at most 9 minutes. The entry's own deadline (lib.sh's Q_TIME_LIMIT) is 510 s from its start and
# every step ends by then, SIGKILL grace included (each step's limit leaves Q_RESERVE = Q_KILL_S = 15 s); what follows
# is the last status write and re-pack (a few seconds), and before it only the shell and one Python start.
RUN_TIMEOUT_S = 540
COPY_TIMEOUT_S = 120


def du(path: Path) -> int:
    """Bytes in a file or folder (stage.py reports its staged sizes with this too)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_bytes() -> int:
    """What travels with every call: tracked files and untracked files that git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def _folders(prefix: str) -> list[str]:
    return sorted((p.name for p in ROOT.glob(f".{prefix}[0-9]*") if p.is_dir()), key=lambda n: int(n[len(prefix) + 1:]))


def _copy_call(folder: str, dest: str) -> dict:
    """A data call: the part in ``folder`` onto the warm machine's /tmp, for the entry's own call to find there."""
    return {"carry": [folder], "command": f"mkdir -p {dest} && cp {folder}/part.* {dest}/ && ls -l {dest}",
            "timeout_s": COPY_TIMEOUT_S}


def plan(entry: str, rev: str) -> list[dict]:
    env = f"PRIORCLIP_GIT_REVISION={rev} "
    if entry == "1":
        return [{"carry": [".bench-data", ".whl"], "command": env + "bash benchmarks/gpu/q1-speed.sh",
                 "timeout_s": RUN_TIMEOUT_S}]
    if entry in ("2", "5"):  # both train on the staged AID/RSICD parts
        parts = _folders("dtrain")
        if not parts or not (ROOT / parts[-1] / "parts.json").is_file():
            raise SystemExit("Error: no staged training data (.dtrain*/parts.json): run python benchmarks/gpu/stage.py train")
        calls = [_copy_call(p, "/tmp/dparts") for p in parts[:-1]]  # the scripts' PARTS_DIR
        script = "q2-train.sh" if entry == "2" else "q5-pir.sh"
        return calls + [{"carry": [parts[-1], ".whl"], "command": env + f"bash benchmarks/gpu/{script}",
                         "timeout_s": RUN_TIMEOUT_S}]
    if entry in ("3", "7"):  # onnxruntime-gpu's parts first; entry 7 also runs the fused engine and the service
        chunks = _folders("chunk")
        if not chunks or not (ROOT / chunks[-1] / "names.txt").is_file():
            raise SystemExit("Error: no onnxruntime-gpu parts (.chunk*/names.txt): run "
                             "../shared/tools/wheel-chunks onnxruntime-gpu==1.31.1")
        calls = [_copy_call(c, "/tmp/chunks") for c in chunks[:-1]]  # the scripts' CHUNKS_DIR
        script = "q3-ort-cuda.sh" if entry == "3" else "q7-serve.sh"
        return calls + [{"carry": [chunks[-1], ".bench-data", ".whl"], "command": env + f"bash benchmarks/gpu/{script}",
                         "timeout_s": RUN_TIMEOUT_S}]
    if entry in ("4", "6"):  # one call on the carried slice, as entry 1
        script = "q4-autotune.sh" if entry == "4" else "q6-pae.sh"
        return [{"carry": [".bench-data", ".whl"], "command": env + f"bash benchmarks/gpu/{script}",
                 "timeout_s": RUN_TIMEOUT_S}]
    raise SystemExit(f"Error: unknown entry {entry!r} (1, 2, 3, 4, 5, 6 or 7)")


# Entry 7: what the GPU image lacks for priorclip-serve (fastapi and the packages it needs at versions the image does
# not have), pinned to the versions the service is tested with here; the load tool hey travels gzip'd beside them.
SERVE_WHEELS = ("fastapi==0.165.0", "starlette==1.10.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
                "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0", "anyio==4.16.0",
                "opentelemetry-api==1.45.2", "uvicorn==0.54.0", "python-multipart==0.0.34")


def serve_errors(whl: Path) -> list[str]:
    """Entry 7's staging: every wheel of SERVE_WHEELS and hey.gz in ``whl`` (.whl/serve)."""
    errors = []
    missing = [w for w in SERVE_WHEELS if not list(whl.glob(w.split("==")[0].replace("-", "_") + "-*.whl"))]
    if missing:
        errors.append(f"no {', '.join(missing)} wheel(s) in {whl.relative_to(ROOT) if whl.is_relative_to(ROOT) else whl}"
                      "/: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation "
                      f"cp --platform manylinux2014_x86_64 -d .whl/serve {' '.join(missing)}")
    if not (whl / "hey.gz").is_file():
        errors.append("no hey.gz in .whl/serve/: apt-get install hey; gzip -9 -c /usr/bin/hey > .whl/serve/hey.gz; "
                      "dpkg-query -W -f='hey ${Version} (Debian package)' hey > .whl/serve/hey.version")
    return errors


def check(calls: list[dict]) -> tuple[list[str], list[float]]:
    """(errors, MiB each call sends)."""
    errors, sizes = [], []
    whl = ROOT / ".whl"
    for name in ("ftfy", "wcwidth"):
        if not list(whl.glob(f"{name}-*.whl")):
            errors.append(f"no {name} wheel in .whl/: python3 -m pip download --no-deps --only-binary=:all: "
                          "--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl "
                          "ftfy==6.3.1 wcwidth==0.9.4")
    if any("q7-serve.sh" in c["command"] for c in calls):
        errors += serve_errors(whl / "serve")
    base = tree_bytes()
    for i, c in enumerate(calls, 1):
        size = base
        for path in c["carry"]:
            p = ROOT / path
            if not p.exists():
                hint = "python benchmarks/gpu/stage.py slice" if path == ".bench-data" else "see benchmarks/gpu/README.md"
                errors.append(f"call {i} carries {path}, which does not exist: {hint}")
                continue
            size += du(p)
        sizes.append(round(size / MIB, 1))
        if size > LIMIT_MIB * MIB:
            errors.append(f"call {i} would send {size / MIB:.1f} MiB (tree {base / MIB:.1f} + {', '.join(c['carry'])}): "
                          f"over {LIMIT_MIB} MiB")
        if len(c["command"]) > 2000:
            errors.append(f"call {i}'s command is {len(c['command'])} characters (at most 2,000)")
    return errors, sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("entry", choices=["1", "2", "3", "4", "5", "6", "7"])
    ap.add_argument("--revision", default=None, help="default: git rev-parse HEAD, +dirty with uncommitted changes")
    a = ap.parse_args(argv)
    calls = plan(a.entry, a.revision or git_revision(ROOT) or "unknown")
    errors, sizes = check(calls)
    for e in errors:
        print(f"Error: {e}", file=sys.stderr)
    if errors:
        return 2
    print(f"# entry {a.entry}: {len(calls)} call(s), back to back (the machine stays warm ~30 s between calls)")
    for i, (c, mib) in enumerate(zip(calls, sizes), 1):
        print(f"# call {i}: sends {mib} MiB (at most {LIMIT_MIB})")
        print(json.dumps(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
