"""Parity tables for the committed results: ``python -m priorclip.export.report``.

Runs the export matrix (fp32, fp16, int8 x {minmax, percentile, entropy}; optionally AOTI) for one model on a
held-out subset of a Karpathy dataset, compares every engine with the fp32 PyTorch reference (embedded once), and
writes ``<out>/export-parity-<device>-<date>.{json,md}``. ``--study fp16`` and ``--study keep-fp`` write the
measurements behind :data:`priorclip.export.fp16.DEFAULT_KEEP_OPS` and
:data:`priorclip.export.quantize.DEFAULT_KEEP_FP`.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from priorclip.cliutils import build_model, check_output_dir, model_options, user_errors, write_json, write_text
from priorclip.config import FAMILY_PRIORCLIP
from priorclip.errors import DataError, PriorCLIPError
from priorclip.parity import min_images_for_dmr
from priorclip.provenance import git_revision

from .api import CalibrationSet, export_model, tool_versions
from .engines import open_engine
from .parity import TOLERANCES, format_parity_table, format_recall_table, parity_report, reference_embed

NOTE_RANDOM = ("Random-init weights: recall is near chance and almost every score is a near-tie, so delta mR is "
               "noise-dominated; the per-item cosine and max |diff| are the meaningful checks until a trained "
               "checkpoint exists.")


def _data(data_dir: Path, n_test: int, n_calib_images: int, n_calib_captions: int):
    """Held-out test set (class-spread subset, or the whole split for ``n_test`` 0) and a calibration set spread over
    the train split's classes; generated scenes, labelled, for ``--data synthetic``."""
    from priorclip.data import load_karpathy

    if str(data_dir) != "synthetic" and not (data_dir / "dataset_rsicd_aid.json").is_file():
        raise DataError(f"{data_dir}: no dataset_rsicd_aid.json there (pass --data synthetic for generated scenes)")
    if str(data_dir) == "synthetic":
        from priorclip.synthetic import make_sample

        tmp = Path(tempfile.mkdtemp(prefix="priorclip-report-data-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        j, imgs = make_sample(tmp / "test", min(n_test, 64) if n_test > 0 else 64, seed=1)
        jc, imgc = make_sample(tmp / "calib", 32, seed=2)
        calib_set = load_karpathy(jc, imgc)
        test = load_karpathy(j, imgs)
        test.selection = {"source": "GENERATED scenes (priorclip.synthetic, seed 1): --data synthetic"}
        return test, CalibrationSet(calib_set.images, calib_set.captions,
                                    "generated scenes (priorclip.synthetic), seed 2")
    js = data_dir / "dataset_rsicd_aid.json"
    test = load_karpathy(js, data_dir / "images", "test")
    if n_test > 0:
        test = test.subset(n_test)
    images, captions, cover = load_karpathy(js, data_dir / "images", "train").spread_draw(
        n_calib_images, n_calib_captions)
    calib = CalibrationSet(images, captions, f"{js} train split: {cover['coverage']}, {len(captions)} captions")
    return test, calib


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def _write(out: Path, stem: str, doc: dict, md: str) -> tuple[Path, Path]:
    return write_json(out / f"{stem}.json", doc), write_text(out / f"{stem}.md", md)


def run_matrix(model, test, calib, device: str, variants: list[tuple[str, str, str | None]], work: Path,
               checkpoint=None, batch_size: int = 32, provider: str | None = None) -> dict:
    ref = reference_embed(__import__("priorclip.encoder", fromlist=["TorchEncoder"]).TorchEncoder(model, "cpu"),
                          test, batch_size)
    cache: dict = {}
    reports = {}
    from .quantize import target_for_provider

    # int8 in the layout of the provider that runs it (ort-cpu on the CPU, the Q/DQ-on-fp16 layout on CUDA)
    target = target_for_provider(provider or ("CUDAExecutionProvider" if device.startswith("cuda")
                                              else "CPUExecutionProvider"))
    for fmt, prec, method in variants:
        name = f"{fmt}-{prec}" + (f"-{method}" if method else "")
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        export_model(model, work / name, fmt, prec, calib=calib if prec == "int8" else None,
                     calib_method=method or "entropy", progress=True, device=device, checkpoint=checkpoint,
                     stats_cache=cache, command=f"priorclip.export.report ({name})",
                     int8_target=target if fmt == "onnx" else None)
        t_export = time.perf_counter() - t0
        engine = open_engine(work / name, device=device, provider=provider)
        rep = parity_report(engine, None, test, prec, batch_size, reference_embeddings=ref)
        rep["export_seconds"] = round(t_export, 1)
        rep["parity_seconds"] = round(time.perf_counter() - t0 - t_export, 1)
        reports[f"{name} ({rep['engine']})"] = rep
        print(format_parity_table({name: rep}), file=sys.stderr, flush=True)
    return reports


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder with dataset_rsicd_aid.json and images/ (../shared/data/aid-rsicd), or 'synthetic' "
              "(generated scenes, labelled as such).")
@click.option("--n-test", type=click.IntRange(min=0), default=0, show_default=True,
              help="Test images, class-spread (0 = the whole split: 1,027 on AID/RSICD, enough for every ΔmR verdict).")
@click.option("--n-calib-images", type=int, default=256, show_default=True)
@click.option("--n-calib-captions", type=int, default=1024, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--provider", default=None, help="ONNX Runtime provider (default: by device).")
@click.option("--formats", default="onnx", show_default=True, help="Comma list: onnx, aoti.")
@click.option("--study", type=click.Choice(["matrix", "fp16", "keep-fp"]), default="matrix", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"))
@click.option("--tag", default=None, help="File stem tag (default: the device).")
@click.option("--seed", type=int, default=0, show_default=True, help="torch seed for random-init weights.")
@click.option("--variants", default=None, help="Comma list of matrix variants, e.g. onnx-fp32,onnx-int8-entropy.")
@user_errors
def main(model_name, checkpoint, gate, data_dir, n_test, n_calib_images, n_calib_captions, device, provider,
         formats, study, out_dir, tag, seed, variants) -> None:
    check_output_dir(out_dir, option="--out")  # before the export matrix, not after it
    torch.manual_seed(seed)  # random-init weights are reproducible only with a seed
    model = build_model(model_name, checkpoint, gate)
    if study != "matrix" and model.cfg.family != FAMILY_PRIORCLIP:
        raise PriorCLIPError(f"--study {study} measures the open-domain PriorCLIP's layers (visual.gate, res_visual, "
                             f"...), not {model.cfg.name!r}; run the matrix (the default --study) for a PIR model")
    test, calib = _data(data_dir, n_test, n_calib_images, n_calib_captions)
    date = _dt.date.today().isoformat()
    tag = tag or ("gpu" if device.startswith("cuda") else "cpu")
    head = {
        "model": model.cfg.name,
        "weights": str(checkpoint) if checkpoint else f"random-init (torch.manual_seed({seed}))",
        "device": _device_name(device),
        "engine_device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m priorclip.export.report", *(shlex.quote(a) for a in sys.argv[1:])]),
        "revision": git_revision(),
        "versions": tool_versions(),
        "held_out": f"{data_dir.name if (data_dir / 'dataset_rsicd_aid.json').is_file() else 'synthetic'} test split: "
                    f"{test.describe()['coverage']}, {len(test.captions)} captions",
        "calibration": calib.source,
        "tolerances": {k: vars(v) for k, v in TOLERANCES.items()},
        "note": NOTE_RANDOM if not checkpoint else "",
    }
    with tempfile.TemporaryDirectory(prefix="priorclip-export-report-") as tmp:
        work = Path(tmp)
        if study == "matrix":
            wanted = set(variants.split(",")) if variants else None
            variants = []
            for fmt in formats.split(","):
                if fmt == "onnx":
                    variants += [("onnx", "fp32", None), ("onnx", "fp16", None)]
                    variants += [("onnx", "int8", m) for m in ("minmax", "percentile", "entropy")]
                elif fmt == "aoti":
                    variants += [("aoti", "fp32", None), ("aoti", "fp16", None)]
            if wanted:
                variants = [v for v in variants if "-".join(x for x in v if x) in wanted]
            reports = run_matrix(model, test, calib, device, variants, work, checkpoint, provider=provider)
            stem = f"export-parity-{tag}-{date}"
            title = f"Export parity, {head['model']} ({head['weights']}), engines on {head['device']}"
        else:
            reports = _study(study, model, test, calib, device, work, provider)
            stem = f"export-{'fp16-blocklist' if study == 'fp16' else 'int8-keepfp'}-{tag}-{date}"
            title = f"{'FP16 fp32-keep list' if study == 'fp16' else 'INT8 keep-fp layers'} study, {head['model']}"
    md = [f"# {title}\n"]
    md += [f"- {k}: {v}" for k, v in head.items() if k not in ("versions", "tolerances") and v]
    md.append("- versions: " + ", ".join(f"{k} {v}" for k, v in head["versions"].items() if v))
    md.append("- tolerances: " + "; ".join(f"{k}: cosine >= {v.min_cosine}, |ΔmR| <= {v.max_abs_delta_mR} "
                                          f"(judged from {min_images_for_dmr(k)} images)"
                                          for k, v in TOLERANCES.items()))
    md += ["", "## Parity with the fp32 PyTorch reference", "", format_parity_table(reports),
           "## Recall (percent) of reference and engine", "", format_recall_table(reports)]
    paths = _write(out_dir, stem, {**head, "reports": reports}, "\n".join(md))
    click.echo(f"wrote {paths[0]} and {paths[1]}")


def _study(study, model, test, calib, device, work, provider):
    from priorclip.encoder import TorchEncoder

    ref = reference_embed(TorchEncoder(model, "cpu"), test, 32)
    reports = {}
    if study == "fp16":
        from .fp16 import DEFAULT_KEEP_OPS

        stats_ops = ("LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "ReduceSum")
        variants = {
            "all fp16 (nothing kept)": ((), ()),
            "keep LayerNorm": (("LayerNormalization",), ()),
            "keep LN+Softmax+Reduce*": (stats_ops, ()),
            "keep LN+Softmax+Reduce* + gate": (stats_ops, ("visual.gate",)),
            "default + prior path fp32": (DEFAULT_KEEP_OPS, ("visual.gate", "res_visual", "vision_proj_res")),
            "default + ViT stem fp32": (DEFAULT_KEEP_OPS, ("visual.gate", "visual.conv1", "visual.ln_pre")),
            "default + prior + ViT stem fp32 (all gate inputs)": (
                DEFAULT_KEEP_OPS, ("visual.gate", "res_visual", "vision_proj_res", "visual.conv1", "visual.ln_pre")),
        }
        for name, (ops, pats) in variants.items():
            d = work / f"fp16-{len(reports)}"
            export_model(model, d, "onnx", "fp16", progress=False, fp16_keep_ops=ops, fp16_keep_patterns=pats,
                         device=device)
            rep = parity_report(open_engine(d, device=device, provider=provider), None, test, "fp16", 32,
                                reference_embeddings=ref)
            rep["keep_ops"], rep["keep_patterns"] = list(ops), list(pats)
            reports[name] = rep
            print(format_parity_table({name: rep}), file=sys.stderr, flush=True)
    else:
        cache: dict = {}
        variants = {
            "quantise everything": (),
            "keep prior first conv": ("res_visual.bn1",),
            "keep prior attnpool": ("res_visual.attnpool*",),
            "keep ViT patch embed": ("visual.conv1",),
            "keep final projections": ("visual.proj", "text_projection"),
            "keep prior (res_visual, vision_proj_res)": ("res_visual*", "vision_proj_res"),
        }
        for name, pats in variants.items():
            d = work / f"int8-{len(reports)}"
            export_model(model, d, "onnx", "int8", calib=calib, calib_method="entropy", progress=False, keep_fp=pats,
                         stats_cache=cache, device=device)
            rep = parity_report(open_engine(d, device=device, provider=provider), None, test, "int8", 32,
                                reference_embeddings=ref)
            rep["keep_fp"] = list(pats)
            reports[name] = rep
            print(format_parity_table({name: rep}), file=sys.stderr, flush=True)
    return reports


if __name__ == "__main__":  # pragma: no cover
    main()
