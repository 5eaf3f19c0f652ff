"""Benchmark reports: the environment record, JSON (machine), Markdown and console tables (human), a PNG plot.

Every report opens with one summary table (engine, precision, throughput at the largest batch, speed-up against fp32
eager and ``torch.compile``, batch-1 latency, ΔmR, cosine, rank flips, PASS/FAIL) and the fastest engine that passes;
a failing engine (parity outside tolerance, or a build/run failure) is marked FAIL in every table and in the plot.
Warnings about the machine's load and the timing spread follow the summary.

The JSON schema (``SCHEMA`` = "priorclip-bench/2") is checked by :func:`validate_report`, which the tests use.
Version 2 (issue 12): request latency apart from pipelined throughput (``items_per_s`` is now the pipelined rate;
``p90_ms`` / ``p99_ms`` are null below 10 / 100 samples), ``summary``, ``load``, ``reliability``, ``calibration``,
per-engine ``verdict``, recall rows with ``rank_flips``, ``dmr_judged`` and ``notes``, the recall set's class coverage.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from priorclip.provenance import git_revision

SCHEMA = "priorclip-bench/2"

# Stock-module stand-ins of the same towers, measured on one H100 (issue 5): timm ViT-B/32 + torchvision ResNet-50 for
# images, a 77-token CLIP text transformer for captions, batch 256. Printed beside our own H100 numbers.
H100_REFERENCE_POINTS = [
    {
        "what": "image, stock ViT-B/32 + ResNet-50, fp32 eager",
        "items_per_s": 4700,
        "ours": ["torch", "fp32", "image", 256],
    },
    {
        "what": "image, stock ViT-B/32 + ResNet-50, fp16 eager",
        "items_per_s": 6900,
        "ours": ["torch", "fp16", "image", 256],
    },
    {
        "what": "image, stock ViT-B/32 + ResNet-50, fp16 torch.compile max-autotune",
        "items_per_s": 28000,
        "ours": ["torch-compile", "fp16", "image", 256],
    },
    {"what": "text 77 tokens, fp16 eager", "items_per_s": 25000, "ours": ["torch", "fp16", "text", 256]},
    {
        "what": "text 77 tokens, fp16 torch.compile",
        "items_per_s": 32000,
        "ours": ["torch-compile", "fp16", "text", 256],
    },
]

# key -> (type or tuple of types); None values are allowed where the tuple includes type(None)
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
_OPT_DICT = (dict, type(None))
TOP_KEYS = {
    "schema": str,
    "environment": dict,
    "config": dict,
    "model": dict,
    "peak_tflops": dict,
    "summary": dict,
    "reliability": dict,
    "load": dict,
    "engines": list,
    "timings": list,
    "e2e": list,
    "recall": _OPT_DICT,
    "calibration": _OPT_DICT,
    "reference_points": list,
}
ENV_KEYS = {
    "date_utc": str,
    "command": str,
    "git_revision": _OPT_STR,
    "host": str,
    "platform": str,
    "python": str,
    "device": str,
    "device_name": str,
    "cpu_threads": int,
    "versions": dict,
    "cuda": _OPT_STR,
    "driver": _OPT_STR,
}
ENGINE_KEYS = {
    "backend": str,
    "precision": str,
    "status": str,  # ok | failed | unavailable | unsupported | skipped
    "verdict": _OPT_STR,  # PASS | FAIL | unchecked (no recall check) | None (not run)
    "reason": _OPT_STR,
    "setup_s": _OPT_NUM,
    "metadata": _OPT_DICT,
}
TIMING_KEYS = {
    "backend": str,
    "precision": str,
    "tower": str,
    "batch": int,
    "tokens": (int, type(None)),
    "iters": int,
    "p50_ms": _NUM,
    "p90_ms": _OPT_NUM,
    "p99_ms": _OPT_NUM,
    "mean_ms": _NUM,
    "cv": _NUM,
    "items_per_s": _NUM,
    "throughput_calls": int,
    "throughput_method": str,
    "gflop_per_item": _NUM,
    "tflops": _NUM,
    "frac_peak": _OPT_NUM,
    "peak_mem_mib": _OPT_NUM,
    "mem_kind": str,
    "others_cpu_share": _OPT_NUM,
    "unsteady": bool,
}
E2E_KEYS = {
    "backend": str,
    "precision": str,
    "n_images": int,
    "batch": int,
    "workers": int,
    "seconds": _NUM,
    "images_per_s": _NUM,
    "decode_only_images_per_s": _NUM,
}
RECALL_KEYS = {
    "dataset": dict,
    "reference": dict,
    "engines": list,
    "tolerances": dict,
    "dmr_note": _OPT_STR,
}
DATASET_KEYS = {
    "name": str,
    "generated": bool,
    "chosen_by": str,
    "n_images": int,
    "n_captions": int,
    "n_classes": int,
    "coverage": str,
}
RECALL_ROW_KEYS = {
    "engine": str,
    "precision": str,
    "source": str,
    "n_images": int,
    "metrics": dict,
    "delta": dict,
    "cosine_image_min": _NUM,
    "cosine_image_mean": _NUM,
    "cosine_text_min": _NUM,
    "cosine_text_mean": _NUM,
    "top10_agreement_i2t": _NUM,
    "top10_agreement_t2i": _NUM,
    "rank_flips": _OPT_DICT,
    "finite": bool,
    "tolerance": dict,
    "dmr_judged": bool,
    "failures": list,
    "notes": list,
    "within_tolerance": bool,
}
SUMMARY_KEYS = {
    "rows": list,
    "largest_batch": int,
    "fastest_passing": _OPT_DICT,
    "fastest_line": str,
    "failing": list,
    "notes": list,
}
SUMMARY_ROW_KEYS = {
    "engine": str,
    "backend": str,
    "precision": str,
    "status": str,
    "verdict": str,
    "why": _OPT_STR,
    "items_per_s": dict,
    "speedup_eager": dict,
    "speedup_compile": dict,
    "latency": dict,
    "dmr": _OPT_NUM,
    "dmr_judged": (bool, type(None)),
    "cosine_min": _OPT_DICT,
    "rank_flips": _OPT_DICT,
}
RELIABILITY_KEYS = {"reliable": bool, "warnings": list, "unsteady_points": list, "thresholds": dict}
LOAD_KEYS = {
    "measured": bool,
    "cpu_count": int,
    "timed_points": int,
    "others_cpu_share": _OPT_NUM,
    "steal_share": _OPT_NUM,
    "loadavg1_max": _OPT_NUM,
    "gpu": _OPT_DICT,
}


def _check(obj: Any, spec: dict, where: str) -> list[str]:
    errs = []
    if not isinstance(obj, dict):
        return [f"{where}: expected an object"]
    for key, typ in spec.items():
        if key not in obj:
            errs.append(f"{where}: missing key {key!r}")
        elif not isinstance(obj[key], typ) or (
            isinstance(obj[key], bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))
        ):
            errs.append(f"{where}.{key}: {type(obj[key]).__name__} is not {typ}")
    return errs


def validate_report(doc: dict) -> list[str]:
    """Schema problems of a report (empty when it is well formed)."""
    errs = _check(doc, TOP_KEYS, "report")
    if errs:
        return errs
    if doc["schema"] != SCHEMA:
        errs.append(f"report.schema is {doc['schema']!r}, expected {SCHEMA!r}")
    errs += _check(doc["environment"], ENV_KEYS, "environment")
    errs += _check(doc["summary"], SUMMARY_KEYS, "summary")
    for i, r in enumerate(doc["summary"].get("rows", [])):
        errs += _check(r, SUMMARY_ROW_KEYS, f"summary.rows[{i}]")
    errs += _check(doc["reliability"], RELIABILITY_KEYS, "reliability")
    errs += _check(doc["load"], LOAD_KEYS, "load")
    for i, e in enumerate(doc["engines"]):
        errs += _check(e, ENGINE_KEYS, f"engines[{i}]")
    for i, t in enumerate(doc["timings"]):
        errs += _check(t, TIMING_KEYS, f"timings[{i}]")
    for i, t in enumerate(doc["e2e"]):
        errs += _check(t, E2E_KEYS, f"e2e[{i}]")
    if doc["recall"] is not None:
        errs += _check(doc["recall"], RECALL_KEYS, "recall")
        errs += _check(doc["recall"].get("dataset"), DATASET_KEYS, "recall.dataset")
        for i, r in enumerate(doc["recall"].get("engines", [])):
            errs += _check(r, RECALL_ROW_KEYS, f"recall.engines[{i}]")
    if doc["calibration"] is not None:
        errs += _check(doc["calibration"], {"name": str, "generated": bool, "coverage": str}, "calibration")
    return errs


# ------------------------------------------------------------------------------------------------ verdicts, summary


def _name(backend: str, precision: str) -> str:
    return f"{backend}/{precision}"


def finalize(doc: dict) -> dict:
    """Add each engine's verdict, the summary and the reliability assessment to an assembled report."""
    from priorclip.benchmarks.harness import assess_reliability

    recall = {r["engine"]: r for r in (doc["recall"] or {}).get("engines", [])}
    for e in doc["engines"]:
        name = _name(e["backend"], e["precision"])
        if e["status"] == "failed" or (name in recall and not recall[name]["within_tolerance"]):
            e["verdict"] = "FAIL"
        elif e["status"] != "ok":
            e["verdict"] = None
        elif name in recall:
            e["verdict"] = "PASS"
        else:
            e["verdict"] = "unchecked"
    doc["summary"] = build_summary(doc)
    doc["reliability"] = assess_reliability(doc["load"], doc["timings"])
    return doc


