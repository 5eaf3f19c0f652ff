"""``export_model``: one call from a model to an export directory (graphs or engines, manifest, parity report).

Directory layout (DESIGN.md, Export)::

    OUT/image_encoder.onnx (+ .onnx.data)   text_encoder.onnx (+ .data)     --format onnx | trt
    OUT/image_encoder.plan  text_encoder.plan  timing.cache                --format trt (needs tensorrt)
    OUT/image_encoder.pt2   text_encoder.pt2                                --format aoti
    OUT/calibration.json    (int8: per-tensor ranges and scales)
    OUT/manifest.json       OUT/parity.json   OUT/parity.md
    OUT/selftest.npz        (probes and their fp32 reference embeddings: the service's load-time self-test)
"""

from __future__ import annotations

import datetime as _dt
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from priorclip.cliutils import check_output_dir, output_dir, write_json, write_text
from priorclip.config import FAMILY_PIR
from priorclip.errors import PriorCLIPError

from . import fp16 as _fp16
from . import quantize as _q
from .graph import check_model, load_model, op_counts, save_model
from .onnx_export import OPSET, export_onnx_fp32, io_spec
from .selftest import write_selftest

FORMATS = ("onnx", "trt", "aoti")
PRECISIONS = ("fp32", "fp16", "int8")
MANIFEST_FORMAT = "priorclip-export/1"
CALIB_BATCH = 32


class ExportError(PriorCLIPError):
    pass


@dataclass
class CalibrationSet:
    """Calibration inputs: images for the image encoder and captions for the text encoder (no pairing needed)."""

    images: list[Path]
    captions: list[str]
    source: str = ""


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    parity: dict | None = None
    files: dict[str, Path] = field(default_factory=dict)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[priorclip-export] {msg}", file=sys.stderr, flush=True)


def tool_versions() -> dict[str, str | None]:
    from .tensorrt import tensorrt_version

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    out["tensorrt"] = tensorrt_version()
    import priorclip

    out["priorclip"] = priorclip.__version__
    return out


def _image_batches(paths: list[Path], cfg) -> Iterator[np.ndarray]:
    from priorclip.preprocess import preprocess_for
    from priorclip.retrieval import iter_image_batches

    for pixels in iter_image_batches(paths, preprocess_for(cfg).transform, CALIB_BATCH):
        yield pixels.numpy().astype(np.float32)


def _text_batches(captions: list[str], cfg) -> Iterator[np.ndarray]:
    from priorclip.preprocess import preprocess_for

    from .engines import trim_tokens

    pre = preprocess_for(cfg)
    for tokens in pre.text_batches(captions, CALIB_BATCH):
        yield (tokens if pre.text_chunk else trim_tokens(tokens)).numpy().astype(np.int64)


def _export_onnx(model, out_dir: Path, precision: str, calib, calib_method: str, opset: int, max_batch: int,
                 keep_fp: Iterable[str], fp16_keep_ops, fp16_keep_patterns, progress: bool,
                 stats_cache: dict | None = None, int8_target: str = _q.DEFAULT_TARGET) -> tuple[dict, dict]:
    cfg = model.cfg
    info: dict[str, Any] = {}
    if precision == "fp32":
        _log(progress, "exporting fp32 ONNX graphs")
        paths = export_onnx_fp32(model, out_dir, opset, max_batch)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=".fp32-", dir=out_dir))
        try:
            _log(progress, "exporting fp32 ONNX graphs")
            src = export_onnx_fp32(model, tmp, opset, max_batch)
            paths = {}
            tables = {}
            for tower, p in src.items():
                g = load_model(p)
                if precision == "fp16":
                    g, summary = _fp16.convert_fp16(g, fp16_keep_ops, fp16_keep_patterns)
                    info.setdefault("fp16", {})[tower] = summary
                else:
                    _log(progress, f"calibrating the {tower} encoder ({calib_method})")
                    if tower == "image":
                        batches = lambda: _image_batches(list(calib.images), cfg)  # noqa: E731
                    else:
                        batches = lambda: _text_batches(list(calib.captions), cfg)  # noqa: E731
                    g, table = _q.quantize_int8(g, batches, calib_method, keep_fp,
                                                progress=(lambda m: _log(progress, f"  {tower}: {m}")),
                                                stats_cache=None if stats_cache is None else
                                                stats_cache.setdefault(tower, {}), target=int8_target,
                                                fp16_keep_ops=fp16_keep_ops, fp16_keep_patterns=fp16_keep_patterns)
                    tables[tower] = table
                paths[tower] = save_model(g, out_dir / p.name)
                check_model(paths[tower])
            if tables:
                write_json(out_dir / "calibration.json", tables)
                info["calibration_tables"] = {t: {k: v for k, v in tab.items() if k != "activations"}
                                              for t, tab in tables.items()}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    graphs = {t: _light(p) for t, p in paths.items()}  # each graph read once for both summaries
    info["op_counts"] = {t: op_counts(g) for t, g in graphs.items()}
    info["opset"] = {t: max(i.version for i in g.opset_import if i.domain in ("", "ai.onnx"))
                     for t, g in graphs.items()}  # the int8 tensorrt layout raises it to 19 (fp16 Q/DQ)
    return paths, info


