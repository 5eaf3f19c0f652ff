"""``priorclip-export --format triton-repo``: an NVIDIA Triton Inference Server model repository, validated.

Layout (model names fixed, so clients and ensembles agree; one priorclip export per repository root)::

    OUT/priorclip_image_encoder/config.pbtxt  1/model.onnx (+ its external data)   ONNX Runtime backend
    OUT/priorclip_text_encoder/config.pbtxt   1/model.onnx (+ its external data)
    OUT/priorclip_image_preprocess/config.pbtxt  1/model.py 1/priorclip.json   Python backend: image bytes -> pixels
    OUT/priorclip_tokenize/config.pbtxt          1/model.py 1/priorclip.json   Python backend: caption -> token ids
    OUT/priorclip_image/config.pbtxt  1/   ensemble: image bytes -> preprocess -> image encoder -> embeddings
    OUT/priorclip_text/config.pbtxt   1/   ensemble: caption -> tokenize -> text encoder -> embeddings
    OUT/manifest.json  OUT/README.md  (+ parity.json/md, selftest.npz, calibration.json as the ONNX export wrote them)

The graphs are :func:`~priorclip.export.export_model`'s ONNX, moved unchanged (the external-data file keeps its name,
which the graph refers to); the config dims and dtypes are read from the graphs themselves. The Python models run
priorclip's own reading rules (``EvalTransform.load``: header pixel limit, first page, 16-bit grey to 8 bit, the
model's resize) and tokenizer, so they import priorclip: it must be installed, at the exporting version (checked at
model load), in Triton's Python environment.

Batching and text length. Triton's dynamic batcher joins requests only when their shapes are equal (ragged batching
is off), so token length decides what batches. PriorCLIP pools the EOT under a causal mask: padding after the EOT is
exact, and the tokenizer pads each request to a multiple of ``text_bucket`` tokens (16: lengths 16/32/48/64/77) so
requests of similar length batch together. PIR attends to its [PAD] tokens (README, PIR section): its ids are never
re-padded, a request's captions are padded to the request's longest (the reference's chunk semantics, so a request
holds at most 128 captions), and each request batches only with requests of its own width: one caption per request
is that caption's batch-of-one embedding.

:func:`~priorclip.export.triton_validate.validate_repository` checks the written repository as Triton's loader
would (the schema, then the loader's own rules).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .api import ExportError, ExportResult, export_model
from .onnx_export import IMAGE_INPUT, ORDER_OUTPUT, OUTPUT, TEXT_INPUT
from .triton_validate import Tensor, ValidationUnavailable, external_files, graph_io, validate_repository

IMAGE_ENCODER, TEXT_ENCODER = "priorclip_image_encoder", "priorclip_text_encoder"
PREPROCESS, TOKENIZE = "priorclip_image_preprocess", "priorclip_tokenize"
IMAGE_ENSEMBLE, TEXT_ENSEMBLE = "priorclip_image", "priorclip_text"
MODELS = (IMAGE_ENCODER, TEXT_ENCODER, PREPROCESS, TOKENIZE, IMAGE_ENSEMBLE, TEXT_ENSEMBLE)
IMAGE_BYTES, CAPTION = "image", "caption"  # the ensembles' (and Python models') inputs: TYPE_STRING, one per row
SIDECAR = "priorclip.json"  # beside each model.py: the model config, priorclip version and text bucket
KINDS = ("gpu", "cpu")
ACCELERATORS = ("none", "tensorrt", "tensorrt-plan")
DEFAULT_PREFERRED = (8, 32, 64)
DEFAULT_QUEUE_DELAY_US = 2000
DEFAULT_TEXT_BUCKET = 16
DEFAULT_PREPROCESS_INSTANCES = 4  # JPEG decode + resize is CPU work; one Python instance runs one request at a time
PIR_REQUEST_CAPTIONS = 128  # priorclip.preprocess.PIR_TEXT_CHUNK: the reference pads captions in chunks of 128
TRT_PRECISION = {"fp32": "FP32", "fp16": "FP16"}


@dataclass(frozen=True)
class TritonOptions:
    """Serving settings written into the configs (``--triton-*`` options)."""

    instances: int = 1  # encoder instances (instance_group count)
    kind: str = "gpu"  # encoder instance kind: gpu | cpu
    preferred_batch: tuple[int, ...] | None = None  # None: DEFAULT_PREFERRED capped at max_batch
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    accelerator: str = "none"  # none | tensorrt (ONNX Runtime's TensorRT execution provider) | tensorrt-plan
    preprocess_instances: int = DEFAULT_PREPROCESS_INSTANCES  # CPU instances of each Python model
    text_bucket: int = DEFAULT_TEXT_BUCKET  # PriorCLIP token lengths padded to a multiple of this (0: none)


def resolve_options(options: TritonOptions, precision: str, max_batch: int,
                    int8_target: str | None = None) -> TritonOptions:
    """Check ``options`` against each other and the export (one :class:`ExportError` line each) and fill defaults."""
    if options.kind not in KINDS:
        raise ExportError(f"--triton-kind {options.kind!r} is not one of: {', '.join(KINDS)}")
    if options.accelerator not in ACCELERATORS:
        raise ExportError(f"--triton-accelerator {options.accelerator!r} is not one of: {', '.join(ACCELERATORS)}")
    if options.accelerator == "tensorrt-plan":
        from .tensorrt import INSTALL_HINT

        raise ExportError("--triton-accelerator tensorrt-plan (serialised TensorRT plans) is not written by this "
                          f"exporter (it needs tensorrt on the serving GPU's host: {INSTALL_HINT}); use "
                          "--triton-accelerator tensorrt: Triton's ONNX Runtime backend builds TensorRT engines from "
                          "the same ONNX on the serving GPU")
    if options.accelerator == "tensorrt" and options.kind != "gpu":
        raise ExportError("--triton-accelerator tensorrt runs on GPU instances: use --triton-kind gpu")
    if precision == "int8":
        # the int8 graph for ONNX Runtime (--int8-target ort-cpu) is built from the integer chains its CPU provider
        # fuses; on GPU instances the CUDA provider would hand those nodes back to the CPU
        if options.accelerator == "tensorrt":
            raise ExportError("--precision int8 with --triton-accelerator tensorrt is not offered: Triton's ONNX "
                              "Runtime backend sets one TensorRT precision flag (precision_mode) and the int8 Q/DQ "
                              "layouts are not what its TensorRT provider runs as written; serve fp16 with tensorrt, "
                              "or build TensorRT plans with --format trt")
        if (int8_target or "ort-cpu") != "ort-cpu":
            raise ExportError(f"--int8-target {int8_target} is not an ONNX Runtime CPU layout; a Triton repository "
                              "serves int8 with --int8-target ort-cpu (the default) on --triton-kind cpu")
        if options.kind != "cpu":
            raise ExportError("--precision int8 serves on CPU instances (its Q/DQ layout is ONNX Runtime's CPU "
                              "provider's): add --triton-kind cpu, or serve fp16 on GPUs")
    for name, value, low in (("--triton-instances", options.instances, 1),
                             ("--triton-preprocess-instances", options.preprocess_instances, 1),
                             ("--triton-max-queue-delay-us", options.max_queue_delay_us, 0),
                             ("--triton-text-bucket", options.text_bucket, 0)):
        if value < low:
            raise ExportError(f"{name} must be at least {low}, got {value}")
    preferred = options.preferred_batch
    if preferred is None:
        preferred = tuple(s for s in DEFAULT_PREFERRED if s <= max_batch) or (max_batch,)
    bad = [s for s in preferred if s < 1 or s > max_batch]
    if bad or not preferred or len(set(preferred)) != len(preferred):
        raise ExportError(f"--triton-preferred-batch {','.join(map(str, preferred))}: sizes must be distinct, in "
                          f"[1, --max-batch {max_batch}]" + (f" (not {', '.join(map(str, bad))})" if bad else ""))
    return replace(options, preferred_batch=tuple(sorted(preferred)))


def parse_batch_list(text: str) -> tuple[int, ...]:
    """``"8,32,64"`` -> (8, 32, 64); anything else one :class:`ExportError` line."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ExportError(f"--triton-preferred-batch {text!r}: expected comma-separated batch sizes, e.g. 8,32,64") \
            from None


