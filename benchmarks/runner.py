"""One benchmark run: build the engines, time them, run the end-to-end rate and the recall check, assemble the report.

:func:`run_bench` returns the report dictionary (schema in :mod:`priorclip.benchmarks.report`); the CLI writes it.
A backend that cannot run here, or fails to build, becomes an ``unavailable`` / ``failed`` engine row with its reason,
and the run goes on with the others. Engines built from exports get the recall set as their parity set (with the
reference embeddings already computed), so an export outside its tolerance fails to build instead of being timed.

Sets (all drawn class-spread, deterministic):

- recall set: ``--dataset``, else the real dataset when one is reachable (:func:`priorclip.data.default_dataset`),
  else a generated set, labelled as generated in every report. Size: the whole split on GPU; on CPU
  :data:`CPU_RECALL_IMAGES` images, the smallest set on which every precision's ΔmR is judged;
- INT8 calibration set: the dataset's train split (its val split when train is the evaluated one: never the
  evaluated split), else a generated set with another seed than the recall set's.
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
from priorclip.benchmarks.report import H100_REFERENCE_POINTS, SCHEMA, environment, finalize
from priorclip.config import FAMILY_PRIORCLIP
from priorclip.errors import PriorCLIPError
from priorclip.parity import JUDGED_SET_IMAGES
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
# (warm-up, timed): 100 timed calls on GPU so its p99 is printed; 10 on CPU give a p50 and p90 (no p99) and keep the
# default model's batch-8 point near 10 s.
DEFAULT_ITERS = {"cpu": (2, 10), "cuda": (10, 100)}
# Recall set on CPU: the smallest set on which every precision's ΔmR is judged (fp32/fp16: 334 images, 11-12 per
# class on AID/RSICD), which keeps the default CPU run to a few minutes; on GPU the whole split (1,027 test images).
CPU_RECALL_IMAGES = JUDGED_SET_IMAGES
DEFAULT_RECALL_IMAGES = {"cpu": CPU_RECALL_IMAGES, "cuda": 0}  # 0: the whole split
GENERATED_RECALL_IMAGES = {"cpu": CPU_RECALL_IMAGES, "cuda": 1024}
RECALL_SEED, CALIB_SEED = 0, 1
CALIBRATED = ("int8", "fp8")  # precisions whose engines are calibrated on --calib-images


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
    real_captions: bool = False  # time texts on the recall set's captions instead of text_length-token ones
    towers: tuple[str, ...] = ("image", "text")
    recall: bool = True
    dataset: Path | None = None
    images: Path | None = None
    split: str = "test"
    recall_images: int | None = None  # None: the device default; 0: the whole split
    generated_set: bool = False  # the generated set even when a real dataset is reachable
    e2e: bool = True
    e2e_images: int | None = None
    workers: int | None = None
    compile_mode: str = "default"
    compile_dynamic: bool = False
    calib_images: int = 64
    calib_captions: int = 256
    tf32: bool = False  # allow TF32 in fp32 engines on GPU (labelled in the report); off: plain fp32
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
                            f"not in the {device.type} default set ("
                            + ("its kernels run as plain-torch references off CUDA" if b == "fused"
                               else "it compiles for minutes here") + "); ask for it with --backends",
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


def recall_source(opts: BenchOptions) -> tuple[Path, Path, str] | None:
    """(dataset JSON, image folder, how it was chosen) of the real recall set, or None for the generated one."""
    from priorclip.data import default_dataset, resolve_dataset

    if opts.dataset is not None:
        json_path, images = resolve_dataset(opts.dataset, opts.images)
        return json_path, images, "--dataset"
    if opts.generated_set:
        return None
    found = default_dataset()
    if found is None:
        return None
    return found[0], found[1], "the default dataset (priorclip.data.default_dataset)"


def _dataset(opts: BenchOptions, source, cfg, tmp: Path, workers: int, dev: str):
    from priorclip.data import load_karpathy

    if source is not None:
        json_path, images, how = source
        ds = load_karpathy(json_path, images, split=opts.split)
        n = DEFAULT_RECALL_IMAGES[dev] if opts.recall_images is None else opts.recall_images
        if n and n < len(ds.images):
            ds = ds.subset(n, seed=RECALL_SEED)
        desc = {"name": json_path.name, "path": str(json_path), "split": opts.split, "generated": False,
                "chosen_by": how}
    else:
        from priorclip.synthetic import make_sample

        n = GENERATED_RECALL_IMAGES[dev] if not opts.recall_images else opts.recall_images
        json_path, img_dir = make_sample(tmp / "recall-set", n_images=n, seed=RECALL_SEED)
        ds = load_karpathy(json_path, img_dir)
        desc = {
            "name": f"GENERATED set (priorclip.synthetic.make_sample, seed {RECALL_SEED})",
            "path": None,
            "split": "test",
            "generated": True,
            "chosen_by": "--generated-set" if opts.generated_set else
            "fallback: no real dataset reachable (--dataset, $PRIORCLIP_DATASET or ../shared/data/aid-rsicd)",
        }
    return recall_mod.prepare(ds, cfg, desc, workers)  # the model's transform, tokenizer and caption batching


def _calibration_set(opts: BenchOptions, source, tmp: Path):
    """(calibration set, its description) for INT8: the dataset's train split (``val`` when the train split is the
    one evaluated), drawn class-spread, else a generated set (seed 1) that shares no image with the generated recall
    set (seed 0). Never the evaluated split itself."""
    from priorclip.data import has_split, load_karpathy
    from priorclip.export.api import CalibrationSet

    n_img, n_cap = opts.calib_images, opts.calib_captions
    if source is not None:
        json_path, images, _ = source
        split = "train" if opts.split != "train" else "val"
        if has_split(json_path, images, split):  # any other problem with the dataset is an error, not a silent fallback
            ds = load_karpathy(json_path, images, split=split)
            picked, caps, cover = ds.spread_draw(n_img, n_cap, CALIB_SEED)
            desc = {"name": json_path.name, "split": split, "generated": False, **cover}
            return CalibrationSet(picked, caps, f"{json_path.name} split {split}: {cover['coverage']}"), desc
    from priorclip.synthetic import make_sample

    json_path, img_dir = make_sample(tmp / "calib-set", n_images=n_img, seed=CALIB_SEED, split="train")
    picked, caps, cover = load_karpathy(json_path, img_dir, split="train").spread_draw(0, n_cap, CALIB_SEED)
    desc = {"name": f"GENERATED set (priorclip.synthetic.make_sample, seed {CALIB_SEED})", "split": "train",
            "generated": True, **cover}
    return CalibrationSet(picked, caps, f"generated (seed {CALIB_SEED}): {cover['coverage']}"), desc


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:400]


def run_bench(
    opts: BenchOptions,
    argv: list[str] | None = None,
    log: Callable[[str], None] = print,
    engine_factory: Callable[..., Engine] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    load_monitor: harness.LoadMonitor | None = None,
) -> dict:
    """Run the whole benchmark and return the report dictionary.

    ``engine_factory``: builds each engine (default :func:`priorclip.serve.engines.create_engine`);
    ``load_monitor``: where the machine's load is read (default: /proc, and nvidia-smi on GPU); tests inject both.
    """
    engine_factory = engine_factory or create_engine
    from priorclip.cliutils import build_model, resolve_device
    from priorclip.preprocess import preprocess_for
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
    model = build_model(opts.model_name, opts.checkpoint, opts.gate)
    cfg = model.cfg
    pairs, engine_rows = plan_engines(opts, device)
    # the real dataset serves the recall set and the INT8 calibration (its train split), whichever is needed
    source = recall_source(opts) if opts.recall or any(p in CALIBRATED for _, p in pairs) else None
    ctx = cfg.text.context_length
    text_length = opts.text_length or ctx
    if not 2 <= text_length <= ctx:
        raise PriorCLIPError(f"--text-length must be between 2 and {ctx}, got {text_length}")
    if opts.real_captions and (not opts.recall or opts.text_length):
        raise PriorCLIPError("--real-captions draws the timed captions from the recall set: it needs the recall check "
                             "(not --no-recall) and no --text-length")
    prof = profile_config(cfg)
    log(f"priorclip-bench: {cfg.name} on {device}; engines: {', '.join(f'{b}/{p}' for b, p in pairs) or 'none'}")

    if load_monitor is None:
        uuid = harness.gpu_uuid(device) if dev == "cuda" else None
        load_monitor = harness.LoadMonitor(gpu_reader=(lambda: harness.read_gpu(uuid)) if dev == "cuda" else None)
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tmp_ctx = None
    try:  # everything changed from here on is undone in `finally`, whatever fails first
        load_monitor.start()
        # fp32 engines are plain fp32 unless --tf32 (torch's cuDNN default would run the prior's convolutions in TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(opts.tf32)
        tmp_ctx = tempfile.TemporaryDirectory(prefix="priorclip-bench-")
        tmp = Path(tmp_ctx.name)
        workdir = Path(opts.workdir) if opts.workdir else tmp / "engines"
        log("measuring the matrix-product peak ...")
        peaks = harness.measure_peak_tflops(device, quick=opts.quick_peak)

        data = ref = ref_metrics = None
        recall_batch = min(max(batch_sizes), 256)
        if opts.recall:
            log("preparing the recall set and the fp32 reference embeddings ...")
            data = _dataset(opts, source, cfg, tmp, workers, dev)
            log(f"recall set: {data.description['name']}: {data.description['coverage']}")
            from priorclip.retrieval import recall_metrics

            ref = recall_mod.reference_embeddings(model, device, data, recall_batch)
            ref_metrics = recall_metrics(ref[0], ref[1], data.caption_image)

        jpegs = decode_only = None
        e2e_batch = max(batch_sizes)
        if opts.e2e:
            n = opts.e2e_images or (max(4 * e2e_batch, 512) if dev == "cuda" else 4 * e2e_batch)
            jpegs = harness.make_jpegs(n)
            decode_only = harness.decode_rate(jpegs, preprocess_for(cfg).transform, workers)

        timings, e2e_rows, recall_rows = [], [], []
        calib: list = []  # [(set, description)] once an int8 engine asked for it

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
                calib[0][1] if calib else None,
                load_monitor.summary(),
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
                elif backend == "fused":  # CUDA graphs captured at exactly the sizes timed (and the recall batch)
                    options = {"batch_buckets": tuple(sorted({*batch_sizes, recall_batch}))}
                elif backend in ("onnxruntime", "aoti", "tensorrt"):
                    options = {"max_batch": max(256, max(batch_sizes))}
                if precision in CALIBRATED:  # int8 exports, the fused engine's fp8 GEMMs: one calibration set
                    if not calib:
                        calib.append(_calibration_set(opts, source, tmp))
                        log(f"calibration set: {calib[0][1]['name']}: {calib[0][1]['coverage']}")
                    options["calib"] = calib[0][0]
                if backend in ("onnxruntime", "aoti", "tensorrt") and data is not None:
                    # the export is checked on the recall set and refused outside tolerance
                    options.update(parity_set=data.dataset, reference_embeddings=ref)
                engine = engine_factory(backend, model, precision, device, workdir=workdir, **options)
            except Exception as e:  # noqa: BLE001 - one broken backend must not end the run
                reason = _reason(e)
                log(f"[{name}] failed to build: {reason}")
                if opts.extra.get("raise"):
                    raise
                parity = _refused_parity(e)
                if data is not None and recall_mod.same_set(parity, data):  # its numbers join the recall table
                    recall_rows.append(recall_mod.row_from_export_parity(name, precision, parity))
                engine_rows.append(_engine_row(backend, precision, "failed", reason, time.perf_counter() - t0))
                _free(device)
                if checkpoint is not None:
                    checkpoint(assemble())
                continue
            try:
                build_s = time.perf_counter() - t0
                first_calls_s = harness.prime(engine, cfg, batch_sizes, text_length, opts.towers)
                setup = time.perf_counter() - t0
                engine.info.update({"build_s": round(build_s, 3), "first_calls_s": round(first_calls_s, 3)})
                # TF32 is torch's switch: only torch-run fp32 engines follow it; the report's "+TF32" label reads this
                if dev == "cuda" and precision == "fp32" and backend in ("torch", "torch-compile", "aoti"):
                    engine.info["tf32"] = bool(opts.tf32)
                log(f"[{name}] built in {build_s:.1f} s; first call per batch size (compilation) {first_calls_s:.1f} s")

                def show(r: harness.TimingRow) -> None:
                    log(
                        f"[{name}] {r.tower:<5} batch {r.batch:>4}: p50 {r.p50_ms:9.2f} ms  "
                        f"{r.items_per_s:10.1f} items/s" + ("  (unsteady)" if r.unsteady else "")
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
                        monitor=load_monitor,
                        caption_tokens=data.tokens if opts.real_captions else None,
                    )
                ]
                if jpegs is not None:
                    rate = harness.e2e_rate(engine, jpegs, e2e_batch, workers)
                    e2e_rows.append(
                        {"backend": backend, "precision": precision, **rate, "decode_only_images_per_s": decode_only}
                    )
                    log(f"[{name}] JPEG -> embedding: {rate['images_per_s']:.1f} images/s")
                if data is not None:
                    exported = engine.info.get("export_parity")
                    if recall_mod.same_set(exported, data):  # the export already embedded this set: reuse it
                        row = recall_mod.row_from_export_parity(name, precision, exported)
                    else:
                        got = recall_mod.embed(engine, data, recall_batch)
                        row = recall_mod.compare(name, precision, ref, got, data.caption_image, ref_metrics)
                    recall_rows.append(row)
                    log(
                        f"[{name}] recall: mR {row['metrics']['mR']:.2f} (Δ {recall_mod.fmt_dmr(row)}), min cosine "
                        f"{min(row['cosine_image_min'], row['cosine_text_min']):.6f}, rank flips "
                        f"{recall_mod.fmt_flips(row['rank_flips'])}: "
                        + ("PASS" if row["within_tolerance"] else "FAIL " + "; ".join(row["failures"]))
                    )
                engine_rows.append(_engine_row(backend, precision, "ok", None, setup, _metadata(engine)))
            except Exception as e:  # noqa: BLE001
                reason = _reason(e)
                setup = time.perf_counter() - t0
                log(f"[{name}] failed while running: {reason}")
                if opts.extra.get("raise"):
                    raise
                log(traceback.format_exc(limit=3))
                engine_rows.append(_engine_row(backend, precision, "failed", reason, setup, _metadata(engine)))
            finally:
                del engine
                _free(device)
            if checkpoint is not None:  # the report so far, so a run cut short still leaves its finished engines
                checkpoint(assemble())
        load_monitor.stop()
        doc = assemble()
    finally:
        load_monitor.stop()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return doc


def _refused_parity(e: BaseException) -> dict | None:
    """The parity report of an export refused for its parity (``ExportError.parity``), else None."""
    rep = getattr(e, "parity", None)
    return rep if isinstance(rep, dict) else None


def _metadata(engine) -> dict | None:
    """The engine's metadata without the bulky export parity report (its numbers are in the recall section)."""
    meta = engine.metadata() if hasattr(engine, "metadata") else None
    if isinstance(meta, dict) and isinstance(meta.get("export_parity"), dict):
        p = meta["export_parity"]
        meta = {**meta, "export_parity": {k: p.get(k) for k in ("passed", "failures", "notes", "n_images")}}
    return meta


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
    calibration,
    load,
) -> dict:

    weights = (
        str(opts.checkpoint)
        if opts.checkpoint
        else "random (no checkpoint): speed does not depend on the weights; recall values mean nothing, their parity does"
    )
    n_images = len(data.pixels) if data is not None else 0
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
            "real_captions": bool(opts.real_captions),
            "towers": list(opts.towers),
            "compile_mode": opts.compile_mode,
            "compile_dynamic": opts.compile_dynamic,
            "tf32": bool(opts.tf32) if device.type == "cuda" else None,
            "workers": workers,
            "recall_batch": recall_batch if opts.recall else None,
            "note": opts.note,
        },
        "model": {
            "name": cfg.name,
            "family": cfg.family,
            "context_length": cfg.text.context_length,
            "image_size": cfg.vision.image_size,
            "embed_dim": cfg.embed_dim,
            **prof,
        },
        "peak_tflops": peaks,
        "engines": [dict(e) for e in engine_rows],
        "timings": list(timings),
        "e2e": list(e2e_rows),
        "recall": None
        if data is None
        else {
            "dataset": data.description,
            "reference": ref_metrics,
            "engines": list(recall_rows),
            "tolerances": recall_mod.tolerances_for(n_images),
            "dmr_note": recall_mod.dmr_note(
                [e["precision"] for e in engine_rows if e["status"] in ("ok", "failed")] or ["fp32"], n_images
            ),
        },
        "calibration": calibration,
        "load": load,
        # the stand-ins are of the open-domain towers (ViT-B/32 + ResNet-50, a 77-token CLIP text transformer)
        "reference_points": H100_REFERENCE_POINTS if cfg.family == FAMILY_PRIORCLIP else [],
    }
    return finalize(doc)
