"""The status record of a GPU queue entry (``lib.sh`` calls this after every step).

    qstatus.py init    --status S --entry E --time-limit N --command C     prints the revision it recorded
    qstatus.py env     --status S --out env.txt [--device D --shell env.sh]
                       device, driver, library versions (into S too); env.sh sets Q_DEVTAG and Q_FUSED for lib.sh
    qstatus.py step    --status S --name N --state ok|failed|timeout|skipped --rc R --seconds T --note X --results DIR
                       [--log LOG]
    qstatus.py summary --status S --results DIR --out summary.md [--brief-out brief.md]
    qstatus.py finish  --status S

The status JSON (``q<N>-<name>-status.json``) is what ``collect.py`` and the README's "last run" column read: entry,
device, versions, revision, command, date, the time limit, wall seconds and one record per step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = "priorclip-gpu-queue/1"
ROOT = Path(__file__).resolve().parents[2]
# Appended, not prepended: on the GPU machine the project copy on PYTHONPATH (with priorclip.serve) must win; before
# that copy exists (init), priorclip.provenance comes from here
sys.path.append(str(ROOT))
# The backends that are not the fused-kernel engine: entry 1's fused step runs every other registered one
NOT_FUSED = {"torch", "torch-compile", "onnxruntime", "aoti", "tensorrt"}
# The device tool returns the last 12,000 characters of a call's output: the brief summary printed last stays under
# this, with room for the lines before it
BRIEF_CHARS = 9000


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _save(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def revision() -> str:
    """The revision passed in (.git does not travel to the GPU machine), else git's, else the one recorded when the
    carried data was staged (marked so), else "unknown"."""
    from priorclip.provenance import git_revision

    rev = os.environ.get("PRIORCLIP_GIT_REVISION") or git_revision(ROOT)
    if rev:
        return rev
    for f in [ROOT / ".bench-data" / "STAGED.json", *sorted(ROOT.glob(".dtrain*/parts.json"))]:
        if f.is_file():
            return f"{json.loads(f.read_text(encoding='utf-8')).get('revision') or 'unknown'} (as staged)"
    return "unknown"


def cmd_init(a) -> None:
    rev = revision()
    _save(a.status, {"schema": SCHEMA, "entry": a.entry, "command": a.command, "date": _now(),
                     "started_unix": time.time(), "time_limit_s": a.time_limit, "wall_s": 0.0, "finished": False,
                     "revision": rev, "environment": None, "steps": []})
    print(rev)


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None


def environment() -> dict:
    env: dict = {"python": platform.python_version(), "host_cpus": os.cpu_count(), "machine": platform.machine()}
    env["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"])
    for mod in ("torch", "triton", "onnx", "onnxruntime", "onnxscript", "ftfy", "numpy"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
            if mod == "onnxruntime":
                env["onnxruntime_providers"] = m.get_available_providers()
                env["onnxruntime_path"] = str(Path(m.__file__).parent)
        except Exception as e:  # noqa: BLE001 - a missing or broken library is a fact to record
            env[mod] = f"missing ({type(e).__name__}: {str(e)[:120]})"
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["cudnn"] = torch.backends.cudnn.version()
        else:
            env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        env["tf32_default"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    except Exception as e:  # noqa: BLE001
        env["device"] = f"unknown (torch: {e})"
    return env


def device_tag(device: str) -> str:
    """The device as a file-name tag (``nvidia-h100-80gb-hbm3``, ``cpu``), as priorclip-bench names its files."""
    import torch
    from benchmarks.cli import _slug

    on_gpu = (device == "auto" or device.startswith("cuda")) and torch.cuda.is_available()
    return _slug(torch.cuda.get_device_name(0)) if on_gpu else "cpu"


def fused_engines(device: str) -> list[str]:
    """backend:precision for every registered backend that is not in NOT_FUSED, at each precision it runs here."""
    import torch

    try:
        from priorclip.serve.engines import BACKENDS
    except Exception:  # noqa: BLE001 - lib.sh checked the import; without it there is simply nothing to run
        return []
    dev = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else device
    return [f"{n}:{p}" for n, b in BACKENDS.items() if n not in NOT_FUSED for p in b.precisions.get(dev, ())]


def cmd_env(a) -> None:
    doc = _load(a.status)
    env = environment()
    doc["environment"] = env
    _save(a.status, doc)
    a.out.write_text("\n".join(f"{k}: {v}" for k, v in {**env, "revision": doc["revision"]}.items()) + "\n",
                     encoding="utf-8")
    if a.shell:
        a.shell.write_text(f"Q_DEVTAG={shlex.quote(device_tag(a.device))}\n"
                           f"Q_FUSED={shlex.quote(','.join(fused_engines(a.device)))}\n", encoding="utf-8")
    print(f"device: {env.get('device')} | torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) | "
          f"onnxruntime {env.get('onnxruntime')} | revision {doc['revision']}")


def _files(results: Path, name: str) -> list[str]:
    d = results / name
    return sorted(str(p.relative_to(results)) for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


BUILDING = re.compile(r"^\[([^\]\s]+)\] building \.\.\.", re.M)  # priorclip-bench's line as each engine starts


def _cut(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def report_notes(folder: Path, log: Path | None, state: str) -> list[str]:
    """What a step's reports say went wrong, which its exit status does not: priorclip-bench exits 0 when engines
    failed or fell outside tolerance, and a bench cut off by its time limit lacks the engine it was on."""
    notes, done = [], set()
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        recall = {r.get("engine"): r for r in (doc.get("recall") or {}).get("engines", [])}
        for e in doc.get("engines") or []:  # priorclip-bench
            name = f"{e['backend']}/{e['precision']}"
            done.add(name)
            if e.get("status") != "ok":
                notes.append(f"{name} {e.get('status')}: {_cut(e.get('reason') or '?')}")
            elif e.get("verdict") == "FAIL":
                notes.append(f"{name} FAIL: {_cut('; '.join((recall.get(name) or {}).get('failures') or ['?']))}")
        for name, r in (doc.get("reports") or {}).items():  # export.report, trained_parity.py
            if isinstance(r, dict) and r.get("passed") is False:
                notes.append(f"{name} FAIL: {_cut('; '.join(r.get('failures') or ['?']))}")
        for name, err in (doc.get("errors") or {}).items():
            notes.append(f"{name} could not run: {_cut(err)}")
    if state == "timeout" and log is not None and log.is_file():
        started = BUILDING.findall(log.read_text(encoding="utf-8", errors="replace"))
        if started and started[-1] not in done:
            notes.append(f"cut off during {started[-1]} (not in the report; the engines after it did not run)")
    return notes


def cmd_step(a) -> None:
    doc = _load(a.status)
    note = "; ".join(([a.note] if a.note else []) + report_notes(a.results / a.name, a.log, a.state))
    doc["steps"].append({"name": a.name, "state": a.state, "rc": a.rc, "seconds": a.seconds, "note": note or None,
                         "ended": _now(), "files": _files(a.results, a.name)})
    doc["wall_s"] = round(time.time() - doc["started_unix"], 1)
    _save(a.status, doc)


def cmd_finish(a) -> None:
    doc = _load(a.status)
    doc["wall_s"] = round(time.time() - doc["started_unix"], 1)
    doc["finished"] = True
    _save(a.status, doc)


def _head(md: Path, max_lines: int) -> list[str]:
    lines = md.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[:max_lines] + ([f"... ({len(lines) - max_lines} more lines in the results archive)"]
                                if len(lines) > max_lines else [])


def cmd_summary(a) -> None:
    doc = _load(a.status)
    env = doc.get("environment") or {}
    wall = time.time() - doc["started_unix"] if not doc.get("finished") else doc["wall_s"]
    lines = [f"# GPU queue entry {doc['entry']}", "",
             f"- device: {env.get('device', 'not recorded yet')}; {env.get('nvidia_smi') or ''}",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
             f"onnxruntime {env.get('onnxruntime')} {env.get('onnxruntime_providers') or ''}",
             f"- revision {doc.get('revision')}; started {doc['date']}; wall {wall:.0f} s of {doc['time_limit_s']} s"
             + ("" if doc.get("finished") else " (still running when this was written)"),
             f"- command: `{doc['command']}`", "",
             "| step | state | seconds | note |", "|---|---|---:|---|"]
    for s in doc["steps"]:
        lines.append(f"| {s['name']} | {s['state'].upper() if s['state'] != 'ok' else 'ok'} | {s['seconds']:.0f} | "
                     f"{(s['note'] or '').replace('|', '/')} |")
    reports = sorted(a.results.rglob("*.md"))
    full = list(lines)
    for md in reports:
        full += ["", f"## {md.relative_to(a.results)}", ""] + _head(md, a.max_lines)
    a.out.write_text("\n".join(full) + "\n", encoding="utf-8")
    if a.brief_out:
        a.brief_out.write_text(_brief(lines, reports, a.results), encoding="utf-8")


def _brief(lines: list[str], reports: list[Path], results: Path, limit: int = BRIEF_CHARS) -> str:
    """The summary for the call's output: the step table, then each report's opening (title, key table, notes: what
    comes before its first section), cut so the whole fits the output tail the device tool returns."""
    text = "\n".join(lines) + "\n"
    tail = "\n(each report's head: the -summary.md file that comes back; all of it: the -results.tar.gz)\n"
    for md in reports:
        head = []
        for line in md.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            if line.startswith("## "):
                break
            if len(line) <= 300:  # long prose paragraphs (the legend) are in the summary file
                head.append(line)
        part = "\n".join(["", f"## {md.relative_to(results)}", *head[:20]]).rstrip() + "\n"
        if len(text) + len(part) + len(tail) > limit:
            text += f"\n## {md.relative_to(results)}: left out here (output limit)\n"
            continue
        text += part
    return text + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--entry", required=True)
    p.add_argument("--time-limit", type=float, required=True)
    p.add_argument("--command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto", help="the entry's DEVICE, for the device tag and the fused engines")
    p.add_argument("--shell", type=Path, default=None, help="write Q_DEVTAG=... and Q_FUSED=... here for lib.sh")
    p = sub.add_parser("step")
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--state", choices=["ok", "failed", "timeout", "skipped"], required=True)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--note", default="")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--log", type=Path, default=None, help="the step's log: names the engine a cut-off bench was on")
    p = sub.add_parser("summary")
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-lines", type=int, default=40)
    p.add_argument("--brief-out", type=Path, default=None, help="also the short summary lib.sh prints last")
    p = sub.add_parser("finish")
    p.add_argument("--status", type=Path, required=True)
    a = ap.parse_args(argv)
    {"init": cmd_init, "env": cmd_env, "step": cmd_step, "summary": cmd_summary, "finish": cmd_finish}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