# ------------------------------------------------------------------------------------------------- configs




def _io_block(field: str, tensors: list[Tensor]) -> str:
    rows = [f'  {{ name: "{t.name}" data_type: {t.dtype} dims: [ {", ".join(map(str, t.dims))} ] }}' for t in tensors]
    return f"{field} [\n" + ",\n".join(rows) + "\n]\n"


def _header(lines: list[str]) -> str:
    return "".join(f"# {ln}\n" for ln in ["Written by priorclip-export --format triton-repo; see ../README.md.", *lines])


def _trt_block(tower: str, precision: str, cfg, max_batch: int) -> str:
    from .tensorrt import profile_shapes

    shapes = profile_shapes(tower, cfg.vision.image_size, cfg.text.context_length, max_batch)
    params = {"precision_mode": TRT_PRECISION[precision]}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        params[key] = ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())
    rows = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return ("# ONNX Runtime's TensorRT execution provider builds engines from this graph when the model loads, with one\n"
            "# optimisation profile over the batch and text-length ranges the encoder is served at.\n"
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
            f'      {{\n        name: "tensorrt"\n{rows}\n      }}\n    ]\n  }}\n}}\n')


def _encoder_config(name: str, tower: str, ins: list[Tensor], outs: list[Tensor], options: TritonOptions,
                    max_batch: int, precision: str, cfg) -> str:
    notes = [f"priorclip {tower} encoder ({cfg.name}, {precision} ONNX): L2-normalised '{OUTPUT}'."]
    if tower == "text" and cfg.family == "pir" and not getattr(cfg, "mask_padding", False):
        notes += ["PIR attends to [PAD]: the token width is part of the input's meaning. The dynamic batcher joins only",
                  "requests of equal width (no ragged batching), so each request keeps the embedding of its own",
                  "padding; one caption per request is its batch-of-one embedding. Do not enable ragged batching."]
    elif tower == "text":
        pad = (f"pads each request to a multiple of {options.text_bucket} tokens" if options.text_bucket else
               "cuts each request to its longest caption")
        notes += ["Token length is variable; the dynamic batcher joins requests of equal length only (no ragged",
                  f"batching), so {TOKENIZE} {pad} (exact: EOT pooling under a causal mask)."]
    kind = "KIND_GPU" if options.kind == "gpu" else "KIND_CPU"
    text = (_header(notes) + f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
            + _io_block("input", ins) + _io_block("output", outs)
            + "dynamic_batching {\n"
            f"  preferred_batch_size: [ {', '.join(map(str, options.preferred_batch))} ]\n"
            f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
            f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]\n")
    if options.accelerator == "tensorrt":
        text += _trt_block(tower, precision, cfg, max_batch)
    return text


