"""Embedding engines: one interface over every backend, used by ``priorclip-bench`` and ``priorclip-serve``.

An :class:`Engine` is a :class:`priorclip.encoder.Encoder` (``encode_images`` / ``encode_texts`` returning
L2-normalised float32 embeddings ``[B, E]``) plus ``name``, ``backend``, ``precision``, ``device`` and
:meth:`Engine.metadata`, so what is benchmarked is exactly what is served.

Output contract: every backend returns its embeddings as torch tensors **on its own device** (``engine.device``;
on CUDA no engine copies to the host per call, so every backend is timed device tensor in, device tensor out);
callers that need host data call ``.cpu()``. ``encode_images_with_order`` returns ``(embeddings, belief order
[B, T] int64 | None)``, the order the gate used (None for models without a ranking gate).

Backends (:data:`BACKENDS`):

=================  =====================================================================================
``torch``          eager PyTorch, :class:`~priorclip.encoder.TorchEncoder` (fp32 reference; fp16/bf16 autocast)
``torch-compile``  ``torch.compile`` of the two encoders (CUDA graphs + ``max-autotune`` on GPU by default)
``onnxruntime``    ``priorclip.export`` ONNX graph run by ONNX Runtime (CPU or CUDA execution provider)
``aoti``           ``priorclip.export`` AOTInductor package
``tensorrt``       ``priorclip.export`` TensorRT engine (only where the ``tensorrt`` module is importable)
``fused``          :class:`~priorclip.serve.fused.FusedEncoder`: real fp16/bf16 weights, BN folded, fused stem+gate
                   kernel, exact pruning of the last blocks, text length buckets, CUDA graphs on GPU; ``fp8``: the
                   image path's large GEMMs in e4m3 with calibrated scales (:mod:`priorclip.serve.fp8`); PIR models:
                   :class:`~priorclip.serve.fused_pir.FusedPIREncoder` (the PAE kernels)
=================  =====================================================================================

Text length: the eager model cuts each text batch to its longest caption (``PriorCLIP.trim_text``, exact but
data-dependent); the exported engines do the same on the host before running their dynamic-length graph. The
``torch-compile`` engine cannot (a data-dependent length would recompile per caption length), so it always runs
the full context (77 tokens): :attr:`Engine.fixed_text_length` says which an engine does, and the benchmark counts
FLOPs at the length really run.

The closed-domain PIR model attends to its [PAD] tokens, so its ids always run exactly as tokenised (never cut,
never padded further): every engine takes the batch's own length (``torch-compile`` marks the length axis dynamic,
one graph for every length; ``fused`` captures one CUDA graph per batch bucket and length). PIR's ``fused`` engine
is :class:`~priorclip.serve.fused_pir.FusedPIREncoder` (the PAE kernels, :mod:`priorclip.kernels.pae`).

Static-shape engines (compiled with ``dynamic=False``, CUDA graphs) are given ``batch_buckets``: a batch is padded up
to the next bucket (or split at the largest), so an odd-sized last batch does not trigger a fresh compilation.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from priorclip.config import FAMILY_PIR, FAMILY_PRIORCLIP
from priorclip.encoder import Encoder, TorchEncoder, encode_images_with_order
from priorclip.errors import PriorCLIPError
from priorclip.model import PriorCLIP
from priorclip.numerics import DTYPES
from priorclip.pir import PIR

Model = PriorCLIP | PIR

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


class Engine:
    """An :class:`~priorclip.encoder.Encoder` with a name and metadata, wrapping a backend's own encoder.

    Args:
        inner: the backend encoder (anything with ``encode_images``/``encode_texts``/``image_size``/
            ``context_length``).
        backend, precision, device: what it is.
        fixed_text_length: True when texts always run at the full context length (no data-dependent trimming).
        batch_buckets: for static-shape engines, the batch sizes they are specialised for (see module docstring).
        info: extra metadata (export directory, compile mode, provider, ...).
    """

    def __init__(
        self,
        inner: Encoder,
        backend: str,
        precision: str,
        device: str | torch.device,
        *,
        fixed_text_length: bool,
        batch_buckets: tuple[int, ...] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.inner = inner
        self.backend = backend
        self.precision = precision
        self.device = torch.device(device)
        self.image_size = int(inner.image_size)
        self.context_length = int(inner.context_length)
        self.config = getattr(inner, "config", None)
        self.fixed_text_length = fixed_text_length
        self.batch_buckets = tuple(sorted(set(batch_buckets))) if batch_buckets else None
        self.info = dict(info or {})

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "precision": self.precision,
            "device": str(self.device),
            "image_size": self.image_size,
            "context_length": self.context_length,
            "fixed_text_length": self.fixed_text_length,
            "batch_buckets": list(self.batch_buckets) if self.batch_buckets else None,
            **self.info,
        }

    def __repr__(self) -> str:
        return f"Engine({self.name} on {self.device})"

    def _bucketed(self, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        """``fn(x)`` through the batch buckets; ``fn`` returns a tensor or a tuple of tensors (or None) by row."""
        if not self.batch_buckets or x.shape[0] in self.batch_buckets:
            return fn(x)
        n, top = x.shape[0], self.batch_buckets[-1]
        if n > top:  # split at the largest bucket
            return _cat_rows([self._bucketed(fn, x[s : s + top]) for s in range(0, n, top)])
        size = next(b for b in self.batch_buckets if b >= n)
        pad = x[-1:].expand(size - n, *x.shape[1:])  # repeat a real row: padding never changes other rows
        return _head_rows(fn(torch.cat([x, pad])), n)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] float32 normalised pixels -> [B, E] float32 L2-normalised embeddings on :attr:`device`."""
        return self._bucketed(self.inner.encode_images, pixels)

    def encode_images_with_order(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings and the gate's belief order [B, T] int64 (None where the backend or the model has none)."""
        return self._bucketed(lambda x: encode_images_with_order(self.inner, x), pixels)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L<=context] int64 token ids -> [B, E] float32 L2-normalised embeddings."""
        if self.fixed_text_length and tokens.shape[1] < self.context_length:
            tokens = torch.nn.functional.pad(tokens, (0, self.context_length - tokens.shape[1]))
        return self._bucketed(self.inner.encode_texts, tokens)


def _cat_rows(parts: list) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(None if any(p[i] is None for p in parts) else torch.cat([p[i] for p in parts])
                 for i in range(len(parts[0])))


def _head_rows(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:n]
    return tuple(None if o is None else o[:n] for o in out)


# --------------------------------------------------------------------------------------------------- torch-compile


class CompiledTorchEncoder:
    """``torch.compile`` of ``encode_image`` / ``encode_text`` with static shapes (one graph per batch size).

    On CUDA the default mode is ``max-autotune`` (Triton GEMM autotuning plus CUDA graphs); CUDA-graph outputs live in
    a static pool that the next replay overwrites, so they are cloned before they are returned. PriorCLIP texts
    always run at the full context length: the model's data-dependent trim is skipped while compiling
    (``PriorCLIP.encode_text``). PIR texts run at their own length, which changes their embedding (attended [PAD]):
    that axis is marked dynamic, so one graph serves every length instead of one compile per caption length.
    One image function returns embeddings *and* belief order, so ``encode_images`` and ``encode_images_with_order``
    (a parity pass) share one compiled graph per batch size instead of compiling twice.
    """

    def __init__(
        self, model: Model, device: torch.device, dtype: torch.dtype, mode: str | None, dynamic: bool = False
    ) -> None:
        import torch._dynamo

        cfg = torch._dynamo.config  # one graph per batch size and tower; the default limit (8) is too small
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 64))
        self.device, self.dtype, self.mode = device, dtype, mode
        self.model = model.to(device).eval()
        self.config = model.cfg
        self.image_size = model.cfg.vision.image_size
        self.context_length = model.cfg.text.context_length
        self.dynamic_text_length = model.cfg.family == FAMILY_PIR
        self.cudagraphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        autocast = (
            (lambda: nullcontext()) if dtype == torch.float32 else (lambda: torch.autocast(device.type, dtype=dtype))
        )

        def image(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            with autocast():
                emb, order = self.model.encode_image_with_order(pixels)
                return emb.float(), order

        def text(tokens: torch.Tensor) -> torch.Tensor:
            with autocast():
                return self.model.encode_text(tokens).float()

        # dynamic=False: one specialised graph per batch size (fastest, but each size compiles); dynamic=True: one graph
        # with a symbolic batch for all sizes (CUDA graphs are still recorded per size), for when compile time counts
        kw = {"dynamic": dynamic} | ({"mode": mode} if mode else {})
        self._image = torch.compile(image, **kw)
        self._text = torch.compile(text, **kw)

    def _run(self, fn, x: torch.Tensor, first_only: bool = False) -> Any:
        with torch.inference_mode():
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(x)
            if first_only:  # drop the rest before cloning: only what is returned needs its own copy
                out = out[0]
            if not self.cudagraphs:
                return out
            if isinstance(out, torch.Tensor):
                return out.clone()
            return tuple(None if o is None else o.clone() for o in out)

    def encode_images_with_order(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._run(self._image, pixels.to(self.device, torch.float32))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(self._image, pixels.to(self.device, torch.float32), first_only=True)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device).detach()  # a tensor object of our own: the mark stays off the caller's
        if self.dynamic_text_length and tokens.shape[1] >= 2:  # length 1 is specialised by dynamo anyway
            torch._dynamo.mark_dynamic(tokens, 1, min=2, max=self.context_length)
        return self._run(self._text, tokens)


# --------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Backend:
    """One backend: which precisions it runs per device type, whether it can run here, and how to build it."""

    name: str
    precisions: dict[str, tuple[str, ...]]  # device type -> precisions
    check: Callable[[str], str | None]  # device type -> reason it cannot run, or None
    build: Callable[..., Engine]
    description: str = ""
    options: tuple[str, ...] = field(default_factory=tuple)


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def _check_torch(dev: str) -> str | None:
    if dev == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _check_compile(dev: str) -> str | None:
    if (reason := _check_torch(dev)) is not None:
        return reason
    if dev == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++/clang++); none found"
    if dev == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton"
    return None


def _export_api() -> tuple[Callable, Callable] | str:
    """(export_model, open_engine) from priorclip.export, or the reason they are missing."""
    try:
        mod = importlib.import_module("priorclip.export")
    except Exception as e:  # noqa: BLE001 - any import failure means the backend cannot run
        return f"priorclip.export does not import: {type(e).__name__}: {e}"
    missing = [n for n in ("export_model", "open_engine") if not hasattr(mod, n)]
    if missing:
        return "unavailable: priorclip.export not built (" + ", ".join(missing) + " missing)"
    return mod.export_model, mod.open_engine


def _check_ort(dev: str) -> str | None:
    if (reason := _check_torch(dev)) is not None:
        return reason
    try:
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime does not import ({type(e).__name__}: {e}); pip install onnxruntime"
    if dev == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
    api = _export_api()
    return api if isinstance(api, str) else None


def _check_aoti(dev: str) -> str | None:
    if (reason := _check_compile(dev)) is not None:
        return reason
    if not hasattr(importlib.import_module("torch._inductor"), "aoti_compile_and_package"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package"
    api = _export_api()
    return api if isinstance(api, str) else None


def _check_trt(dev: str) -> str | None:
    if dev != "cuda":
        return "TensorRT runs on CUDA devices only"
    if (reason := _check_torch(dev)) is not None:
        return reason
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    api = _export_api()
    return api if isinstance(api, str) else None


def _check_fused(dev: str) -> str | None:
    if (reason := _check_torch(dev)) is not None:
        return reason
    if dev == "cuda" and importlib.util.find_spec("triton") is None:
        return "the fused engine on CUDA needs triton"
    return None


def _build_torch(model: Model, precision: str, device: torch.device, **_: Any) -> Engine:
    enc = TorchEncoder(model, device, DTYPES[precision])
    # PIR has no trim: its ids run as given, at the batch's own length (a PriorCLIP without trim runs what it gets)
    trim = bool(getattr(model, "trim_text", False))
    fixed = model.cfg.family == FAMILY_PRIORCLIP and not trim
    info = {"autocast": precision != "fp32", "trim_text": trim}
    return Engine(enc, "torch", precision, device, fixed_text_length=fixed, info=info)


def _build_compile(
    model: Model,
    precision: str,
    device: torch.device,
    compile_mode: str | None = "default",
    batch_buckets=None,
    dynamic: bool = False,
    **_: Any,
) -> Engine:
    if compile_mode == "default":  # max-autotune brings CUDA graphs and GEMM autotuning; on CPU it only adds time
        compile_mode = "max-autotune" if device.type == "cuda" else None
    enc = CompiledTorchEncoder(model, device, DTYPES[precision], compile_mode, dynamic)
    info = {"compile_mode": compile_mode or "default", "cuda_graphs": enc.cudagraphs, "dynamic": dynamic,
            "dynamic_text_length": enc.dynamic_text_length}
    return Engine(enc, "torch-compile", precision, device, fixed_text_length=not enc.dynamic_text_length,
                  batch_buckets=batch_buckets, info=info)


def _build_fused(model: Model, precision: str, device: torch.device, batch_buckets=None,
                 cuda_graphs: bool = True, project_in_kernel: bool = True, calib=None, calib_method: str = "minmax",
                 fp8_keep: tuple[str, ...] | list[str] = (), fused_norms: bool = False, **_: Any) -> Engine:
    from priorclip.serve.fused import FusedEncoder

    if model.cfg.family == FAMILY_PIR:
        return _build_fused_pir(model, precision, device, batch_buckets, cuda_graphs, fused_norms)
    fp8 = None
    if precision == "fp8":
        from priorclip.export.amax import METHODS
        from priorclip.serve.fp8 import Fp8Config, fp8_unsupported

        if calib is None:
            raise PriorCLIPError("fused fp8 needs calibration data (calib=RetrievalSet)")
        if calib_method not in METHODS:
            raise PriorCLIPError(f"unknown calibration method {calib_method!r}; choose from {', '.join(METHODS)}")
        if (reason := fp8_unsupported(str(device))) is not None:
            raise PriorCLIPError(f"fused fp8 cannot run on {device}: {reason}")
        fp8 = Fp8Config(calib, calib_method, tuple(fp8_keep))
    dtype = torch.bfloat16 if fp8 is not None else DTYPES[precision]  # fp8 GEMMs write bf16; the rest runs bf16
    try:
        enc = FusedEncoder(model, device, dtype, cuda_graphs=cuda_graphs, project_in_kernel=project_in_kernel,
                           fp8=fp8, fused_norms=fused_norms)
    except ValueError as e:  # a bad keep pattern, an empty calibration set
        raise PriorCLIPError(f"fused {precision}: {e}") from e
    if batch_buckets is None and enc.cuda_graphs:  # one CUDA graph per bucket, not per batch size
        batch_buckets = (1, 8, 16, 32, 64, 128, 256)
    info = {
        "cuda_graphs": enc.cuda_graphs,
        "kernels": enc.kernels,  # stem_gate: "fused" (Triton) or "reference"
        "project_in_kernel": enc.project_in_kernel,
        "fused_norms": enc.fused_norms,
        "bn_folded": enc.prior is not None,
        "pruning": "last ViT block token 0, last text block EOT row, attention pool query 0",
        "text_length_buckets": list(enc.text_buckets),
    }
    if enc.fp8 is not None:
        info["fp8"] = enc.fp8  # which GEMMs are FP8, which stayed bf16 and why, calibration, amax per layer
    return Engine(enc, "fused", precision, device, fixed_text_length=False, batch_buckets=batch_buckets, info=info)


def _build_fused_pir(model: PIR, precision: str, device: torch.device, batch_buckets, cuda_graphs: bool,
                     fused_norms: bool) -> Engine:
    from priorclip.serve.fused_pir import FusedPIREncoder

    if precision == "fp8" or fused_norms:  # both are open-domain ViT/ResNet paths
        what = "fp8" if precision == "fp8" else "fused_norms"
        raise PriorCLIPError(f"fused {what} runs the open-domain PriorCLIP only; PIR's fused engine runs fp32, fp16 "
                             "or bf16")
    enc = FusedPIREncoder(model, device, DTYPES[precision], cuda_graphs=cuda_graphs)
    if batch_buckets is None and enc.cuda_graphs:  # one CUDA graph per bucket, not per batch size
        batch_buckets = (1, 8, 16, 32, 64, 128, 256)
    info = {
        "cuda_graphs": enc.cuda_graphs,
        "kernels": enc.kernels,  # the PAE kernels: "fused" (Triton) or "reference"
        "bn_folded": True,
        "pruning": "VIR's CroSA query once per sample; the last VIR and LCA blocks row 0 only",
    }
    return Engine(enc, "fused", precision, device, fixed_text_length=False, batch_buckets=batch_buckets, info=info)


def _build_exported(
    fmt: str,
    backend: str,
    model: Model,
    precision: str,
    device: torch.device,
    workdir: str | Path | None = None,
    calib=None,
    provider: str | None = None,
    max_batch: int = 256,
    parity_set=None,
    reference_embeddings=None,
    int8_target: str | None = None,
    **_: Any,
) -> Engine:
    api = _export_api()
    if isinstance(api, str):
        raise PriorCLIPError(f"{backend}: {api}")
    export_model, open_engine = api
    if precision == "int8" and calib is None:
        raise PriorCLIPError(f"{backend} int8 needs calibration data (calib=RetrievalSet)")
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="priorclip-engines-"))
    out_dir = root / f"{fmt}-{precision}"
    # force=False: an export outside its precision's tolerance raises ExportError ("parity outside the ...
    # tolerance") and is never benchmarked as if it were fine. Without a parity_set no verdict is made.
    result = export_model(
        model,
        out_dir,
        format=fmt,
        precision=precision,
        calib=calib,
        max_batch=max_batch,
        force=False,
        progress=False,
        device=device.type,
        parity_set=parity_set,
        reference_embeddings=reference_embeddings,
        int8_target=int8_target,
    )
    inner = open_engine(result.out_dir, device=str(device), provider=provider)
    manifest = getattr(inner, "metadata", None) or {}
    info = {"export_dir": str(result.out_dir), "format": fmt, "export_engine": getattr(inner, "name", None),
            "export_parity": result.parity}
    if getattr(inner, "node_placement", None):
        info["node_placement"] = inner.node_placement  # ONNX Runtime: provider -> op counts after partitioning
    for key in ("opset", "precision", "io"):
        if key in manifest:
            info[f"export_{key}"] = manifest[key]
    if provider:
        info["provider"] = provider
    if precision == "int8":
        info["int8_target"] = result.manifest.get("calibration", {}).get("target", int8_target)
    # exported graphs take a dynamic text length; the engines cut token batches to the longest caption, as eager does
    return Engine(inner, backend, precision, device, fixed_text_length=False, info=info)


def _build_ort(model, precision, device, provider=None, **kw) -> Engine:
    provider = provider or ("CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider")
    from priorclip.export.quantize import target_for_provider

    kw.setdefault("int8_target", target_for_provider(provider))  # the INT8 layout for the provider that runs it
    return _build_exported("onnx", "onnxruntime", model, precision, device, provider=provider, **kw)


def _build_aoti(model, precision, device, **kw) -> Engine:
    return _build_exported("aoti", "aoti", model, precision, device, **kw)


def _build_trt(model, precision, device, **kw) -> Engine:
    return _build_exported("trt", "tensorrt", model, precision, device, **kw)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch",
            {"cpu": ("fp32", "bf16", "fp16"), "cuda": ("fp32", "fp16", "bf16")},
            _check_torch,
            _build_torch,
            "eager PyTorch (fp32 reference; fp16/bf16 under autocast)",
        ),
        Backend(
            "torch-compile",
            {"cpu": ("fp32", "bf16", "fp16"), "cuda": ("fp32", "fp16", "bf16")},
            _check_compile,
            _build_compile,
            "torch.compile; max-autotune + CUDA graphs on GPU",
            ("compile_mode", "dynamic", "batch_buckets"),
        ),
        Backend(
            "onnxruntime",
            {"cpu": ("fp32", "fp16", "int8"), "cuda": ("fp32", "fp16", "int8")},
            _check_ort,
            _build_ort,
            "priorclip.export ONNX graph on ONNX Runtime (CPU / CUDA provider)",
            ("provider",),
        ),
        Backend(
            "aoti",
            {"cpu": ("fp32", "fp16"), "cuda": ("fp32", "fp16")},
            _check_aoti,
            _build_aoti,
            "priorclip.export AOTInductor package",
        ),
        Backend(
            "tensorrt", {"cuda": ("fp32", "fp16", "int8")}, _check_trt, _build_trt, "priorclip.export TensorRT engine"
        ),
        Backend(
            "fused",
            {"cpu": ("fp32", "bf16", "fp8"), "cuda": ("fp32", "fp16", "bf16", "fp8")},  # fp8 on CPU: emulated
            _check_fused,
            _build_fused,
            "inference-only encoders: folded BN, fused stem+gate (PriorCLIP) or PAE (PIR) kernels, exact pruning, "
            "CUDA graphs on GPU",
            ("batch_buckets", "cuda_graphs", "project_in_kernel", "fused_norms", "calib_method", "fp8_keep"),
        ),
    )
}


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Every backend name -> None if it can run on ``device`` here, else the reason it cannot."""
    dev = _device_type(device)
    out: dict[str, str | None] = {}
    for name, b in BACKENDS.items():
        if dev not in b.precisions:
            out[name] = f"{name} does not run on {dev}"
            continue
        out[name] = b.check(dev)
    return out


