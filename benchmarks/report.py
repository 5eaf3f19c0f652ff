"""Benchmark reports: the environment record, JSON (machine), Markdown and console tables (human), a PNG plot.

The JSON schema (``SCHEMA`` = "priorclip-bench/1") is checked by :func:`validate_report`, which the tests use.
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

SCHEMA = "priorclip-bench/1"

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
TOP_KEYS = {
    "schema": str,
    "environment": dict,
    "config": dict,
    "model": dict,
    "peak_tflops": dict,
    "engines": list,
    "timings": list,
    "e2e": list,
    "recall": (dict, type(None)),
    "reference_points": list,
}
ENV_KEYS = {
    "date_utc": str,
    "command": str,
    "git_revision": (str, type(None)),
    "host": str,
    "platform": str,
    "python": str,
    "device": str,
    "device_name": str,
    "cpu_threads": int,
    "versions": dict,
    "cuda": (str, type(None)),
    "driver": (str, type(None)),
}
ENGINE_KEYS = {
    "backend": str,
    "precision": str,
    "status": str,
    "reason": (str, type(None)),
    "setup_s": _OPT_NUM,
    "metadata": (dict, type(None)),
}
TIMING_KEYS = {
    "backend": str,
    "precision": str,
    "tower": str,
    "batch": int,
    "tokens": (int, type(None)),
    "iters": int,
    "p50_ms": _NUM,
    "p90_ms": _NUM,
    "p99_ms": _NUM,
    "mean_ms": _NUM,
    "items_per_s": _NUM,
    "gflop_per_item": _NUM,
    "tflops": _NUM,
    "frac_peak": _OPT_NUM,
    "peak_mem_mib": _OPT_NUM,
    "mem_kind": str,
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
RECALL_KEYS = {"dataset": dict, "reference": dict, "engines": list, "tolerances": dict}
RECALL_ROW_KEYS = {
    "engine": str,
    "precision": str,
    "metrics": dict,
    "delta": dict,
    "cosine_image_min": _NUM,
    "cosine_image_mean": _NUM,
    "cosine_text_min": _NUM,
    "cosine_text_mean": _NUM,
    "top10_agreement_i2t": _NUM,
    "top10_agreement_t2i": _NUM,
    "finite": bool,
    "tolerance": dict,
    "failures": list,
    "within_tolerance": bool,
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
    for i, e in enumerate(doc["engines"]):
        errs += _check(e, ENGINE_KEYS, f"engines[{i}]")
    for i, t in enumerate(doc["timings"]):
        errs += _check(t, TIMING_KEYS, f"timings[{i}]")
    for i, t in enumerate(doc["e2e"]):
        errs += _check(t, E2E_KEYS, f"e2e[{i}]")
    if doc["recall"] is not None:
        errs += _check(doc["recall"], RECALL_KEYS, "recall")
        for i, r in enumerate(doc["recall"].get("engines", [])):
            errs += _check(r, RECALL_ROW_KEYS, f"recall.engines[{i}]")
    return errs


# ------------------------------------------------------------------------------------------------ environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision(repo: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` (+dirty) of the source tree, else ``$PRIORCLIP_GIT_REVISION`` (for copies without .git)."""
    repo = repo or Path(__file__).resolve().parents[1]
    env = os.environ.get("PRIORCLIP_GIT_REVISION") or None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return env
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return env


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


TIMING_COLUMNS = [
    ("engine", None),
    ("tower", None),
    ("batch", None),
    ("tokens", None),
    ("p50 ms", "p50_ms"),
    ("p90 ms", "p90_ms"),
    ("p99 ms", "p99_ms"),
    ("items/s", "items_per_s"),
    ("TFLOP/s", "tflops"),
    ("% peak", "frac_peak"),
    ("peak mem MiB", "peak_mem_mib"),
]


def _timing_cells(t: dict) -> list[str]:
    return [
        f"{t['backend']}/{t['precision']}",
        t["tower"],
        str(t["batch"]),
        _fmt(t["tokens"]),
        _fmt(t["p50_ms"]),
        _fmt(t["p90_ms"]),
        _fmt(t["p99_ms"]),
        _fmt(t["items_per_s"], 1),
        _fmt(t["tflops"], 3),
        _fmt(None if t["frac_peak"] is None else 100 * t["frac_peak"], 1),
        _fmt(t["peak_mem_mib"], 0),
    ]


def _md_table(head: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(head))]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def console_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def timing_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    return [c for c, _ in TIMING_COLUMNS], [_timing_cells(t) for t in doc["timings"]]