def _python_config(name: str, what: str, ins: list[Tensor], outs: list[Tensor], options: TritonOptions,
                   max_batch: int) -> str:
    return (_header([what, "Python backend: needs priorclip installed in Triton's Python environment (README)."])
            + f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            + _io_block("input", ins) + _io_block("output", outs)
            + "# several queued requests per execute() call; each gets its own response (or error)\n"
            "dynamic_batching { }\n"
            f"instance_group [ {{ count: {options.preprocess_instances} kind: KIND_CPU }} ]\n")


def _ensemble_config(name: str, what: str, max_batch: int, ins: list[Tensor], outs: list[Tensor],
                     steps: list[tuple[str, dict[str, str], dict[str, str]]]) -> str:
    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
        maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"

    return (_header([what]) + f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            + _io_block("input", ins) + _io_block("output", outs)
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(step(*s) for s in steps) + "\n  ]\n}\n")


def text_max_batch(cfg, max_batch: int) -> int:
    """Captions per text request: PIR with attended padding is capped at the reference's chunk of 128 captions."""
    if cfg.family == "pir" and not getattr(cfg, "mask_padding", False):
        return min(max_batch, PIR_REQUEST_CAPTIONS)
    return max_batch


def render_configs(cfg, image_io: tuple[list[Tensor], list[Tensor]], text_io: tuple[list[Tensor], list[Tensor]],
                   options: TritonOptions, max_batch: int, precision: str) -> dict[str, str]:
    """Model name -> ``config.pbtxt`` text for the six models, from the graphs' own I/O (``graph_io``)."""
    (img_in, img_out), (txt_in, txt_out) = image_io, text_io
    pixels = next(t for t in img_in if t.name == IMAGE_INPUT)
    tokens = next(t for t in txt_in if t.name == TEXT_INPUT)
    emb_img = next(t for t in img_out if t.name == OUTPUT)
    emb_txt = next(t for t in txt_out if t.name == OUTPUT)
    image_bytes, caption = Tensor(IMAGE_BYTES, "TYPE_STRING", (1,)), Tensor(CAPTION, "TYPE_STRING", (1,))
    text_batch = text_max_batch(cfg, max_batch)
    s = cfg.vision.image_size
    return {
        IMAGE_ENCODER: _encoder_config(IMAGE_ENCODER, "image", img_in, img_out, options, max_batch, precision, cfg),
        TEXT_ENCODER: _encoder_config(TEXT_ENCODER, "text", txt_in, txt_out, options, max_batch, precision, cfg),
        PREPROCESS: _python_config(PREPROCESS, f"Encoded image bytes (one file per row) -> pixels [3,{s},{s}], by "
                                   "priorclip's open_image + EvalTransform.", [image_bytes],
                                   [Tensor(IMAGE_INPUT, pixels.dtype, pixels.dims)], options, max_batch),
        TOKENIZE: _python_config(TOKENIZE, "UTF-8 caption (one per row) -> token ids, by priorclip's tokenizer.",
                                 [caption], [Tensor(TEXT_INPUT, tokens.dtype, tokens.dims)], options, text_batch),
        IMAGE_ENSEMBLE: _ensemble_config(IMAGE_ENSEMBLE, "image bytes -> embeddings", max_batch, [image_bytes],
                                         [emb_img], [(PREPROCESS, {IMAGE_BYTES: IMAGE_BYTES}, {IMAGE_INPUT: "pixels"}),
                                                     (IMAGE_ENCODER, {IMAGE_INPUT: "pixels"}, {OUTPUT: OUTPUT})]),
        TEXT_ENSEMBLE: _ensemble_config(TEXT_ENSEMBLE, "caption -> embeddings", text_batch, [caption], [emb_txt],
                                        [(TOKENIZE, {CAPTION: CAPTION}, {TEXT_INPUT: "tokens"}),
                                         (TEXT_ENCODER, {TEXT_INPUT: "tokens"}, {OUTPUT: OUTPUT})]),
    }