def failing(doc: dict) -> list[str]:
    """Names of the engines that fail (parity outside tolerance, or failed to build/run)."""
    return [_name(e["backend"], e["precision"]) for e in doc["engines"] if e.get("verdict") == "FAIL"]


def labels(doc: dict) -> dict[str, str]:
    """Engine name -> its label in tables and plots: failing engines carry "[FAIL]" wherever they appear."""
    # a finalized report lists them in its summary; a bare one (tests' partial documents) is read from the engines
    names = (doc.get("summary") or {}).get("failing")
    return {n: f"{n} [FAIL]" for n in (failing(doc) if names is None else names)}


def _label(lab: dict[str, str], backend: str, precision: str) -> str:
    """An engine's label from :func:`labels` (computed once per table, not once per cell)."""
    n = _name(backend, precision)
    return lab.get(n, n)


def build_summary(doc: dict) -> dict:
    """The rows of the summary table, the fastest engine that passes and the notes under the table."""
    cfg = doc["config"]
    big = max(cfg["batch_sizes"])
    small = min(cfg["batch_sizes"])
    towers = list(cfg["towers"])
    t = {(r["backend"], r["precision"], r["tower"], r["batch"]): r for r in doc["timings"]}
    recall = {r["engine"]: r for r in (doc["recall"] or {}).get("engines", [])}
    ran = {(r["backend"], r["precision"]) for r in doc["timings"]}

    def rate(b, p, tower, batch=big):
        r = t.get((b, p, tower, batch))
        return r["items_per_s"] if r else None

    def p50(b, p, tower, batch):
        r = t.get((b, p, tower, batch))
        return r["p50_ms"] if r else None

    def speedup(b, p, base):
        if base is None:
            return {"against": None, "image": None, "text": None}
        out = {"against": _name(*base)}
        for tower in ("image", "text"):
            mine, theirs = rate(b, p, tower), rate(*base, tower)
            out[tower] = mine / theirs if mine and theirs else None
        return out

    eager = ("torch", "fp32") if ("torch", "fp32") in ran else None

    def compile_base(p):
        for cand in (p, "fp32", *sorted({q for b, q in ran if b == "torch-compile"})):
            if ("torch-compile", cand) in ran:
                return ("torch-compile", cand)
        return None

    rows = []
    for e in doc["engines"]:
        if e["status"] not in ("ok", "failed"):
            continue
        b, p = e["backend"], e["precision"]
        name = _name(b, p)
        rec = recall.get(name)
        why = e["reason"] if e["status"] == "failed" else None
        if why is None and rec and rec["failures"]:
            why = "; ".join(rec["failures"])
        rows.append(
            {
                "engine": name,
                "backend": b,
                "precision": p,
                "status": e["status"],
                "verdict": e.get("verdict") or "unchecked",
                "why": why,
                "items_per_s": {tw: rate(b, p, tw) for tw in ("image", "text")},
                "speedup_eager": speedup(b, p, eager),
                "speedup_compile": speedup(b, p, compile_base(p)),
                "latency": {"batch": small, **{tw: p50(b, p, tw, small) for tw in ("image", "text")}},
                "dmr": rec["delta"]["mR"] if rec else None,
                "dmr_judged": rec["dmr_judged"] if rec else None,
                "cosine_min": {"image": rec["cosine_image_min"], "text": rec["cosine_text_min"]} if rec else None,
                "rank_flips": rec["rank_flips"] if rec else None,
            }
        )
    lead = "image" if "image" in towers else "text"
    unit = "images/s" if lead == "image" else "captions/s"
    cands = [r for r in rows if r["verdict"] == "PASS" and r["items_per_s"][lead]]
    fastest = max(cands, key=lambda r: r["items_per_s"][lead]) if cands else None
    if fastest:
        sp = fastest["speedup_eager"][lead]
        line = (
            f"fastest engine that passes: {fastest['engine']} — {fastest['items_per_s'][lead]:,.1f} {unit} at batch "
            f"{big}" + (f" ({sp:.2f}x fp32 eager)" if sp else "")
        )
    elif doc["recall"] is None:
        unchecked = [r for r in rows if r["items_per_s"][lead]]
        top = max(unchecked, key=lambda r: r["items_per_s"][lead]) if unchecked else None
        line = "no parity check ran (--no-recall), so no engine passes" + (
            f"; fastest engine (unchecked): {top['engine']} — {top['items_per_s'][lead]:,.1f} {unit}" if top else ""
        )
    else:
        line = "no engine passes its tolerance"
    notes = []
    if eager is None:
        notes.append("speed-up against fp32 eager: torch/fp32 was not run")
    comp = sorted({q for b, q in ran if b == "torch-compile"})
    if not comp:
        notes.append(
            "speed-up against torch.compile: not run here"
            + (" (on CPU it compiles for minutes: add it with --backends ...,torch-compile)"
               if doc["environment"]["device"] == "cpu" else "")
        )
    else:
        other = [r["engine"] for r in rows if r["speedup_compile"]["against"]
                 and r["speedup_compile"]["against"] != _name("torch-compile", r["precision"])]
        if other:
            notes.append(f"torch.compile at the same precision was not run for {', '.join(other)}: their speed-up is "
                         "against the compiled precision named in the cell")
    return {
        "rows": rows,
        "largest_batch": big,
        "latency_batch": small,
        "lead_tower": lead,
        "fastest_passing": None
        if fastest is None
        else {"engine": fastest["engine"], "tower": lead, "batch": big, "items_per_s": fastest["items_per_s"][lead]},
        "fastest_line": line,
        "failing": [r["engine"] for r in rows if r["verdict"] == "FAIL"],
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------ environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, argv: list[str] | None = None) -> dict[str, Any]:
    versions = {
        name: _version(dist)
        for name, dist in (
            ("priorclip", "priorclip"),
            ("torch", "torch"),
            ("numpy", "numpy"),
            ("onnx", "onnx"),
            ("onnxruntime", "onnxruntime"),
            ("onnxruntime-gpu", "onnxruntime-gpu"),
            ("triton", "triton"),
            ("tensorrt", "tensorrt"),
            ("pillow", "pillow"),
        )
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    argv = sys.argv if argv is None else argv
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]]) if argv else "",
        "git_revision": git_revision(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "driver": _driver() if device.type == "cuda" else None,
    }


