"""INT8 layouts on the CPU: which nodes run as integer kernels, how fast, how close. ``python -m
priorclip.export.int8_study``.

For one model it exports the fp32 graphs once (``--fp32-cache`` keeps them between runs), quantises them in each
layout of :data:`VARIANTS` from one shared calibration run (class-spread train images and captions), and reports:

* the integer kernels ONNX Runtime's CPU provider builds after its graph optimisation (QLinearConv,
  MatMulIntegerToFloat, QGemm, ...) and the float GEMMs left (:func:`~.quantize.ort_kernel_counts`);
* image-encoder throughput at ``--batch`` (default 8) of torch eager fp32, ORT fp32 and each layout, timed
  interleaved (every round runs every engine once, medians over rounds), with the benchmarks' load record over the
  timed rounds (:class:`~priorclip.benchmarks.harness.LoadMonitor`: other processes' CPU share, steal);
* parity with the fp32 PyTorch reference on a class-spread held-out set (:mod:`priorclip.parity`: cosine, belief
  rank flips, ΔmR) and its verdict against the int8 tolerance.

It writes ``<out>/export-int8-layouts-<tag>-<date>.{json,md}``. The machine's load is recorded; on a busy machine
the absolute numbers are low and noisy (the ratios of interleaved engines less so), and the report says so.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from priorclip.cliutils import build_model, model_options, user_errors
from priorclip.config import FAMILY_PRIORCLIP
from priorclip.errors import PriorCLIPError
from priorclip.provenance import git_revision

from . import quantize as _q

# name -> (int8 target, keep_fp patterns, fp16 conversion for the tensorrt target[, options]); options:
# "activation_type" for quantize_int8, "session_config" for the timed ONNX Runtime session.
VARIANTS: dict[str, tuple] = {
    # A reconstruction, not the earlier code: int8 activations, Q/DQ on layer inputs only, no fp16 conversion, but
    # fp16-rounded scales and one DQ per use as the tensorrt layout has them. Named "legacy: int8 Q/DQ on layer
    # inputs, fp32 graph" in the results of 2026-11-27.
    "tensorrt Q/DQ layout on the fp32 graph (close to the old layout)": ("tensorrt", ("visual.conv1",), False),
    "ort-cpu: everything int8 but the ViT stem": ("ort-cpu", ("visual.conv1",), None),
    "ort-cpu: default (prior's attnpool + vision_proj_res fp32)": ("ort-cpu", _q.DEFAULT_KEEP_FP, None),
    "ort-cpu: gate inputs fp32 (whole prior + ViT stem)": ("ort-cpu", _q.GATE_INPUTS_FP, None),
    "tensorrt: fp16 graph + int8 Q/DQ (run on ORT CPU)": ("tensorrt", _q.DEFAULT_KEEP_FP, None),
    "ort-cpu default with int8 activations, session.qdqisint8allowed=1": (
        "ort-cpu", _q.DEFAULT_KEEP_FP, None,
        {"activation_type": "int8", "session_config": {"session.qdqisint8allowed": "1"}}),
}
DEFAULT_VARIANTS = "0,1,2,3,4"  # the int8-activation one (5) is a slow one-off: --variants 2,5


def _variant_names(spec: str) -> list[str]:
    """``--variants`` as VARIANTS names, checked while parsing: one clear error before anything is exported."""
    parts = [p.strip() for p in spec.split(",")]
    if not all(p.isdigit() and int(p) < len(VARIANTS) for p in parts):
        raise click.BadParameter(f"{spec!r}: give comma-separated indices from 0 to {len(VARIANTS) - 1} of "
                                 + "; ".join(f"{i}: {n}" for i, n in enumerate(VARIANTS)), param_hint="--variants")
    if len(set(map(int, parts))) != len(parts):
        raise click.BadParameter(f"{spec!r} names a variant twice", param_hint="--variants")
    return [list(VARIANTS)[int(p)] for p in parts]


STAMP = "int8_study_fp32.json"  # what an --fp32-cache export was made from (the manifest has no revision)


def _fp32_export(model, cache: Path | None, work: Path, checkpoint=None, revision: str | None = None) -> Path:
    """The fp32 export, reused from ``cache`` when it was made from the same config, checkpoint hash, tool versions
    and source revision (a "+dirty" revision cannot see uncommitted edits: clear the cache after such edits)."""
    from priorclip.cliutils import write_json

    from .api import _checkpoint_info, export_model, tool_versions
    from .engines import read_manifest

    d = cache or work / "fp32"
    stamp = {"config": model.cfg.to_dict(), "checkpoint_sha256": _checkpoint_info(checkpoint)["sha256"],
             "tools": tool_versions(), "revision": revision}
    stamp = json.loads(json.dumps(stamp, default=str))  # as read back (tuples become lists)
    if cache is not None and (d / "manifest.json").is_file() and (d / STAMP).is_file():
        if read_manifest(d)["precision"] == "fp32" and json.loads((d / STAMP).read_text()) == stamp:
            return d
        print(f"== {d} holds an fp32 export of another model, checkpoint, tool version or revision: re-exporting",
              file=sys.stderr, flush=True)
    (d / STAMP).unlink(missing_ok=True)  # an export that fails half-way must not look reusable
    export_model(model, d, "onnx", "fp32", progress=True, checkpoint=checkpoint,
                 command="priorclip.export.int8_study (fp32)")
    write_json(d / STAMP, stamp)
    return d


def quantize_export(fp32_dir: Path, out: Path, calib, method: str, target: str, keep_fp, fp16, stats_cache: dict,
                    progress=None, activation_type: str | None = None) -> dict:
    """An int8 export directory from an fp32 one (no re-export from torch): both graphs quantised, manifest copied
    with the int8 fields. Returns the calibration tables."""
    from priorclip.cliutils import write_json

    from .api import _image_batches, _text_batches
    from .engines import read_manifest
    from .graph import check_model, load_model, save_model

    manifest = read_manifest(fp32_dir)
    cfg = manifest["model"]["config"]
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for tower in ("image", "text"):
        g = load_model(fp32_dir / manifest["files"][tower])
        if tower == "image":
            batches = lambda: _image_batches(list(calib.images), int(cfg["vision"]["image_size"]))  # noqa: E731
        else:
            batches = lambda: _text_batches(list(calib.captions), int(cfg["text"]["context_length"]))  # noqa: E731
        g, table = _q.quantize_int8(g, batches, method, keep_fp, progress=progress,
                                    stats_cache=stats_cache.setdefault(tower, {}), target=target, fp16=fp16,
                                    activation_type=activation_type)
        tables[tower] = table
        p = save_model(g, out / manifest["files"][tower])
        check_model(p)
    manifest = {**manifest, "precision": "int8", "parity": None,
                "opset": max(i.version for i in load_model(out / manifest["files"]["image"]).opset_import
                             if i.domain in ("", "ai.onnx")),
                "calibration": {"method": method, "target": target, "source": calib.source,
                                "images": len(calib.images), "captions": len(calib.captions),
                                "layers": {t: {k: v for k, v in tab.items() if k != "activations"}
                                           for t, tab in tables.items()}},
                "command": "priorclip.export.int8_study"}
    write_json(out / "manifest.json", manifest)
    write_json(out / "calibration.json", tables)
    return tables


def time_engines(runners: dict, pixels: torch.Tensor, rounds: int, iters: int = 2) -> tuple[dict, dict]:
    """Interleaved timing: each round runs every engine ``iters`` times on ``pixels``; img/s per round and median,
    and the benchmarks' load record over the timed windows (:class:`~priorclip.benchmarks.harness.LoadMonitor`:
    other processes' CPU share and steal, not a load average our own threads inflate)."""
    from priorclip.benchmarks.harness import LoadMonitor

    for f in runners.values():  # warm-up (ORT's first run plans its memory; torch allocates)
        f(pixels)
    per = {n: [] for n in runners}
    monitor = LoadMonitor().start()
    try:
        for _ in range(rounds):
            for n, f in runners.items():
                with monitor.window():
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        f(pixels)
                    per[n].append(pixels.shape[0] * iters / (time.perf_counter() - t0))
    finally:
        monitor.stop()
    timing = {n: {"img_per_s": statistics.median(v), "rounds": [round(x, 3) for x in v]} for n, v in per.items()}
    return timing, monitor.summary()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder with dataset_rsicd_aid.json and images/ (../shared/data/aid-rsicd), or 'synthetic'.")