# ------------------------------------------------------------------------------------------------- Python models

_COMMON_PY = '''
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _settings(args):
    """priorclip.json beside this file; refuses a priorclip other than the one that exported the repository."""
    settings = json.loads((Path(args["model_repository"]) / args["model_version"] / "priorclip.json").read_text())
    import priorclip

    if priorclip.__version__ != settings["priorclip_version"]:
        raise RuntimeError(f"this repository was exported by priorclip {settings['priorclip_version']} but Triton's "
                           f"Python environment has priorclip {priorclip.__version__}: install that version, or "
                           "re-export the repository with this one (preprocessing must match the export)")
    from priorclip.config import config_from_dict

    return settings, config_from_dict(settings["model"])


def _error(message, code="INVALID_ARG"):
    code = getattr(pb_utils.TritonError, code, None)  # error codes exist since Triton 23.09
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _rows(request, name):
    """The request's BYTES input as a list of bytes, one per row."""
    return [bytes(v) if isinstance(v, (bytes, bytearray, np.bytes_)) else str(v).encode()
            for v in pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)]


def _respond(requests, handle):
    """One response per request: a bad input fails its own request, never the others batched with it."""
    from priorclip.errors import PriorCLIPError

    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except PriorCLIPError as e:  # the input's fault
            responses.append(_error(str(e)))
        except Exception as e:  # a bug must not take the batch with it either
            responses.append(_error(f"{type(e).__name__}: {e}", "INTERNAL"))
    return responses
'''