# ------------------------------------------------------------------------------------------------ tables


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _speedup_cell(s: dict, precision: str, towers: list[str]) -> str:
    if not s.get("against"):
        return "—"
    cell = " / ".join(f"{s[t]:.2f}x" if s.get(t) else "—" for t in ("image", "text") if t in towers)
    base_prec = s["against"].split("/", 1)[1]
    if s["against"].startswith("torch-compile") and base_prec != precision:
        cell += f" (vs {base_prec})"
    return cell


def summary_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The opening table: one row per engine that was built (or failed to build)."""
    sm = doc["summary"]
    towers = list(doc["config"]["towers"])
    both = len(towers) == 2
    tw = "img/txt" if both else ("img" if towers == ["image"] else "txt")
    b1 = sm.get("latency_batch", 1)
    head = ["engine", "precision"]
    if "image" in towers:
        head.append(f"img/s @{sm['largest_batch']}")
    if "text" in towers:
        head.append(f"txt/s @{sm['largest_batch']}")
    head += [f"vs fp32 eager ({tw})", f"vs torch.compile ({tw})", f"b{b1} latency ms ({tw})", "ΔmR",
             "cos min (img/txt)", "rank flips", "verdict"]
    # the runner records tf32 in the metadata of the engines the switch applies to: the label follows that record
    tf32 = {(e["backend"], e["precision"]) for e in doc["engines"] if (e.get("metadata") or {}).get("tf32")}
    rows = []
    from priorclip.benchmarks.recall import fmt_dmr, fmt_flips

    for r in sm["rows"]:
        prec = r["precision"] + ("+TF32" if (r["backend"], r["precision"]) in tf32 else "")
        cells = [r["backend"], prec]
        for t in towers:
            cells.append(_fmt(r["items_per_s"][t], 1))
        lat = " / ".join(_fmt(r["latency"][t], 2) for t in towers)
        cos = r["cosine_min"]
        dmr = "—" if r["dmr"] is None else fmt_dmr(r)
        cells += [
            _speedup_cell(r["speedup_eager"], r["precision"], towers),
            _speedup_cell(r["speedup_compile"], r["precision"], towers),
            lat if r["status"] == "ok" else "—",
            dmr,
            "—" if cos is None else f"{cos['image']:.6f} / {cos['text']:.6f}",
            "—" if r["dmr"] is None else fmt_flips(r["rank_flips"]),
            r["verdict"],
        ]
        rows.append(cells)
    return head, rows


def _summary_notes(doc: dict) -> list[str]:
    """Lines under the summary table: the fastest passing engine, why each FAIL failed, the parity set, notes."""
    sm = doc["summary"]
    out = [sm["fastest_line"]]
    for r in sm["rows"]:
        if r["verdict"] == "FAIL":
            out.append(f"FAIL {r['engine']}: {r['why'] or 'outside tolerance'}")
    rec = doc["recall"]
    if rec:
        out.append("parity set: " + _dataset_line(rec["dataset"]))
        if rec.get("dmr_note"):
            out.append(rec["dmr_note"])
    out += sm["notes"]
    return out


LATENCY_HEAD = ["engine", "tower", "batch", "tokens", "calls", "p50 ms", "p90 ms", "p99 ms", "mean ms", "CV",
                "others' CPU %"]
THROUGHPUT_HEAD = ["engine", "tower", "batch", "tokens", "items/s", "TFLOP/s", "% peak", "peak mem MiB"]


def latency_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    lab = labels(doc)
    rows = []
    for t in doc["timings"]:
        share = t.get("others_cpu_share")
        rows.append([
            _label(lab, t["backend"], t["precision"]),
            t["tower"],
            str(t["batch"]),
            _fmt(t["tokens"]),
            str(t["iters"]),
            _fmt(t["p50_ms"]),
            _fmt(t["p90_ms"]),
            _fmt(t["p99_ms"]),
            _fmt(t["mean_ms"]),
            f"{t['cv']:.2f}" + (" !" if t.get("unsteady") else ""),
            "—" if share is None else f"{100 * share:.0f}",
        ])
    return LATENCY_HEAD, rows


def throughput_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    lab = labels(doc)
    rows = [
        [
            _label(lab, t["backend"], t["precision"]),
            t["tower"],
            str(t["batch"]),
            _fmt(t["tokens"]),
            _fmt(t["items_per_s"], 1),
            _fmt(t["tflops"], 3),
            _fmt(None if t["frac_peak"] is None else 100 * t["frac_peak"], 1),
            _fmt(t["peak_mem_mib"], 0),
        ]
        for t in doc["timings"]
    ]
    return THROUGHPUT_HEAD, rows


def _md_table(head: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(head))]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def console_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def e2e_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    head = ["engine", "batch", "images", "workers", "JPEG→embedding img/s", "decode+transform only img/s"]
    lab = labels(doc)
    rows = [
        [
            _label(lab, e["backend"], e["precision"]),
            str(e["batch"]),
            str(e["n_images"]),
            str(e["workers"]),
            _fmt(e["images_per_s"], 1),
            _fmt(e["decode_only_images_per_s"], 1),
        ]
        for e in doc["e2e"]
    ]
    return head, rows


def engine_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    head = ["engine", "status", "verdict", "setup s", "notes"]
    lab = labels(doc)
    rows = []
    for e in doc["engines"]:
        meta = e.get("metadata") or {}
        notes = e["reason"] or ", ".join(
            f"{k}={v}"
            for k, v in meta.items()
            if k in ("compile_mode", "cuda_graphs", "provider", "fixed_text_length", "autocast", "format", "tf32")
        )
        rows.append([_label(lab, e["backend"], e["precision"]), e["status"], e.get("verdict") or "—",
                     _fmt(e["setup_s"], 1), notes])
    return head, rows


def load_lines(doc: dict) -> list[str]:
    """The machine's load during the run, in words."""
    ld = doc["load"]
    if not ld.get("measured"):
        return ["machine load: not measured (no /proc here)"]
    pct = lambda v: "—" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    out = [
        f"while timing ({ld['timed_points']} points, {ld.get('timed_seconds', 0):.0f} s): other processes used "
        f"{pct(ld['others_cpu_share'])} of the machine's CPU ({ld['cpu_count']} cores), this process "
        f"{pct(ld.get('ours_cpu_share'))}, steal {pct(ld['steal_share'])}",
        f"whole run ({ld.get('run_samples', 0)} samples every {ld.get('run_interval_s', 1):g} s): others "
        f"{pct(ld.get('run_others_cpu_share'))} on average, {pct(ld.get('run_others_cpu_share_max'))} at most; "
        f"1-min load average {_fmt(ld.get('loadavg1_mean'))} mean, {_fmt(ld.get('loadavg1_max'))} max",
    ]
    g = ld.get("gpu")
    if g is not None:
        procs = ", ".join(f"pid {p['pid']}" for p in g["other_processes"]) or "none seen"
        if g.get("foreign_pids"):
            procs += " (PIDs of another namespace: one is probably this process)"
        out.append(f"GPU ({g['samples']} nvidia-smi samples): utilisation {_fmt(g['util_pct_mean'], 0)} % mean, "
                   f"{_fmt(g['util_pct_max'], 0)} % max; other compute processes: {procs}")
    return out


