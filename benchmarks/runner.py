"""One benchmark run: build the engines, time them, run the end-to-end rate and the recall check, assemble the report.

:func:`run_bench` returns the report dictionary (schema in :mod:`priorclip.benchmarks.report`); the CLI writes it.
A backend that cannot run here, or fails to build, becomes an ``unavailable`` / ``failed`` engine row with its reason,
and the run goes on with the others.
"""

from __future__ import annotations

import gc
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from priorclip.benchmarks import harness
from priorclip.benchmarks import recall as recall_mod
from priorclip.benchmarks.report import H100_REFERENCE_POINTS, SCHEMA, environment
from priorclip.errors import PriorCLIPError
from priorclip.serve.engines import (
    BACKENDS,
    PRECISIONS,
    Engine,
    available_backends,
    create_engine,
    supported_precisions,
)

# On CPU the compiling backends (torch-compile, aoti) spend minutes compiling the default model: opt in with --backends.
DEFAULT_BACKENDS = {"cpu": ("torch", "onnxruntime"), "cuda": None}  # None: every backend available
DEFAULT_BATCHES = {"cpu": (1, 8), "cuda": (1, 8, 64, 256)}
DEFAULT_PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp32", "fp16", "bf16")}
DEFAULT_ITERS = {"cpu": (2, 10), "cuda": (10, 50)}  # (warm-up, timed)
DEFAULT_RECALL_IMAGES = {"cpu": 32, "cuda": 256}