PREPROCESS_PY = '''"""priorclip image preprocessing for Triton's Python backend (written by priorclip-export --format triton-repo).

Encoded image bytes (TYPE_STRING, one file per row) -> pixels [3, S, S]: priorclip's EvalTransform.load, the way
every priorclip tool reads an image (pixel limit from the header before decoding, first page or frame, 16/32-bit grey
to 8 bit, CMYK/palette/RGBA to RGB, then the model's resize and normalisation). A request with an unreadable image
gets an INVALID_ARG error response; the other requests of the same execute() call are answered normally.
"""
''' + _COMMON_PY + '''

class TritonPythonModel:
    def initialize(self, args):
        from priorclip.preprocess import preprocess_for

        _, cfg = _settings(args)
        self.transform = preprocess_for(cfg).transform
        out = pb_utils.get_output_config_by_name(json.loads(args["model_config"]), "pixels")
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])  # the encoder graph's input type

    def _pixels(self, request):
        images = [self.transform.load(data).numpy() for data in _rows(request, "image")]
        return [pb_utils.Tensor("pixels", np.stack(images).astype(self.dtype))]

    def execute(self, requests):
        return _respond(requests, self._pixels)

    def finalize(self):
        self.transform = None
'''

TOKENIZE_PY = '''"""priorclip tokenizer for Triton's Python backend (written by priorclip-export --format triton-repo).

UTF-8 captions (TYPE_STRING, one per row) -> token ids [rows, L] int64 by the model's own tokenizer. PriorCLIP (EOT
pooling under a causal mask, so padding after the EOT is exact): L is the request's longest caption rounded up to a
multiple of text_bucket tokens, so requests of similar length batch together in the encoder. PIR attends to its
[PAD] tokens: the ids are exactly the tokenizer's for the request's captions (padded to the request's longest).
"""
''' + _COMMON_PY + '''

MIN_TEXT_LEN = 2  # the text graph's shortest length (SOT + EOT)


class TritonPythonModel:
    def initialize(self, args):
        from priorclip.preprocess import preprocess_for

        settings, cfg = _settings(args)
        self.tokenizer = preprocess_for(cfg).tokenizer
        self.context = cfg.text.context_length
        # padding is free where it cannot change an embedding: PriorCLIP, and PIR with its padding masked
        self.pad_free = cfg.family != "pir" or bool(getattr(cfg, "mask_padding", False))
        self.eot_pooled = cfg.family != "pir"
        self.bucket = int(settings["text_bucket"]) if self.pad_free else 0

    def _width(self, ids):
        n = int(ids.argmax(axis=1).max()) + 1 if self.eot_pooled else ids.shape[1]  # EOT is the largest CLIP id
        n = max(n, MIN_TEXT_LEN)
        if self.bucket:
            n = -(-n // self.bucket) * self.bucket
        return min(n, self.context)

    def _tokens(self, request):
        from priorclip.errors import DataError

        captions = []
        for i, data in enumerate(_rows(request, "caption")):
            try:
                captions.append(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"caption {i} of the request is not UTF-8 ({e.reason} at byte {e.start})") from None
        ids = self.tokenizer(captions).numpy().astype(np.int64)
        if self.pad_free:
            width = self._width(ids)
            ids = np.pad(ids[:, :width], ((0, 0), (0, max(0, width - ids.shape[1]))))
        return [pb_utils.Tensor("tokens", ids)]

    def execute(self, requests):
        return _respond(requests, self._tokens)

    def finalize(self):
        self.tokenizer = None
'''


def write_python_model(model_dir: Path, source: str, cfg, text_bucket: int) -> None:
    """``model_dir/1/model.py`` and its ``priorclip.json`` (the model config, priorclip version, text bucket)."""
    import priorclip

    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(source, encoding="utf-8")
    settings = {"priorclip_version": priorclip.__version__, "model": cfg.to_dict(), "text_bucket": text_bucket}
    (version / SIDECAR).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------- export


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[priorclip-export] {msg}", file=sys.stderr, flush=True)