def warning_lines(doc: dict) -> list[str]:
    rel = doc["reliability"]
    if rel["reliable"]:
        return []
    return ["WARNING: timings may be unreliable: " + w for w in rel["warnings"]]


def render_console(doc: dict) -> str:
    env = doc["environment"]
    parts = [
        f"priorclip-bench  {doc['config']['model']}  on {env['device_name']} ({env['device']})  "
        f"{env['date_utc']}\n\n"
        + console_table(*summary_rows(doc))
        + "\n"
        + "\n".join(_summary_notes(doc))
    ]
    warn = warning_lines(doc)
    if warn:
        parts.append("\n".join(warn))
    parts.append(console_table(*engine_rows(doc)))
    if doc["timings"]:
        parts.append("request latency (synchronised calls)\n" + console_table(*latency_rows(doc)))
        parts.append("pipelined throughput (back-to-back calls)\n" + console_table(*throughput_rows(doc)))
    if doc["e2e"]:
        parts.append(console_table(*e2e_rows(doc)))
    if doc["recall"]:
        from priorclip.benchmarks.recall import recall_table

        parts.append("recall check on " + _dataset_line(doc["recall"]["dataset"]))
        parts.append(recall_table(doc["recall"]["reference"], doc["recall"]["engines"], labels(doc)))
    parts.append("machine load: " + "; ".join(load_lines(doc)) + ("" if warn else " — timings look undisturbed"))
    parts.append(
        "peak " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in doc["peak_tflops"].items())
    )
    return "\n\n".join(parts)


