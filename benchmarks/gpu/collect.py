"""File what a GPU queue call brought back under ``benchmarks/results/`` and print its "last run" line.

    python benchmarks/gpu/collect.py FILES_AT [--results benchmarks/results] [--with-logs]

``FILES_AT`` is the folder the device tool copied ``$OUT`` into. For every ``q<N>-<name>-status.json`` there, the
matching ``-results.tar.gz`` is unpacked into ``benchmarks/results/gpu/<entry>-<device>-<date>/`` (one folder per
step with its result files, ``env.txt``, ``status.json`` with device, versions, command, revision and date, and
``summary.md``; the logs only with ``--with-logs``), and one Markdown row for the queue table in
``benchmarks/gpu/README.md`` is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def collect(files_at: Path, results: Path, with_logs: bool = False) -> list[tuple[Path, str]]:
    done = []
    statuses = sorted(files_at.glob("q*-status.json"))
    if not statuses:
        raise SystemExit(f"Error: no q*-status.json in {files_at} (is it the folder the device call's files came to?)")
    for st in statuses:
        status = json.loads(st.read_text(encoding="utf-8"))
        entry = status["entry"]
        device = (status.get("environment") or {}).get("device") or "unknown-device"
        date = status["date"][:10]
        dest = results / "gpu" / f"{entry}-{_slug(device)}-{date}"
        archive = st.with_name(st.name.replace("-status.json", "-results.tar.gz"))
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        if archive.is_file():
            with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
                tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                items = list((Path(tmp) / "results").iterdir()) if (Path(tmp) / "results").is_dir() else []
                items += [p for p in Path(tmp).iterdir() if p.name == "summary.md" or (p.name == "logs" and with_logs)]
                for item in items:  # each step's folder directly under dest/
                    if item.is_dir() and not any(item.iterdir()):
                        continue
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)
        shutil.copy2(st, dest / "status.json")  # the newest status, also when the archive is older
        states = [s["state"] for s in status["steps"]]
        tally = ", ".join(f"{states.count(k)} {k}" for k in ("ok", "failed", "timeout", "skipped") if states.count(k))
        wall = status.get("wall_s") or 0
        where = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
        row = (f"| {entry} | {date} | {device} | {wall / 60:.1f} min of the call"
               f"{'' if status.get('finished') else ' (did not finish)'} | {tally} | `{where}` |")
        done.append((dest, row))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files_at", type=Path)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--with-logs", action="store_true")
    a = ap.parse_args(argv)
    for dest, row in collect(a.files_at, a.results, a.with_logs):
        print(f"filed {dest}")
        print(f"last run: {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