def _lay_out(repo: Path, onnx_dir: Path, result: ExportResult, options: TritonOptions, max_batch: int) -> dict:
    """Move the ONNX export into Triton's layout under ``repo`` and write every config; returns the manifest."""
    manifest = json.loads(json.dumps(result.manifest))  # a copy
    cfg = model_cfg(manifest)
    moved: set[Path] = {onnx_dir / "manifest.json"}
    io = {}
    for tower, name in (("image", IMAGE_ENCODER), ("text", TEXT_ENCODER)):
        graph = onnx_dir / manifest["files"][tower]
        version = repo / name / "1"
        version.mkdir(parents=True)
        for data in external_files(graph):  # the graph names its data file relative to itself: keep the name
            os.replace(onnx_dir / data, version / data)
            moved.add(onnx_dir / data)
        ins, outs, dynamic = graph_io(graph)
        if not dynamic:
            raise ExportError(f"{graph.name}: the batch axis is not dynamic; Triton cannot batch it")
        os.replace(graph, version / "model.onnx")
        moved.add(graph)
        io[tower] = (ins, outs)
        manifest["files"][tower] = f"{name}/1/model.onnx"
    for name, text in render_configs(cfg, io["image"], io["text"], options, max_batch, manifest["precision"]).items():
        (repo / name).mkdir(exist_ok=True)
        (repo / name / "1").mkdir(exist_ok=True)  # Triton wants a version folder, an ensemble's stays empty
        (repo / name / "config.pbtxt").write_text(text, encoding="utf-8")
    write_python_model(repo / PREPROCESS, PREPROCESS_PY, cfg, options.text_bucket)
    write_python_model(repo / TOKENIZE, TOKENIZE_PY, cfg, options.text_bucket)
    for f in onnx_dir.iterdir():  # parity, selftest, calibration ...: at the root, where the manifest names them
        if f not in moved:
            os.replace(f, repo / f.name)
    manifest["format"] = "triton-repo"
    manifest["triton"] = {
        "models": {IMAGE_ENCODER: "onnxruntime_onnx", TEXT_ENCODER: "onnxruntime_onnx", PREPROCESS: "python",
                   TOKENIZE: "python", IMAGE_ENSEMBLE: "ensemble", TEXT_ENSEMBLE: "ensemble"},
        "entry_points": {
            "image": {"model": IMAGE_ENSEMBLE, "input": {"name": IMAGE_BYTES, "dtype": "BYTES", "shape": ["batch", 1]},
                      "output": OUTPUT},
            "text": {"model": TEXT_ENSEMBLE, "input": {"name": CAPTION, "dtype": "BYTES", "shape": ["batch", 1]},
                     "output": OUTPUT, "max_batch": text_max_batch(cfg, max_batch)},
        },
        "options": {**asdict(options), "preferred_batch": list(options.preferred_batch), "max_batch": max_batch},
        "python_requirement": f"priorclip=={manifest['tools']['priorclip']} in Triton's Python environment",
        "image_outputs": [t.name for t in io["image"][1]],
        "validation": None,
    }
    return manifest


def model_cfg(manifest: dict):
    from priorclip.config import config_from_dict

    return config_from_dict(manifest["model"]["config"])


def _install(repo: Path, out_dir: Path, trash: Path) -> None:
    """Swap the staged model folders and root files into ``out_dir``; older copies of ours go to ``trash``."""
    trash.mkdir()
    for entry in sorted(repo.iterdir()):
        dst = out_dir / entry.name
        if entry.is_dir() and dst.exists():
            os.replace(dst, trash / entry.name)
        os.replace(entry, dst)