def _dataset_line(d: dict) -> str:
    line = f"{d.get('name', '?')}: {d.get('coverage') or str(d.get('n_images', '?')) + ' images'}, " \
           f"{d.get('n_captions', '?')} captions"
    if d.get("generated"):
        line += (" — GENERATED scenes, not real data (" + d.get("chosen_by", "") + "): parity on it shows the "
                 "engine computes the same function, not how it ranks real images")
    elif d.get("split"):
        line += f" (split {d['split']}; {d.get('chosen_by', '')})"
    return line


def render_markdown(doc: dict, plot_name: str | None = None) -> str:
    env, cfg = doc["environment"], doc["config"]
    v = env["versions"]
    lines = [
        f"# priorclip-bench: {cfg['model']} on {env['device_name']}",
        "",
        _md_table(*summary_rows(doc), right_from=2),
    ]
    lines += [f"- {n}" for n in _summary_notes(doc)]
    warn = warning_lines(doc)
    if warn:
        lines += ["", "> **WARNING — timings may be unreliable.**"]
        lines += [f"> - {w.removeprefix('WARNING: timings may be unreliable: ')}" for w in warn]
    lines += [
        "",
        "Speed-ups are pipelined throughput at the largest batch against torch/fp32 (eager) and against "
        "torch-compile at the same precision where it ran; latency is the p50 request latency at the smallest "
        "batch; ΔmR in percentage points; rank flips = images whose belief order differs from the reference's; "
        "verdict against the precision's tolerance (`priorclip/parity.py`).",
        "",
        "## Run",
        "",
        f"- date (UTC): {env['date_utc']}; git revision: {env['git_revision'] or 'unknown'}",
        f"- command: `{env['command']}`",
        f"- device: {env['device']} — {env['device_name']}; CPU: {env.get('cpu')} ({env.get('cpu_count')} cores, "
        f"{env['cpu_threads']} torch threads); CUDA {env['cuda'] or '—'}; driver {env['driver'] or '—'}"
        + ("" if cfg.get("tf32") is None else f"; TF32 in fp32 engines: {'on' if cfg['tf32'] else 'off'}"),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- weights: {cfg['weights']}; batch sizes {cfg['batch_sizes']}; {cfg['warmup']} warm-up + {cfg['iters']} timed "
        f"calls per point; text inputs "
        + ("real captions drawn from the recall set (the tokens column: the batch's longest, averaged; " if
           cfg.get("real_captions") else f"{cfg['text_length']} tokens (")
        + (f"engines with a fixed text length run {doc['model']['context_length']})"
           if doc["model"].get("family", "priorclip") == "priorclip" else
           "PIR attends to its [PAD] tokens: every engine runs its ids as given, padded to the batch's longest)"),
        "- measured peak (dense matrix product): "
        + ", ".join(f"{k} {val:.2f} TFLOP/s" for k, val in doc["peak_tflops"].items()),
        f"- model: {doc['model']['params_total'] / 1e6:.2f} M parameters; {doc['model']['gflop_image']:.3f} GFLOP per image, "
        f"{doc['model']['gflop_text']:.3f} GFLOP per {doc['model']['context_length']}-token caption",
    ]
    if doc["recall"]:
        lines.append("- recall / parity set: " + _dataset_line(doc["recall"]["dataset"]))
    if doc.get("calibration"):
        c = doc["calibration"]
        lines.append(f"- Calibration set (int8, fp8): {c['name']} (split {c.get('split')}): {c['coverage']}, "
                     f"{c.get('n_captions', '?')} captions" + (" — GENERATED" if c["generated"] else ""))
    if cfg.get("note"):
        lines.append(f"- note: {cfg['note']}")
    lines += ["", "## Machine load during the run", ""]
    lines += [f"- {x}" for x in load_lines(doc)]
    th = doc["reliability"]["thresholds"]
    lines += [
        f"- warned when others take more than {100 * th['others_cpu_share']:.0f} % of the CPU or steal more than "
        f"{100 * th['steal_share']:.0f} % while timing, when another process uses the GPU, or when a point's "
        f"latencies spread (CV > {th['cv']} or p90/p50 > {th['p90_p50']}): "
        + ("**timings unreliable** (see the warning above)" if warn else "none of these happened"),
        "",
    ]
    lines += ["## Engines", "", _md_table(*engine_rows(doc), right_from=99)]
    if doc["timings"]:
        lines += [
            "## Request latency",
            "",
            "Each call synchronised (on GPU `torch.cuda.synchronize` after it) and timed with the host clock around "
            "it, after warm-up, inputs rotated over a pool of distinct device batches; p90 from 10 calls on, p99 from "
            "100 (else —). CV = std/mean (! = spread above the threshold); others' CPU % = other processes' share of "
            "the machine's CPU while the point ran.",
            "",
            _md_table(*latency_rows(doc)),
            "## Pipelined throughput",
            "",
            "Back-to-back calls with one synchronisation at the end (on CPU, where calls are synchronous, the latency "
            "calls themselves). TFLOP/s = the eager model's FLOPs per item (FlopCounterMode, at the text "
            "length the engine runs) x items/s, so an engine that skips work (pruning) can exceed the matrix "
            "peak; % peak is against the "
            "matrix-product peak measured in this run (on GPU the fp16/bf16 tensor-core peak for every row, on "
            "CPU the fp32 peak).",
            "",
            _md_table(*throughput_rows(doc)),
        ]
    if plot_name:
        lines += [f"![throughput vs batch]({plot_name})", ""]
    if doc["e2e"]:
        lines += [
            "## End to end: JPEG bytes → embeddings",
            "",
            "Threaded decode + eval transform (PIL) overlapped with batched encoding, embeddings copied back "
            "to the host: what a service pays per image.",
            "",
            _md_table(*e2e_rows(doc)),
        ]
    if doc["recall"]:
        from priorclip.benchmarks.recall import recall_table

        rec = doc["recall"]
        tol = ", ".join(
            f"{p} cos ≥ {t['cosine_min']}, |ΔmR| ≤ "
            + (f"{t['dmr_max']}" if t["dmr_judged"] else f"not judged below {t['dmr_min_images']} images")
            for p, t in rec["tolerances"].items()
        )
        lines += [
            "## Recall check",
            "",
            f"Set: {_dataset_line(rec['dataset'])}. Reference: eager PyTorch fp32, TF32 off. ΔmR in percentage "
            f"points; FAIL = outside the precision's tolerance on this set ({tol}).",
            "",
        ]
        if rec.get("dmr_note"):
            lines += [rec["dmr_note"], ""]
        lines.append(recall_table(rec["reference"], rec["engines"], labels(doc)))
    if doc["reference_points"] and doc["environment"]["device"].startswith("cuda"):
        ours = {(t["backend"], t["precision"], t["tower"], t["batch"]): t for t in doc["timings"]}
        lab = labels(doc)
        rows = []
        for r in doc["reference_points"]:
            key = tuple(r["ours"])
            mine = ours.get(key)
            rows.append(
                [
                    r["what"],
                    f"{r['items_per_s']:,}",
                    f"{_label(lab, key[0], key[1])} {key[2]} b{key[3]}",
                    _fmt(mine["items_per_s"], 0) if mine else "not run",
                    f"{mine['items_per_s'] / r['items_per_s']:.2f}x" if mine else "—",
                ]
            )
        lines += [
            "## Beside the reference points",
            "",
            "Stock-module stand-ins of the same towers (timm ViT-B/32 + torchvision ResNet-50; a 77-token CLIP "
            "text transformer), measured on the same kind of H100 at batch 256 (issue 5), beside this run.",
            "",
            _md_table(["stand-in", "items/s", "ours", "our items/s", "ratio"], rows),
        ]
    return "\n".join(lines) + "\n"