@dataclass
class BenchOptions:
    model_name: str | None = None
    checkpoint: Path | None = None
    gate: str | None = None
    device: str = "auto"
    engines: list[tuple[str, str]] | None = None  # explicit (backend, precision) pairs; overrides the two below
    backends: list[str] | None = None
    precisions: list[str] | None = None
    batch_sizes: list[int] | None = None
    warmup: int | None = None
    iters: int | None = None
    text_length: int | None = None  # tokens incl. SOT/EOT; default: the full context
    towers: tuple[str, ...] = ("image", "text")
    recall: bool = True
    dataset: Path | None = None
    images: Path | None = None
    split: str = "test"
    recall_images: int | None = None
    e2e: bool = True
    e2e_images: int | None = None
    workers: int | None = None
    compile_mode: str = "default"
    compile_dynamic: bool = False
    calib_images: int = 64
    workdir: Path | None = None
    quick_peak: bool = False
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_engines(spec: str) -> list[tuple[str, str]]:
    """'torch:fp32,torch-compile:fp16,onnxruntime' -> [(backend, precision)], precision default fp32."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        backend, _, precision = item.partition(":")
        precision = precision or "fp32"
        if backend not in BACKENDS:
            raise PriorCLIPError(f"unknown backend {backend!r} in --engines; known backends: {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise PriorCLIPError(f"unknown precision {precision!r} in --engines; known: {', '.join(PRECISIONS)}")
        out.append((backend, precision))
    if not out:
        raise PriorCLIPError("--engines is empty")
    return out


def plan_engines(opts: BenchOptions, device: torch.device) -> tuple[list[tuple[str, str]], list[dict]]:
    """The (backend, precision) pairs to run, and engine rows for those that cannot run here."""
    avail = available_backends(device)
    skipped: list[dict] = []
    if opts.engines:
        pairs = list(opts.engines)
    else:
        for b in opts.backends or []:
            if b not in BACKENDS:
                raise PriorCLIPError(f"unknown backend {b!r}; known backends: {', '.join(BACKENDS)}")
        for p in opts.precisions or []:
            if p not in PRECISIONS:
                raise PriorCLIPError(f"unknown precision {p!r}; known: {', '.join(PRECISIONS)}")
        backends = opts.backends or list(DEFAULT_BACKENDS.get(device.type) or BACKENDS)
        if not opts.backends:
            for b in BACKENDS:
                if b not in backends and avail.get(b) is None:
                    skipped.append(
                        _engine_row(
                            b,
                            "-",
                            "skipped",
                            f"not in the {device.type} default set (it compiles "
                            "for minutes here); ask for it with --backends",
                        )
                    )
        precisions = opts.precisions or list(DEFAULT_PRECISIONS[device.type])
        pairs = []
        for b in backends:
            supported = supported_precisions(b, device)
            for p in precisions:
                if p in supported:
                    pairs.append((b, p))
                elif opts.precisions:  # asked for explicitly: say why it is not run
                    skipped.append(_engine_row(b, p, "unsupported", f"{b} does not run {p} on {device.type}"))
            if not supported:
                skipped.append(_engine_row(b, "-", "unavailable", avail.get(b) or f"{b} does not run on {device.type}"))
    runnable = []
    for b, p in pairs:
        if avail.get(b) is not None:
            if not any(r["backend"] == b and r["status"] == "unavailable" for r in skipped):
                skipped.append(_engine_row(b, p if opts.engines else "-", "unavailable", avail[b]))
        elif opts.engines and p not in supported_precisions(b, device):
            skipped.append(_engine_row(b, p, "unsupported", f"{b} does not run {p} on {device.type}"))
        else:
            runnable.append((b, p))
    return runnable, skipped


def _engine_row(
    backend: str,
    precision: str,
    status: str,
    reason: str | None,
    setup_s: float | None = None,
    metadata: dict | None = None,
) -> dict:
    return {
        "backend": backend,
        "precision": precision,
        "status": status,
        "reason": reason,
        "setup_s": setup_s,
        "metadata": metadata,
    }


def _dataset(opts: BenchOptions, image_size: int, context_length: int, tmp: Path, workers: int, n_default: int):
    from priorclip.data import load_karpathy

    if opts.dataset is not None:
        json_path = Path(opts.dataset)
        if json_path.is_dir():  # a dataset folder such as ../shared/data/aid-rsicd
            found = sorted(json_path.glob("*.json"))
            if len(found) != 1:
                raise PriorCLIPError(
                    f"--dataset {json_path}: expected one Karpathy JSON in the folder, found {len(found)}"
                )
            images = opts.images or json_path / "images"
            json_path = found[0]
        else:
            images = opts.images or json_path.parent / "images"
        ds = load_karpathy(json_path, images, split=opts.split)
        n = opts.recall_images
        if n is not None and n < len(ds.images):
            ds = ds.subset(n)
        desc = {"name": json_path.name, "path": str(json_path), "split": opts.split, "generated": False}
    else:
        from priorclip.synthetic import make_sample

        n = opts.recall_images or n_default
        json_path, img_dir = make_sample(tmp / "recall-set", n_images=n, seed=0)
        ds = load_karpathy(json_path, img_dir)
        desc = {
            "name": "generated (priorclip.synthetic.make_sample, seed 0)",
            "path": None,
            "split": "test",
            "generated": True,
        }
    return recall_mod.prepare(ds, image_size, context_length, desc, workers)


def _calibration_set(opts: BenchOptions, tmp: Path):
    """INT8 calibration data: the dataset's train split when --dataset is given, else a generated set (seed 1) that
    shares no image with the generated recall set (seed 0). Never the evaluated split itself."""
    from priorclip.data import load_karpathy
    from priorclip.synthetic import make_sample

    n = opts.calib_images
    if opts.dataset is not None:
        json_path = Path(opts.dataset)
        images = opts.images
        if json_path.is_dir():
            images = images or json_path / "images"
            json_path = sorted(json_path.glob("*.json"))[0]
        try:
            return load_karpathy(json_path, images or json_path.parent / "images", split="train").subset(n)
        except PriorCLIPError:
            pass  # no train split: fall back to generated data
    json_path, img_dir = make_sample(tmp / "calib-set", n_images=n, seed=1)
    return load_karpathy(json_path, img_dir)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_bench(
    opts: BenchOptions,
    argv: list[str] | None = None,
    log: Callable[[str], None] = print,
    engine_factory: Callable[..., Engine] = create_engine,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run the whole benchmark and return the report dictionary."""
    from priorclip.cliutils import build_model, resolve_device
    from priorclip.profile import profile_config

    device = torch.device(resolve_device(opts.device))
    dev = device.type
    batch_sizes = sorted(set(opts.batch_sizes or DEFAULT_BATCHES[dev]))
    if not batch_sizes or min(batch_sizes) < 1:
        raise PriorCLIPError(f"batch sizes must be positive integers, got {batch_sizes}")
    warmup = DEFAULT_ITERS[dev][0] if opts.warmup is None else opts.warmup
    iters = DEFAULT_ITERS[dev][1] if opts.iters is None else opts.iters
    if iters < 1 or warmup < 0:
        raise PriorCLIPError(f"--iters must be >= 1 and --warmup >= 0 (got {iters}, {warmup})")
    workers = opts.workers or harness.default_workers()
    pairs, engine_rows = plan_engines(opts, device)

    model = build_model(opts.model_name, opts.checkpoint, opts.gate)
    cfg = model.cfg
    ctx = cfg.text.context_length
    text_length = opts.text_length or ctx
    if not 2 <= text_length <= ctx:
        raise PriorCLIPError(f"--text-length must be between 2 and {ctx}, got {text_length}")
    prof = profile_config(cfg)
    log(f"priorclip-bench: {cfg.name} on {device}; engines: {', '.join(f'{b}/{p}' for b, p in pairs) or 'none'}")

    tmp_ctx = tempfile.TemporaryDirectory(prefix="priorclip-bench-")
    tmp = Path(tmp_ctx.name)
    workdir = Path(opts.workdir) if opts.workdir else tmp / "engines"
    try:
        log("measuring the matrix-product peak ...")
        peaks = harness.measure_peak_tflops(device, quick=opts.quick_peak)

        data = ref = ref_metrics = None
        recall_batch = min(max(batch_sizes), 256)
        if opts.recall:
            log("preparing the recall set and the fp32 reference embeddings ...")
            data = _dataset(opts, cfg.vision.image_size, ctx, tmp, workers, DEFAULT_RECALL_IMAGES[dev])
            from priorclip.retrieval import recall_metrics

            ref = recall_mod.reference_embeddings(model, device, data, recall_batch)
            ref_metrics = recall_metrics(*ref, data.caption_image)

        jpegs = decode_only = None
        e2e_batch = max(batch_sizes)
        if opts.e2e:
            n = opts.e2e_images or (max(4 * e2e_batch, 512) if dev == "cuda" else 4 * e2e_batch)
            jpegs = harness.make_jpegs(n)
            decode_only = harness.decode_rate(jpegs, cfg.vision.image_size, workers)

        timings, e2e_rows, recall_rows = [], [], []

        def assemble() -> dict:
            return _report(
                opts,
                argv,
                device,
                cfg,
                prof,
                batch_sizes,
                warmup,
                iters,
                text_length,
                workers,
                recall_batch,
                peaks,
                engine_rows,
                timings,
                e2e_rows,
                data,
                ref_metrics,
                recall_rows,
            )

        for backend, precision in pairs:
            name = f"{backend}/{precision}"
            log(f"[{name}] building ...")
            free_before = torch.cuda.mem_get_info(device)[0] if dev == "cuda" else None
            t0 = time.perf_counter()
            try:
                options: dict[str, Any] = {}
                if backend == "torch-compile":
                    options = {
                        "compile_mode": opts.compile_mode,
                        "dynamic": opts.compile_dynamic,
                        "batch_buckets": None if opts.compile_dynamic else tuple(batch_sizes) + (recall_batch,),
                    }
                elif backend in ("onnxruntime", "aoti", "tensorrt"):
                    options = {"max_batch": max(256, max(batch_sizes))}
                    if precision == "int8":
                        options["calib"] = _calibration_set(opts, tmp)
                engine = engine_factory(backend, model, precision, device, workdir=workdir, **options)
            except Exception as e:  # noqa: BLE001 - one broken backend must not end the run
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:400]
                log(f"[{name}] failed to build: {reason}")
                engine_rows.append(_engine_row(backend, precision, "failed", reason, time.perf_counter() - t0))
                _free(device)
                continue
            try:
                build_s = time.perf_counter() - t0
                first_calls_s = harness.prime(engine, cfg, batch_sizes, text_length, opts.towers)
                setup = time.perf_counter() - t0
                engine.info.update({"build_s": round(build_s, 3), "first_calls_s": round(first_calls_s, 3)})
                log(f"[{name}] built in {build_s:.1f} s; first call per batch size (compilation) {first_calls_s:.1f} s")

                def show(r: harness.TimingRow) -> None:
                    log(
                        f"[{name}] {r.tower:<5} batch {r.batch:>4}: p50 {r.p50_ms:9.2f} ms  {r.items_per_s:10.1f} items/s"
                    )

                timings += [
                    r.to_dict()
                    for r in harness.bench_engine(
                        engine,
                        cfg,
                        batch_sizes,
                        warmup,
                        iters,
                        text_length,
                        peaks,
                        opts.towers,
                        on_row=show,
                        free_before_build=free_before,
                    )
                ]
                if jpegs is not None:
                    rate = harness.e2e_rate(engine, jpegs, e2e_batch, workers)
                    e2e_rows.append(
                        {"backend": backend, "precision": precision, **rate, "decode_only_images_per_s": decode_only}
                    )
                    log(f"[{name}] JPEG -> embedding: {rate['images_per_s']:.1f} images/s")
                if data is not None:
                    got = recall_mod.embed(engine, data, recall_batch)
                    row = recall_mod.compare(name, precision, ref, got, data.caption_image, ref_metrics)
                    recall_rows.append(row)
                    log(
                        f"[{name}] recall: mR {row['metrics']['mR']:.2f} (Δ {row['delta']['mR']:+.2f}), min cosine "
                        f"{min(row['cosine_image_min'], row['cosine_text_min']):.6f}: "
                        + ("ok" if row["within_tolerance"] else "FAIL " + "; ".join(row["failures"]))
                    )
                engine_rows.append(_engine_row(backend, precision, "ok", None, setup, engine.metadata()))
            except Exception as e:  # noqa: BLE001
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:400]
                setup = time.perf_counter() - t0
                log(f"[{name}] failed while running: {reason}")
                if opts.extra.get("raise"):
                    raise
                log(traceback.format_exc(limit=3))
                engine_rows.append(_engine_row(backend, precision, "failed", reason, setup, engine.metadata()))
            finally:
                del engine
                _free(device)
            if checkpoint is not None:  # the report so far, so a run cut short still leaves its finished engines
                checkpoint(assemble())
        doc = assemble()
    finally:
        tmp_ctx.cleanup()
    return doc