def export_triton_repo(model, out_dir: str | Path, precision: str = "fp32", options: TritonOptions | None = None,
                       *, max_batch: int = 256, progress: bool = True, **export_kwargs: Any) -> ExportResult:
    """Export ``model`` as a Triton model repository in ``out_dir`` (layout in the module docstring).

    ``export_kwargs`` go to :func:`~priorclip.export.export_model` (``calib``, ``parity_set``, ``force``,
    ``checkpoint``, ``command``, ``int8_target``, ...), which writes the ONNX graphs into a staging folder inside
    ``out_dir``; they are then moved into the model folders, the configs written and the whole repository validated
    (:func:`validate_repository`) before it replaces any earlier export's model folders. A validation problem is an
    :class:`ExportError`; without ``tritonclient`` the repository is written and one line says it was not validated.
    """
    from priorclip.cliutils import check_output_dir, output_dir, write_json, write_text

    if "format" in export_kwargs:
        raise TypeError("export_triton_repo writes ONNX encoders itself; do not pass format")
    options = resolve_options(options or TritonOptions(), precision, max_batch, export_kwargs.get("int8_target"))
    out_dir = check_output_dir(out_dir)
    with output_dir(out_dir):
        staging = Path(tempfile.mkdtemp(prefix=".triton-staging-", dir=out_dir))
        try:
            try:
                result = export_model(model, staging / "onnx", "onnx", precision, max_batch=max_batch,
                                      progress=progress, **export_kwargs)
            except ExportError as e:
                if getattr(e, "parity", None) is None:
                    raise
                for name in ("parity.json", "parity.md"):  # keep the evidence; the staging folder goes
                    if (staging / "onnx" / name).is_file():
                        os.replace(staging / "onnx" / name, out_dir / name)
                raise ExportError(str(e).replace(str(staging / "onnx"), str(out_dir))) from None
            _log(progress, "laying out the Triton model repository")
            repo = staging / "repo"
            manifest = _lay_out(repo, staging / "onnx", result, options, max_batch)
            manifest["triton"]["validation"] = _validate(repo)
            (out_dir / "manifest.json").unlink(missing_ok=True)  # as export_model: the manifest is written last
            _install(repo, out_dir, staging / "replaced")
            write_text(out_dir / "README.md", readme(manifest))
            write_json(out_dir / "manifest.json", manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    files = {t: out_dir / p for t, p in manifest["files"].items()}
    return ExportResult(out_dir, manifest, result.parity, files)


def _validate(repo: Path) -> dict:
    try:
        problems = validate_repository(repo)
    except ValidationUnavailable as e:
        print(f"note: {e}", file=sys.stderr, flush=True)
        return {"status": "not validated", "reason": str(e)}
    if problems:
        raise ExportError(f"the Triton repository fails validation ({len(problems)} problems): " + "; ".join(problems))
    from importlib.metadata import version

    return {"status": "passed", "schema": f"tritonclient {version('tritonclient')} model_config.proto",
            "loader_checks": "priorclip.export.triton_validate.validate_repository"}


# ------------------------------------------------------------------------------------------------- README


def readme(manifest: dict) -> str:
    """The repository's README.md: what it holds, how to serve it, a client example."""
    cfg = model_cfg(manifest)
    t = manifest["triton"]
    opts = t["options"]
    s, e = cfg.vision.image_size, cfg.embed_dim
    pir = cfg.family == "pir" and not getattr(cfg, "mask_padding", False)
    version = manifest["tools"]["priorclip"]
    text_note = (f"PIR attends to its [PAD] tokens, so a caption's embedding depends on the width it is padded to. "
                 f"`{TOKENIZE}` pads a request's captions to the request's longest, as the reference pads each chunk "
                 f"of up to {PIR_REQUEST_CAPTIONS} captions (a text request holds at most "
                 f"{text_max_batch(cfg, opts['max_batch'])} captions); the encoder's dynamic batcher joins only "
                 "requests of equal width (ragged batching stays off), so one caption per request gives that "
                 "caption's batch-of-one embedding, whatever else is in flight. Send the captions of one reference "
                 "chunk (up to 128, in order) as one request to get the embeddings `priorclip eval` computes for "
                 "them.") if pir else \
        (f"PriorCLIP pools the EOT token under a causal mask, so padding after it is exact: `{TOKENIZE}` pads each "
         f"request to a multiple of {opts['text_bucket'] or 1} tokens (`--triton-text-bucket`), and the encoder's "
         "dynamic batcher (which joins only requests of equal shape) batches requests of similar length together.")
    accel = ("ONNX Runtime's TensorRT execution provider builds engines from the ONNX when each encoder loads "
             "(minutes for large models; add `trt_engine_cache_enable`/`trt_engine_cache_path` parameters to the "
             "encoder configs to keep them between restarts)." if opts["accelerator"] == "tensorrt" else
             "ONNX Runtime runs the graphs (CUDA provider on GPU instances); `--triton-accelerator tensorrt` adds "
             "its TensorRT execution provider.")
    status = t["validation"]["status"]
    return f"""# priorclip Triton model repository: {cfg.name}, {manifest['precision']}

Written by `priorclip-export --format triton-repo` (priorclip {version}); `manifest.json` records the command, the
checkpoint hash, the graphs' I/O and the serving options. Config validation at export: **{status}** (Triton's
`ModelConfig` schema from tritonclient plus the loader's own checks, `priorclip.export.triton_repo.validate_repository`).
It has not been loaded by a live `tritonserver` on the machine that wrote this file.

| model | backend | does |
|---|---|---|
| `{IMAGE_ENSEMBLE}` | ensemble | encoded image file (`{IMAGE_BYTES}`, BYTES `[batch, 1]`) -> `{OUTPUT}` FP32 `[batch, {e}]` |
| `{TEXT_ENSEMBLE}` | ensemble | UTF-8 caption (`{CAPTION}`, BYTES `[batch, 1]`) -> `{OUTPUT}` FP32 `[batch, {e}]` |
| `{PREPROCESS}` | python | image bytes -> pixels `[3, {s}, {s}]` by priorclip's `EvalTransform.load` |
| `{TOKENIZE}` | python | caption -> token ids `[-1]` INT64 by the model's tokenizer |
| `{IMAGE_ENCODER}` | onnxruntime | pixels -> L2-normalised embeddings (+ `{ORDER_OUTPUT}` where the gate ranks) |
| `{TEXT_ENCODER}` | onnxruntime | token ids -> L2-normalised embeddings |

Encoders: `max_batch_size` {opts['max_batch']}, dynamic batching (preferred {opts['preferred_batch']}, queue delay
{opts['max_queue_delay_us']} µs), {opts['instances']} {opts['kind'].upper()} instance(s). {accel} The Python models
run {opts['preprocess_instances']} CPU instances each (decoding is CPU work: raise it for GPU encoders).

**Text and batching.** {text_note}

**Images.** Each row is one encoded file (JPEG, PNG, TIFF, ...), read with priorclip's rules: the pixel limit is
checked from the header before decoding (`PRIORCLIP_MAX_PIXELS` in the server's environment raises it), the first
page/frame is used, 16-bit grey is scaled to 8 bit, palette/RGBA/CMYK become RGB. A request holding an unreadable
image gets an `INVALID_ARG` error; requests batched with it are unaffected.

## Serve it

The Python models import priorclip: install the same version ({version}) in Triton's Python environment (they refuse
to load with another, since preprocessing must match the export), e.g.

```dockerfile
FROM nvcr.io/nvidia/tritonserver:<yy.mm>-py3
RUN pip install "priorclip=={version}"
```

```bash
docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models my-triton-priorclip \\
    tritonserver --model-repository=/models
curl -s localhost:8000/v2/models/{IMAGE_ENSEMBLE}/ready -o /dev/null -w '%{{http_code}}\\n'   # 200 when loaded
```

(Or a conda-pack environment per model: the Python backend's `EXECUTION_ENV_PATH` parameter.) Files at the top of
this folder (`manifest.json`, `README.md`, `parity.*`, `selftest.npz`) are not models; Triton loads the folders.

## Client

```python
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient("localhost:8001")

def embed(model, name, rows):
    data = np.array([[r] for r in rows], dtype=np.object_)  # BYTES [batch, 1]
    inp = grpcclient.InferInput(name, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    return client.infer(model, [inp]).as_numpy("{OUTPUT}")  # float32 [batch, {e}], L2-normalised

images = embed("{IMAGE_ENSEMBLE}", "{IMAGE_BYTES}", [open("airport_1.jpg", "rb").read()])
texts = embed("{TEXT_ENSEMBLE}", "{CAPTION}", ["many planes are parked near the terminal".encode()])
print(images @ texts.T)  # cosine similarities
```
"""