def supported_precisions(backend: str, device: str | torch.device) -> tuple[str, ...]:
    return get_backend(backend).precisions.get(_device_type(device), ())


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise PriorCLIPError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def create_engine(
    backend: str,
    model: Model,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    workdir: str | Path | None = None,
    calib=None,
    parity_set=None,
    reference_embeddings=None,
    **options: Any,
) -> Engine:
    """Build an :class:`Engine` of ``backend`` for ``model`` at ``precision`` on ``device``.

    Args:
        backend: a key of :data:`BACKENDS`.
        model: the PriorCLIP or PIR model (eval mode); engines may move it to ``device``.
        precision: fp32, fp16, bf16, int8 or fp8, as the backend supports on that device.
        workdir: where exporting backends write their artefacts (default: a fresh temporary folder).
        calib: a :class:`~priorclip.data.RetrievalSet` for int8 (exporters) and fp8 (fused) calibration.
        parity_set, reference_embeddings: exporting backends (onnxruntime, aoti, tensorrt) check their export on
            this held-out :class:`~priorclip.data.RetrievalSet` against the fp32 reference (``reference_embeddings``
            = cached (image, text, belief order) of that set, else computed); the report is in
            ``engine.info["export_parity"]``. Other backends ignore both.
        options: backend options: ``compile_mode`` and ``batch_buckets`` (torch-compile), ``batch_buckets``,
            ``cuda_graphs``, and for fp8 ``calib_method`` and ``fp8_keep`` (fused), ``provider`` (onnxruntime),
            ``max_batch`` (exporters).

    Raises:
        PriorCLIPError: unknown backend, a precision it does not support, a backend that cannot run here or cannot
            run the model's family.
        priorclip.export.api.ExportError: an exporting backend's parity is outside its precision's tolerance.
    """
    b = get_backend(backend)
    dev = torch.device(device)
    reason = available_backends(dev)[backend]
    if reason is not None:
        raise PriorCLIPError(f"backend {backend} is not available on {dev.type}: {reason}")
    if precision not in b.precisions.get(dev.type, ()):
        raise PriorCLIPError(
            f"backend {backend} does not run {precision} on {dev.type} (it runs: {', '.join(b.precisions[dev.type])})"
        )
    return b.build(model, precision, dev, workdir=workdir, calib=calib, parity_set=parity_set,
                   reference_embeddings=reference_embeddings, **options)
