"""The status record of a GPU queue entry (``lib.sh`` calls this after every step).

    qstatus.py init    --status S --entry E --time-limit N --command C
    qstatus.py env     --status S --out env.txt         device, driver, library versions, revision (into S too)
    qstatus.py step    --status S --name N --state ok|failed|timeout|skipped --rc R --seconds T --note X --results DIR
    qstatus.py summary --status S --results DIR --out summary.md
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
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = "priorclip-gpu-queue/1"


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _save(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cmd_init(a) -> None:
    _save(a.status, {"schema": SCHEMA, "entry": a.entry, "command": a.command, "date": _now(),
                     "started_unix": time.time(), "time_limit_s": a.time_limit, "wall_s": 0.0, "finished": False,
                     "revision": os.environ.get("PRIORCLIP_GIT_REVISION"), "environment": None, "steps": []})


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None


def environment() -> dict:
    env: dict = {"python": platform.python_version(), "host_cpus": os.cpu_count(), "machine": platform.machine(),
                 "revision": os.environ.get("PRIORCLIP_GIT_REVISION", "unknown")}
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


def cmd_env(a) -> None:
    doc = _load(a.status)
    env = environment()
    doc["environment"] = env
    doc["revision"] = env["revision"]
    _save(a.status, doc)
    a.out.write_text("\n".join(f"{k}: {v}" for k, v in env.items()) + "\n", encoding="utf-8")
    print(f"device: {env.get('device')} | torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) | "
          f"onnxruntime {env.get('onnxruntime')} | revision {env['revision']}")


def _files(results: Path, name: str) -> list[str]:
    d = results / name
    return sorted(str(p.relative_to(results)) for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


def cmd_step(a) -> None:
    doc = _load(a.status)
    doc["steps"].append({"name": a.name, "state": a.state, "rc": a.rc, "seconds": a.seconds, "note": a.note or None,
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
    for md in sorted(a.results.rglob("*.md")):
        lines += ["", f"## {md.relative_to(a.results)}", ""] + _head(md, a.max_lines)
    a.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


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
    p = sub.add_parser("step")
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--state", choices=["ok", "failed", "timeout", "skipped"], required=True)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--note", default="")
    p.add_argument("--results", type=Path, required=True)
    p = sub.add_parser("summary")
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-lines", type=int, default=40)
    p = sub.add_parser("finish")
    p.add_argument("--status", type=Path, required=True)
    a = ap.parse_args(argv)
    {"init": cmd_init, "env": cmd_env, "step": cmd_step, "summary": cmd_summary, "finish": cmd_finish}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