def _report(
    opts,
    argv,
    device,
    cfg,
    prof,
    batch_sizes,
    warmup,
    iters,
    text_length,
    workers,
    recall_batch,
    peaks,
    engine_rows,
    timings,
    e2e_rows,
    data,
    ref_metrics,
    recall_rows,
) -> dict:

    weights = (
        str(opts.checkpoint)
        if opts.checkpoint
        else "random (no checkpoint): speed does not depend on the weights; recall values mean nothing, their parity does"
    )
    doc = {
        "schema": SCHEMA,
        "environment": environment(device, argv),
        "config": {
            "model": cfg.name,
            "weights": weights,
            "device": str(device),
            "batch_sizes": batch_sizes,
            "warmup": warmup,
            "iters": iters,
            "text_length": text_length,
            "towers": list(opts.towers),
            "compile_mode": opts.compile_mode,
            "compile_dynamic": opts.compile_dynamic,
            "workers": workers,
            "recall_batch": recall_batch if opts.recall else None,
            "note": opts.note,
        },
        "model": {
            "name": cfg.name,
            "context_length": cfg.text.context_length,
            "image_size": cfg.vision.image_size,
            "embed_dim": cfg.embed_dim,
            **prof,
        },
        "peak_tflops": peaks,
        "engines": list(engine_rows),
        "timings": list(timings),
        "e2e": list(e2e_rows),
        "recall": None
        if data is None
        else {
            "dataset": data.description,
            "reference": ref_metrics,
            "engines": list(recall_rows),
            "tolerances": {
                p: {"cosine_min": t.min_cosine, "dmr_max": recall_mod.dmr_allowance(p, len(data.pixels))}
                for p, t in recall_mod.TOLERANCES.items()
            },
        },
        "reference_points": H100_REFERENCE_POINTS,
    }
    return doc