def _check_keep_fp(model, keep_fp: Iterable[str]) -> None:
    """Fail before any work when a ``keep_fp`` pattern names no module or parameter (a typo would otherwise quietly
    quantise what the user meant to keep, since the patterns replace the default set)."""
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    for p in keep_fp:
        if not any(_q._matching(n, (p,)) for n in names):
            raise ExportError(f"--keep-fp {p!r} matches no layer of {model.cfg.name} (patterns are module paths, "
                              + ("e.g. 'conv_encoder', 'vision_proj')" if model.cfg.family == FAMILY_PIR else
                                 "e.g. 'visual.conv1', 'res_visual.attnpool*')"))


def _light(path: Path):
    import onnx

    return onnx.load_model(str(path), load_external_data=False)


def _cpu_fp32(model):
    """The model on CPU in fp32 and eval mode, without moving the caller's model (a copy only if needed)."""
    p = next(model.parameters(), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        import copy

        model = copy.deepcopy(model).float().cpu()
    return model.eval()


def _checkpoint_info(checkpoint: str | Path | None) -> dict:
    if checkpoint is None:
        return {"path": None, "sha256": "random-init"}
    from priorclip.checkpoint import file_sha256

    return {"path": str(checkpoint), "sha256": file_sha256(checkpoint)}


def export_model(model, out_dir: str | Path, format: str = "onnx", precision: str = "fp32", calib=None,
                 calib_method: str = "entropy", max_batch: int = 256, opset: int = OPSET, parity_set=None,
                 force: bool = False, progress: bool = True, *, keep_fp: Iterable[str] | None = None,
                 fp16_keep_ops: Iterable[str] | None = None, fp16_keep_patterns: Iterable[str] | None = None,
                 device: str = "cpu", checkpoint: str | Path | None = None, command: str | None = None,
                 parity_batch_size: int = 32, opt_batch: int | None = None, stats_cache: dict | None = None,
                 reference_embeddings=None, int8_target: str | None = None) -> ExportResult:
    """Export ``model``'s image and text encoders to ``out_dir``.

    Args:
        model: a :class:`~priorclip.model.PriorCLIP` or :class:`~priorclip.pir.PIR` (moved to CPU fp32 for ONNX
            export).
        format: ``onnx`` (graphs), ``trt`` (the ONNX plus TensorRT plans; needs ``tensorrt``) or ``aoti``.
        precision: ``fp32``, ``fp16`` or ``int8`` (Q/DQ graph; needs ``calib``).
        calib: a :class:`~priorclip.data.RetrievalSet` or :class:`CalibrationSet` (``.images``, ``.captions``).
        calib_method: ``minmax``, ``percentile`` or ``entropy``.
        parity_set: a held-out :class:`~priorclip.data.RetrievalSet`; when given, ``parity.json`` is written and the
            precision's tolerance enforced (``force=True`` keeps an export outside it).
        keep_fp: int8 layers (module-path patterns) left unquantised; default :func:`.quantize.default_keep_fp` of
            the model's family.
        fp16_keep_ops, fp16_keep_patterns: what an fp16 graph keeps in fp32; default :func:`.fp16.default_keeps` of
            the model's family.
        device: where AOTInductor compiles for and where parity runs the engine (``cpu`` / ``cuda``).
        checkpoint: source checkpoint path, hashed into the manifest (``random-init`` without one).
        stats_cache: a dict kept by the caller so several int8 exports of one model share one calibration run.
        reference_embeddings: cached fp32 reference (image, text, belief order) of ``parity_set``.
        int8_target: the INT8 Q/DQ layout, for the runtime that will run it (:data:`.quantize.TARGETS`):
            ``ort-cpu`` (uint8 activations, integer chains ONNX Runtime's CPU provider fuses) or ``tensorrt``
            (symmetric int8 on an fp16 graph, opset 19). Default: ``tensorrt`` for ``format="trt"``, else ``ort-cpu``.

    Raises:
        PriorCLIPError: bad options, missing TensorRT for ``trt`` (after the ONNX is written), or parity outside
            tolerance without ``force``.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if calib_method not in _q.METHODS:
        raise ExportError(f"unknown calibration method {calib_method!r}; choose from {', '.join(_q.METHODS)}")
    if precision == "int8" and format == "aoti":
        raise ExportError("--format aoti supports --precision fp32 or fp16 (INT8 is for onnx and trt)")
    if precision == "int8" and (calib is None or not len(calib.images) or not len(calib.captions)):
        raise ExportError("--precision int8 needs calibration data (images and captions): pass --calib-data DIR|JSON")
    if max_batch < 1:
        raise ExportError("--max-batch must be at least 1")
    int8_target = int8_target or _q.TARGET_FOR_FORMAT.get(format, _q.DEFAULT_TARGET)
    if int8_target not in _q.TARGETS:
        raise ExportError(f"unknown int8 target {int8_target!r}; choose from {', '.join(_q.TARGETS)}")
    if precision == "int8" and format == "trt" and int8_target != "tensorrt":
        raise ExportError(f"--int8-target {int8_target} is not a TensorRT layout (uint8 activations); "
                          "--format trt needs --int8-target tensorrt")
    if precision == "int8" and keep_fp is not None:
        _check_keep_fp(model, keep_fp)
    out_dir = check_output_dir(out_dir)  # before any work; created below, and removed again if the export fails
    model = _cpu_fp32(model)
    cfg = model.cfg
    # the measured defaults of the model's family (PriorCLIP's gate, PIR's belief and BERT's LayerNorm)
    default_ops, default_patterns = _fp16.default_keeps(cfg.family)
    fp16_keep_ops = default_ops if fp16_keep_ops is None else tuple(fp16_keep_ops)
    fp16_keep_patterns = default_patterns if fp16_keep_patterns is None else tuple(fp16_keep_patterns)
    keep_fp = _q.default_keep_fp(cfg.family) if keep_fp is None else tuple(keep_fp)
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT,
        "model": {"name": cfg.name, "config": cfg.to_dict()},
        "format": format,
        "precision": precision,
        "checkpoint": _checkpoint_info(checkpoint),
        "io": io_spec(model, max_batch),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or "priorclip.export.export_model (Python API)",
        "tools": tool_versions(),
        "host": {"machine": platform.machine(), "system": platform.system(),
                 "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "calibration": None,
        "parity": None,
    }
    if precision == "int8":
        manifest["calibration"] = {
            "method": calib_method,
            "source": getattr(calib, "source", "") or "RetrievalSet",
            "images": len(calib.images),
            "captions": len(calib.captions),
            "percentile": _q.PERCENTILE if calib_method == "percentile" else None,
            "target": int8_target,
            "activations": ("asymmetric uint8 per tensor (Q/DQ around the integer chains ONNX Runtime's CPU provider "
                            "fuses)" if int8_target == "ort-cpu" else
                            "symmetric int8 per tensor (zero point 0) on an fp16 graph, opset 19"),
            "weights": "symmetric int8 per output channel",
            "memory_budget_bytes": _q.CALIB_MEMORY_BUDGET,
            "table": "calibration.json",
        }
    with output_dir(out_dir):  # a failed export leaves no empty folder behind (a folder that existed is kept)
        # The manifest is what makes a folder an export (open_engine reads it) and is written last: drop an earlier
        # export's first, so an export cut off while rewriting the graphs never passes for a complete one.
        (out_dir / "manifest.json").unlink(missing_ok=True)
        files: dict[str, Path] = {}
        if format in ("onnx", "trt"):
            paths, info = _export_onnx(model, out_dir, precision, calib, calib_method, opset, max_batch, keep_fp,
                                       fp16_keep_ops, fp16_keep_patterns, progress, stats_cache, int8_target)
            files.update(paths)
            manifest["opset"] = max(info["opset"].values())
            manifest["onnx"] = info
            if precision == "int8":
                manifest["calibration"]["layers"] = info["calibration_tables"]
        else:
            from .aoti import export_aoti

            _log(progress, f"compiling AOTInductor packages for {device} ({precision})")
            files.update(export_aoti(model, out_dir, precision, max_batch, device))
            manifest["opset"] = None
            manifest["aoti"] = {"device": torch.device(device).type, "precision": precision}
        manifest["files"] = {t: p.name for t, p in files.items()}
        # in every export (each format and precision, and the manifest a trt export without TensorRT writes early)
        manifest["selftest"] = write_selftest(model, out_dir)

        if format == "trt":
            from . import tensorrt as _trt

            shapes = {t: _trt.profile_shapes(t, cfg.vision.image_size, cfg.text.context_length, max_batch, opt_batch)
                      for t in ("image", "text")}
            manifest["tensorrt"] = {
                "network": "strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED); precision from the ONNX, "
                           "no FP16/INT8 builder flags, no calibrator",
                "profiles": {t: {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in s.items()}
                             for t, s in shapes.items()},
                "timing_cache": "timing.cache",
                "engines": None,
            }
            try:
                trt = _trt.import_tensorrt()
            except _trt.TensorRTMissing as e:
                manifest["tensorrt"]["status"] = f"not built: {e}"
                write_json(out_dir / "manifest.json", manifest)
                raise _trt.TensorRTMissing(f"{e}. The ONNX it would consume is written to {out_dir}") from None
            engines = {}
            for t in ("image", "text"):
                _log(progress, f"building the TensorRT {t} engine")
                built = _trt.build_engine(files[t], out_dir / f"{t}_encoder.plan", shapes[t], out_dir / "timing.cache",
                                          trt=trt, tf32=precision != "fp32")
                engines[t] = built["plan"]
                manifest["tensorrt"].setdefault("builds", {})[t] = built
            manifest["tensorrt"]["engines"] = engines
            manifest["tensorrt"]["status"] = "built"

        write_json(out_dir / "manifest.json", manifest)
        parity = None
        if parity_set is not None:
            parity = run_parity(model, out_dir, manifest, parity_set, device, parity_batch_size, progress,
                                reference_embeddings)
            manifest["parity"] = {"file": "parity.json", "passed": parity["passed"], "failures": parity["failures"],
                                  "n_images": parity["n_images"], "n_captions": parity["n_captions"],
                                  "dataset": parity["dataset"]["coverage"], "notes": parity["notes"]}
            write_json(out_dir / "manifest.json", manifest)
            if not parity["passed"] and not force:
                err = ExportError(f"parity outside the {precision} tolerance: {'; '.join(parity['failures'])} "
                                  f"(see {out_dir / 'parity.json'}; --force keeps it)")
                err.parity = parity  # callers that report it (priorclip-bench) need not re-read parity.json
                raise err
        return ExportResult(out_dir, manifest, parity, files)


def run_parity(model, out_dir: Path, manifest: dict, parity_set, device: str, batch_size: int,
               progress: bool, reference_embeddings=None) -> dict:
    from priorclip.encoder import TorchEncoder
    from priorclip.numerics import fp32_matmuls

    from .engines import open_engine
    from .parity import format_parity_table, parity_report, reference_embed

    _log(progress, f"parity on {parity_set.describe()['coverage']}, {len(parity_set.captions)} captions")
    engine = open_engine(out_dir, device=device)
    # The reference runs where the engine runs when that is CUDA (TF32 off, so it is fp32), else on the CPU; a
    # cached reference_embeddings (image, text[, belief order]) skips it.
    ref_dev = getattr(engine, "device", torch.device("cpu"))
    ref_dev = ref_dev if torch.device(ref_dev).type == "cuda" else torch.device("cpu")
    ref = reference_embeddings
    if ref is None:
        if ref_dev.type == "cuda":
            import copy

            reference = TorchEncoder(copy.deepcopy(model), ref_dev)  # a copy: the caller's model stays on the CPU
        else:
            reference = TorchEncoder(model, "cpu")
        # TF32 off for the reference only: the engine runs outside the block, with the global settings it is served
        # with (an AOTInductor CUDA package's convolutions read cudnn.allow_tf32 at run time).
        with fp32_matmuls():
            ref = reference_embed(reference, parity_set, batch_size)
    report = parity_report(engine, None, parity_set, manifest["precision"], batch_size, progress=False,
                           reference_embeddings=ref)
    report["reference_device"] = "cached" if reference_embeddings is not None else str(ref_dev)
    name = f"{manifest['format']}-{manifest['precision']}"
    if manifest.get("calibration"):
        name += f"-{manifest['calibration']['method']}"
    report["export"] = name
    write_json(out_dir / "parity.json", report)
    d = report["dataset"]
    table = (f"Parity set: {d['coverage']}, {d['n_captions']} captions"
             + (f"; {d['selection']['source']}" if d.get("selection", {}).get("source") else "") + "\n\n"
             + format_parity_table({f"{name} ({report['engine']})": report}))
    write_text(out_dir / "parity.md", table)
    if progress:
        print(table, flush=True)
    return report