def e2e_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    head = ["engine", "batch", "images", "workers", "JPEG→embedding img/s", "decode+transform only img/s"]
    rows = [
        [
            f"{e['backend']}/{e['precision']}",
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
    head = ["engine", "status", "setup s", "notes"]
    rows = []
    for e in doc["engines"]:
        meta = e.get("metadata") or {}
        notes = e["reason"] or ", ".join(
            f"{k}={v}"
            for k, v in meta.items()
            if k in ("compile_mode", "cuda_graphs", "provider", "fixed_text_length", "autocast", "format")
        )
        rows.append([f"{e['backend']}/{e['precision']}", e["status"], _fmt(e["setup_s"], 1), notes])
    return head, rows


def render_console(doc: dict) -> str:
    parts = [
        f"priorclip-bench  {doc['config']['model']}  on {doc['environment']['device_name']} "
        f"({doc['environment']['device']})  peak "
        + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in doc["peak_tflops"].items())
    ]
    parts.append(console_table(*engine_rows(doc)))
    if doc["timings"]:
        parts.append(console_table(*timing_rows(doc)))
    if doc["e2e"]:
        parts.append(console_table(*e2e_rows(doc)))
    if doc["recall"]:
        from priorclip.benchmarks.recall import recall_table

        parts.append("recall check on " + _dataset_line(doc["recall"]["dataset"]))
        parts.append(recall_table(doc["recall"]["reference"], doc["recall"]["engines"]))
    return "\n\n".join(parts)


def _dataset_line(d: dict) -> str:
    return f"{d.get('name', '?')} ({d.get('n_images', '?')} images, {d.get('n_captions', '?')} captions)"


def render_markdown(doc: dict, plot_name: str | None = None) -> str:
    env, cfg = doc["environment"], doc["config"]
    v = env["versions"]
    lines = [
        f"# priorclip-bench: {cfg['model']} on {env['device_name']}",
        "",
        f"- date (UTC): {env['date_utc']}; git revision: {env['git_revision'] or 'unknown'}",
        f"- command: `{env['command']}`",
        f"- device: {env['device']} — {env['device_name']}; CPU: {env.get('cpu')} ({env.get('cpu_count')} cores, "
        f"{env['cpu_threads']} torch threads); CUDA {env['cuda'] or '—'}; driver {env['driver'] or '—'}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- weights: {cfg['weights']}; batch sizes {cfg['batch_sizes']}; {cfg['warmup']} warm-up + {cfg['iters']} timed "
        f"calls per point; text inputs {cfg['text_length']} tokens (engines with a fixed text length run "
        f"{doc['model']['context_length']})",
        "- measured peak (dense matrix product): "
        + ", ".join(f"{k} {val:.2f} TFLOP/s" for k, val in doc["peak_tflops"].items()),
        f"- model: {doc['model']['params_total'] / 1e6:.2f} M parameters; {doc['model']['gflop_image']:.3f} GFLOP per image, "
        f"{doc['model']['gflop_text']:.3f} GFLOP per {doc['model']['context_length']}-token caption",
    ]
    if cfg.get("note"):
        lines.append(f"- note: {cfg['note']}")
    lines += ["", "## Engines", "", _md_table(*engine_rows(doc), right_from=99)]
    if doc["timings"]:
        lines += [
            "## Latency and throughput",
            "",
            "Latency per call (device events on GPU, wall clock on CPU), after warm-up, inputs rotated over a "
            "pool of distinct batches. TFLOP/s = the eager model's FLOPs per item (FlopCounterMode, at the text "
            "length the engine runs) x items/s, so an engine that skips work (pruning) can exceed the matrix "
            "peak; % peak is against the "
            "matrix-product peak measured in this run (on GPU the fp16/bf16 tensor-core peak for every row, on "
            "CPU the fp32 peak).",
            "",
            _md_table(*timing_rows(doc)),
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
        from priorclip.benchmarks.recall import TOLERANCES, recall_table

        lines += [
            "## Recall check",
            "",
            f"Dataset: {_dataset_line(doc['recall']['dataset'])}. Reference: eager "
            "PyTorch fp32, TF32 off. ΔmR in percentage points; FAIL = outside the precision's tolerance "
            "(cosine floor "
            + ", ".join(f"{p} {t.min_cosine}" for p, t in TOLERANCES.items())
            + "; |ΔmR| allowance per row in the JSON).",
            "",
            recall_table(doc["recall"]["reference"], doc["recall"]["engines"]),
        ]
    if doc["reference_points"] and doc["environment"]["device"].startswith("cuda"):
        ours = {(t["backend"], t["precision"], t["tower"], t["batch"]): t for t in doc["timings"]}
        rows = []
        for r in doc["reference_points"]:
            key = tuple(r["ours"])
            mine = ours.get(key)
            rows.append(
                [
                    r["what"],
                    f"{r['items_per_s']:,}",
                    f"{key[0]}/{key[1]} {key[2]} b{key[3]}",
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
        series: dict[str, list[tuple[int, float]]] = {}
        for t in doc["timings"]:
            if t["tower"] == tower:
                series.setdefault(f"{t['backend']}/{t['precision']}", []).append((t["batch"], t["items_per_s"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
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
        ax.set_ylabel(unit)
        ax.set_title(f"{tower} encoder")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    env = doc["environment"]
    fig.suptitle(f"{doc['config']['model']} on {env['device_name']} ({env['date_utc'][:10]})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