@click.option("--n-test", type=click.IntRange(min=0), default=256, show_default=True,
              help="Held-out test images, class-spread (0 = the whole split); >= 134 for a ΔmR verdict.")
@click.option("--n-calib-images", type=int, default=256, show_default=True)
@click.option("--n-calib-captions", type=int, default=1024, show_default=True)
@click.option("--calib-method", type=click.Choice(_q.METHODS), default="entropy", show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="Image batch for the throughput rows.")
@click.option("--rounds", type=int, default=7, show_default=True, help="Interleaved timing rounds (medians).")
@click.option("--variants", default=DEFAULT_VARIANTS, show_default=True, callback=lambda c, p, v: _variant_names(v),
              help="Comma list of variant indices (0-based) of int8_study.VARIANTS.")
@click.option("--fp32-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep/reuse the fp32 export here (the default model takes minutes to export); reused only for the "
                   "same model, checkpoint, tool versions and git revision.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"))
@click.option("--tag", default="cpu", show_default=True)
@click.option("--keep-work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the int8 exports here (kept) instead of a temporary folder.")
@click.option("--memory-images", type=click.IntRange(min=0), default=64, show_default=True,
              help="Also measure the calibration's peak RSS on this many calibration images (0: skip).")
@user_errors
def main(model_name, checkpoint, gate, data_dir, n_test, n_calib_images, n_calib_captions, calib_method, batch,
         rounds, variants, fp32_cache, out_dir, tag, keep_work, memory_images) -> None:
    """Compare INT8 Q/DQ layouts on ONNX Runtime CPU: integer kernels, image throughput, parity."""
    import tempfile

    from priorclip.parity import TOLERANCES, min_images_for_dmr

    from .api import tool_versions
    from .engines import open_engine
    from .onnx_export import has_belief_order
    from .parity import format_parity_table, parity_report, reference_embed
    from .report import _data, _device_name, _write

    torch.manual_seed(0)
    model = build_model(model_name, checkpoint, gate).eval()
    if model.cfg.family != FAMILY_PRIORCLIP:  # its variants and gate study name PriorCLIP's layers
        raise PriorCLIPError(f"the int8 layout study measures the open-domain PriorCLIP's layers (res_visual, "
                             f"visual.gate, ...), not {model.cfg.name!r}; for a PIR model run python -m "
                             "priorclip.export.report --variants onnx-int8-entropy")
    test, calib = _data(data_dir, n_test, n_calib_images, n_calib_captions)
    names = variants  # validated names (_variant_names)
    head = {
        "model": model.cfg.name,
        "weights": str(checkpoint) if checkpoint else "random-init (priorclip.cliutils.build_model, seed 0)",
        "device": _device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "cpu_flags": sorted({f for f in _cpu_flags() if f.startswith(("avx512_vnni", "avx_vnni", "avx512f", "avx2"))}),
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m priorclip.export.int8_study", *(shlex.quote(a) for a in sys.argv[1:])]),
        "revision": git_revision(),
        "versions": tool_versions(),
        "held_out": f"{test.describe()['coverage']}, {len(test.captions)} captions",
        "calibration": f"{calib.source}; method {calib_method}",
        "tolerance": {"int8": vars(TOLERANCES["int8"]), "dmr_judged_from": min_images_for_dmr("int8")},
    }
    tmp = None if keep_work else tempfile.mkdtemp(prefix="priorclip-int8-study-")
    work = Path(keep_work or tmp)
    try:
        fp32_dir = _fp32_export(model, fp32_cache, work, checkpoint, head["revision"])
        ref = reference_embed(__import__("priorclip.encoder", fromlist=["TorchEncoder"]).TorchEncoder(model, "cpu"),
                              test, 32)
        cache: dict = {}
        rows: dict[str, dict] = {}
        engines = {"ORT fp32": open_engine(fp32_dir)}
        rows["ORT fp32"] = {"kernels": {t: _q.ort_kernel_counts(fp32_dir / f"{t}_encoder.onnx")
                                        for t in ("image", "text")},
                            "parity": parity_report(engines["ORT fp32"], None, test, "fp32", 32,
                                                    reference_embeddings=ref)}
        # The widest layout first (fewest kept layers, ort-cpu: it quantises conv outputs too), so the shared
        # calibration collects every tensor in one run.
        order = sorted(names, key=lambda n: (len(VARIANTS[n][1]), VARIANTS[n][0] != "ort-cpu"))
        for k, name in enumerate(order):
            target, keep, fp16, opts = (*VARIANTS[name], {})[:4]
            d = work / f"int8-{names.index(name)}"
            print(f"== {name}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            tables = quantize_export(fp32_dir, d, calib, calib_method, target, keep, fp16, cache,
                                     progress=lambda m: print(f"   {m}", file=sys.stderr, flush=True),
                                     activation_type=opts.get("activation_type"))
            t_quant = time.perf_counter() - t0
            eng = open_engine(d)
            rep = parity_report(eng, None, test, "int8", 32, reference_embeddings=ref)
            rows[name] = {"target": target, "keep_fp": list(keep),
                          "fp16_graph": target == "tensorrt" and fp16 is not False,
                          "quantize_seconds": round(t_quant, 1),
                          "layers": {t: {k2: v for k2, v in tab.items() if k2 not in ("activations", "fp16")}
                                     for t, tab in tables.items()},
                          "kernels": {t: _q.ort_kernel_counts(d / f"{t}_encoder.onnx", opts.get("session_config"))
                                      for t in ("image", "text")},
                          "session_config": opts.get("session_config"), "parity": rep}
            engines[name] = eng
            print(format_parity_table({name: rep}), file=sys.stderr, flush=True)
        rows = {n: rows[n] for n in ["ORT fp32", *names]}
        # The gate's inputs: their error in each layout, and how much error the gate tolerates (random weights).
        sens_set = test.subset(256) if len(test.images) > 256 else test  # class-spread, never the first N
        sens_pixels = _timing_pixels(sens_set, model.cfg.vision.image_size, len(sens_set.images))
        gate_names = gate_input_tensors(fp32_dir / "image_encoder.onnx")
        gate_px = sens_pixels[:: max(1, len(sens_pixels) // 64)][:64].numpy()  # every k-th: all classes
        gate_ref = gate_inputs(fp32_dir / "image_encoder.onnx", gate_px, gate_names)  # the fp32 graph, run once
        for n in names:
            rows[n]["gate_input_error"] = gate_input_errors(
                gate_ref, work / f"int8-{names.index(n)}" / "image_encoder.onnx", gate_px, gate_names)
        n_gate_px, n_sens = len(gate_px), len(sens_pixels)
        del gate_px, gate_ref
        sensitivity = gate_sensitivity(model, sens_pixels) if has_belief_order(model) else None
        del sens_pixels
        pixels = _timing_pixels(test, model.cfg.vision.image_size, batch)

        def torch_eager(x, m=model):
            with torch.inference_mode():
                return m.encode_image(x)

        runners = {"torch eager fp32": torch_eager}
        for n in rows:
            cfg = rows[n].get("session_config")
            runners[n] = engines[n].encode_images if not cfg else _raw_session(
                work / f"int8-{names.index(n)}" / "image_encoder.onnx", cfg)
        timing, load = time_engines(runners, pixels, rounds)
        del engines, runners
        memory = None
        if memory_images:
            print("== calibration memory", file=sys.stderr, flush=True)
            memory = calibration_memory(fp32_dir, list(calib.images)[:memory_images], model.cfg.vision.image_size, {
                f"default budget ({_q.CALIB_MEMORY_BUDGET >> 20} MiB, sub-batch {_q.CALIB_SUB_BATCH})":
                    (_q.CALIB_MEMORY_BUDGET, _q.CALIB_SUB_BATCH),
                "64 MiB budget, sub-batch 8": (64 << 20, 8),
                "no budget: every tensor in one run of 32 images (the pre-issue-12 grouping)": (1 << 50, 32)})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    base = timing["torch eager fp32"]["img_per_s"]
    ort32 = timing["ORT fp32"]["img_per_s"]
    from priorclip.benchmarks.harness import assess_reliability

    doc = {**head, "batch": batch, "rounds": rounds,
           "load": {**load, "warnings": assess_reliability(load, [])["warnings"]},
           "calibration_memory": memory, "gate_input_images": n_gate_px,
           "gate_sensitivity": sensitivity, "gate_sensitivity_images": n_sens, "held_out_images": len(test.images),
           "timing": {n: {**v, "vs_torch_eager": v["img_per_s"] / base, "vs_ort_fp32": v["img_per_s"] / ort32}
                      for n, v in timing.items()},
           "variants": rows}
    md = _markdown(doc)
    stem = f"export-int8-layouts-{tag}-{_dt.date.today().isoformat()}"
    paths = _write(out_dir, stem, doc, md)
    click.echo(md)
    click.echo(f"wrote {paths[0]} and {paths[1]}")


def gate_input_tensors(graph_path: Path) -> dict[str, str]:
    """Names of the gate's inputs in an exported image graph: y (the prior token, ``vision_proj_res``'s output) and
    x (the ViT stem after ``ln_pre``); quantisation never renames a producer's output, so they hold in every layout."""
    import onnx

    from .graph import node_scope

    g = onnx.load(str(graph_path), load_external_data=False)
    out = {}
    for n in g.graph.node:
        scope = node_scope(n)
        if scope == "vision_proj_res":
            out["y (prior token)"] = n.output[0]
        elif scope == "visual.ln_pre":
            out["x (ViT stem)"] = n.output[0]
    return out


def gate_inputs(graph: Path, pixels: np.ndarray, names: dict[str, str]) -> list[np.ndarray]:
    """The gate's inputs (``names``' tensors, float64) that the image graph at ``graph`` computes for ``pixels``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.load(str(graph))
    info = _q.tensor_info(m)
    for t in names.values():  # fp16 inside the tensorrt layout
        m.graph.output.append(helper.make_tensor_value_info(t, info.get(t, (TensorProto.FLOAT,))[0], None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [s.run(list(names.values()), {"pixels": pixels[i : i + 8]}) for i in range(0, len(pixels), 8)]
    return [np.concatenate([o[k] for o in outs]).astype(np.float64) for k in range(len(names))]


def gate_input_errors(ref: list[np.ndarray], graph: Path, pixels: np.ndarray, names: dict[str, str]) -> dict:
    """Relative L2 error per image (median, max) of the gate's inputs in ``graph`` against ``ref``, the reference
    graph's :func:`gate_inputs` for the same ``pixels`` (computed once for every layout compared)."""
    res = {}
    for label, r, g in zip(names, ref, gate_inputs(graph, pixels, names)):
        rel = (np.linalg.norm((g - r).reshape(len(r), -1), axis=1)
               / np.maximum(np.linalg.norm(r.reshape(len(r), -1), axis=1), 1e-30))
        res[label] = {"median": float(np.median(rel)), "max": float(rel.max())}
    return res


def gate_sensitivity(model, pixels: torch.Tensor, levels=(1e-4, 1e-3, 3e-3, 1e-2), seed: int = 0) -> dict:
    """How much error the gate's input y tolerates, in eager torch: random noise of relative L2 size ``level`` on
    the prior token y, everything else exact; belief-order flips and cosine with the clean embedding, per level.
    The ViT runs through its own forward (``model.visual`` with ``prior_token``), so it is the model's code."""
    with torch.inference_mode():
        y = torch.cat([model.prior_token(pixels[i : i + 32]) for i in range(0, len(pixels), 32)])

        def embed(yy):
            out, orders = [], []
            for i in range(0, len(pixels), 32):
                f, order = model.visual(pixels[i : i + 32], prior_token=yy[i : i + 32], return_order=True)
                out.append(torch.nn.functional.normalize(f, dim=-1))
                orders.append(order)
            return torch.cat(out).double(), torch.cat(orders)

        ref, ref_order = embed(y)
        gen = torch.Generator().manual_seed(seed)
        res = {}
        for level in levels:
            n = torch.randn(y.shape, generator=gen)
            e, order = embed(y + level * n * y.norm(dim=-1, keepdim=True) / n.norm(dim=-1, keepdim=True))
            cos = (e * ref).sum(-1)
            res[f"{level:g}"] = {"flipped": int((order != ref_order).any(1).sum()), "n": len(y),
                                 "cosine_min": float(cos.min()), "below_0.99": int((cos < 0.99).sum())}
    return res


def _memory_child(spec: dict) -> None:
    """In a fresh process: load the fp32 image graph, calibrate it (min/max + histograms) and print the peak RSS
    before and after as JSON. The peak is /proc's VmHWM, the high-water mark of this process's own memory (Linux's
    ``ru_maxrss`` survives exec, so a child started by a big parent would report the parent's)."""
    import resource

    from .api import _image_batches
    from .graph import load_model

    def peak() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 2**20  # kB -> GiB
        except OSError:  # pragma: no cover - not Linux
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    model = load_model(spec["graph"])
    plan = _q.plan_quantization(model, tuple(spec["keep_fp"]), spec["target"])
    base = peak()
    t0 = time.perf_counter()
    _q.collect_stats(model, plan.tensors, lambda: _image_batches([Path(p) for p in spec["images"]], spec["size"]),
                     "entropy", memory_budget=spec["budget"], sub_batch=spec["sub_batch"], info=plan.info)
    print(json.dumps({"peak_before_gib": round(base, 3), "peak_gib": round(peak(), 3),
                      "seconds": round(time.perf_counter() - t0, 1), "tensors": len(plan.tensors)}))


def calibration_memory(fp32_dir: Path, images: list, image_size: int, configs: dict[str, tuple[int, int]]) -> dict:
    """Peak RSS of calibrating the image graph (ort-cpu layout, default keep_fp) under each (budget, sub-batch)."""
    import subprocess

    out = {}
    for name, (budget, sub) in configs.items():
        spec = {"graph": str(fp32_dir / "image_encoder.onnx"), "images": [str(p) for p in images],
                "size": image_size, "budget": budget, "sub_batch": sub, "target": _q.DEFAULT_TARGET,
                "keep_fp": list(_q.DEFAULT_KEEP_FP)}
        code = ("import json, sys; from priorclip.export.int8_study import _memory_child; "
                "_memory_child(json.loads(sys.argv[1]))")
        r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=True)
        out[name] = {"budget_bytes": budget, "sub_batch": sub, "images": len(images),
                     **json.loads(r.stdout.strip().splitlines()[-1])}
    return out


def _raw_session(path: Path, config: dict[str, str]):
    """An image-encoder runner over a plain ORT session with extra session config entries (the engines take none)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["embeddings"], {"pixels": x.numpy()})[0]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover
        pass
    return set()


def _timing_pixels(test, image_size: int, batch: int) -> torch.Tensor:
    from priorclip.retrieval import iter_image_batches
    from priorclip.transforms import EvalTransform

    return next(iter(iter_image_batches(test.images[:batch], EvalTransform(image_size), batch))).contiguous()


def _markdown(doc: dict) -> str:
    from priorclip.benchmarks.report import load_lines

    from .parity import format_parity_table

    lines = [f"# INT8 layouts on ONNX Runtime CPU, {doc['model']}", ""]
    for k in ("weights", "device", "cpu_count", "cpu_flags", "torch_threads", "date", "command", "revision",
              "held_out", "calibration"):
        lines.append(f"- {k}: {doc[k]}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v))
    lines += ["- machine load (monitored over the timing rounds only):", *(f"  - {x}" for x in load_lines(doc))]
    for w in doc["load"]["warnings"]:
        lines.append(f"- **WARNING: {w}**. The engines were interleaved round by round, so their ratios are the "
                     "meaningful numbers; torch eager suffers from contention more than ONNX Runtime.")
    lines += ["", f"## Image encoder throughput, batch {doc['batch']} (median of {doc['rounds']} interleaved rounds)",
              "", "| engine | img/s | × torch eager | × ORT fp32 | rounds |", "|---|---:|---:|---:|---|"]
    for n, v in doc["timing"].items():
        lines.append(f"| {n} | {v['img_per_s']:.2f} | {v['vs_torch_eager']:.2f} | {v['vs_ort_fp32']:.2f} | "
                     f"{' '.join(f'{x:.1f}' for x in v['rounds'])} |")
    lines += ["", "## Kernels ONNX Runtime runs after its graph optimisation (image / text graph)", "",
              "| variant | integer kernels (image) | float GEMMs left (image) | integer kernels (text) | "
              "float GEMMs left (text) |", "|---|---|---|---|---|"]

    def fmt(d):
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    for n, r in doc["variants"].items():
        k = r["kernels"]
        lines.append(f"| {n} | {fmt(k['image']['integer'])} | {fmt(k['image']['float_gemm'])} | "
                     f"{fmt(k['text']['integer'])} | {fmt(k['text']['float_gemm'])} |")
    lines += ["", f"## The gate's inputs: error per layout ({doc['gate_input_images']} class-spread test images, "
              "vs the fp32 graph)", "",
              "| variant | y (prior token) rel. error median / max | x (ViT stem) rel. error median / max |",
              "|---|---|---|"]
    for n, r in doc["variants"].items():
        e = r.get("gate_input_error")
        if e:
            lines.append(f"| {n} | " + " | ".join(f"{v['median']:.1e} / {v['max']:.1e}" for v in e.values()) + " |")
    if doc.get("gate_sensitivity"):
        n, total = doc["gate_sensitivity_images"], doc["held_out_images"]
        lines += ["", "How much error the gate tolerates (eager torch, random noise of relative L2 size ε on y only, "
                  + (f"all {n} test images of the parity set" if n == total else
                     f"{n} class-spread test images of the {total} in the parity set") + "):", "",
                  "| ε | belief order flipped | cosine min | images below 0.99 |", "|---:|---:|---:|---:|"]
        for lv, r in doc["gate_sensitivity"].items():
            lines.append(f"| {lv} | {r['flipped']}/{r['n']} | {r['cosine_min']:.5f} | {r['below_0.99']} |")
    lines += ["", "## Parity with the fp32 PyTorch reference", "",
              format_parity_table({n: r["parity"] for n, r in doc["variants"].items()})]
    if doc.get("calibration_memory"):
        lines += ["## Calibration memory (image graph, ort-cpu layout, min/max + histogram passes)", "",
                  "| grouping | images | peak RSS after loading the graph (GiB) | peak RSS calibrating (GiB) | "
                  "seconds |", "|---|---:|---:|---:|---:|"]
        for n, r in doc["calibration_memory"].items():
            lines.append(f"| {n} | {r['images']} | {r['peak_before_gib']:.2f} | {r['peak_gib']:.2f} | "
                         f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    main()
