"""File what a GPU queue call brought back under ``benchmarks/results/`` and print its "last run" line.

    python benchmarks/gpu/collect.py FILES_AT [--results benchmarks/results] [--with-logs]

``FILES_AT`` is the folder the device tool copied ``$OUT`` into. For every ``q<N>-<name>-status.json`` there, the
matching ``-results.tar.gz`` is unpacked into ``benchmarks/results/gpu/<entry>-<device>-<date>/`` (one folder per
step with its result files, ``env.txt``, ``status.json`` with device, versions, command, revision and date, and
``summary.md``; the logs only with ``--with-logs``), and the two cells of the queue table in
``benchmarks/gpu/README.md`` that a run fills in, "last run" and "results", are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cli import _slug  # noqa: E402 - the bench's own file-name tag, so folders and reports agree


def collect(files_at: Path, results: Path, with_logs: bool = False) -> list[tuple[Path, str, str]]:
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
                # q2: the metrics of a training phase cut off before train_aid.sh copied them, beside the others
                for m in sorted(Path(tmp).glob("runs/*/metrics.jsonl")):
                    if not (dest / m.parent.name / m.name).is_file():
                        (dest / m.parent.name).mkdir(exist_ok=True)
                        shutil.copy2(m, dest / m.parent.name / m.name)
        shutil.copy2(st, dest / "status.json")  # the newest status, also when the archive is older
        states = [s["state"] for s in status["steps"]]
        tally = ", ".join(f"{states.count(k)} {k}" for k in ("ok", "failed", "timeout", "skipped") if states.count(k))
        wall = status.get("wall_s") or 0
        where = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
        last_run = (f"{date}, {device}, {wall / 60:.1f} min of the call"
                    f"{'' if status.get('finished') else ' (did not finish)'}: {tally}")
        done.append((dest, last_run, f"`{where}/`"))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files_at", type=Path)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--with-logs", action="store_true")
    a = ap.parse_args(argv)
    for dest, last_run, where in collect(a.files_at, a.results, a.with_logs):
        print(f"filed {dest}")
        print(f"last run: {last_run}")
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