def plot_series(doc: dict, tower: str) -> dict[str, list[tuple[int, float]]]:
    """Legend label (failing engines marked "[FAIL]") -> [(batch, pipelined items/s)] of one tower."""
    series: dict[str, list[tuple[int, float]]] = {}
    lab = labels(doc)
    for t in doc["timings"]:
        if t["tower"] == tower:
            series.setdefault(_label(lab, t["backend"], t["precision"]), []).append((t["batch"], t["items_per_s"]))
    return {k: sorted(v) for k, v in series.items()}


def render_plot(doc: dict, path: Path) -> Path | None:
    """Throughput vs batch per engine, image and text panels (log-log). None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, tower, unit in ((axes[0], "image", "images/s"), (axes[1], "text", "captions/s")):
        series = plot_series(doc, tower)
        for name, pts in sorted(series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle="--" if name.endswith("[FAIL]") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({t["batch"] for t in doc["timings"]})
        if batches:
            ax.set_xticks(batches, [str(b) for b in batches])
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
        lo, hi = ax.get_ylim()
        small_range = lo > 0 and hi / lo < 20  # under ~1 decade: label the minor ticks too, or the axis has none
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: (f"{v:,.0f}" if v >= 10 else f"{v:g}") if small_range else "")
        )
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit + " (pipelined)")
        ax.set_title(f"{tower} encoder")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    env = doc["environment"]
    fig.suptitle(f"{doc['config']['model']} on {env['device_name']} ({env['date_utc'][:10]})", fontsize=10)
    fig.tight_layout()
    from priorclip.cliutils import atomic_write

    try:
        with atomic_write(path) as tmp:  # the report is rewritten during the run: never a half-written PNG
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
