"""Engines over an export directory; each implements :class:`priorclip.encoder.Encoder`.

:func:`open_engine` reads ``manifest.json`` to learn the format: ONNX graphs run in ONNX Runtime (CPU provider by
default, CUDA on ``device="cuda"`` with TF32 off so fp32 parity is real fp32), AOTInductor packages through
``torch._inductor.aoti_load_package``, TensorRT plans through the ``tensorrt`` runtime.

Output contract (shared by every engine here and in :mod:`priorclip.serve.engines`):

* ``encode_images(pixels)`` / ``encode_texts(tokens)`` return float32 L2-normalised embeddings ``[B, E]`` as torch
  tensors **on the engine's own device** (``engine.device``); callers that need host data call ``.cpu()``. On CUDA
  nothing is copied to the host per call: inputs are read from, and outputs written to, torch CUDA tensors
  (ONNX Runtime through I/O binding, TensorRT through tensor addresses), on a private stream ordered after the
  caller's current stream and before its later work (GPU-side waits). The engines add no host synchronisation:
  TensorRT's ``execute_async_v3`` only enqueues, and ONNX Runtime runs with the run option
  ``disable_synchronize_execution_providers=1``, so ``run_with_iobinding`` does not wait for the stream at its end
  (it may still wait inside a run for a device-to-host copy feeding a node it placed on the CPU, e.g. shape
  arithmetic). A caller reading the results on the host synchronises by its own ``.cpu()`` (or an explicit sync).
* ``encode_images_with_order(pixels)`` returns ``(embeddings, belief_order [B, T] int64 | None)``: the gate's own
  order, from the image graph's second output ``belief_order``; ``None`` for graphs without one (plain CLIP, the
  ``2belief`` gate, exports made before the output existed).
* Pixels must be floating point ``[B, 3, S, S]`` and tokens int64/int32 ``[B, L <= context]`` with ids in
  ``[0, vocab_size)``; anything else is a ``ValueError``. Token batches are cut to their longest caption (EOT + 1,
  at least 2), exactly like the reference's ``trim_text``; PIR's are not (it attends to its [PAD] tokens: its ids
  run exactly as tokenised, :func:`priorclip.preprocess.preprocess_for`).
* A missing or damaged export file, or a missing runtime, is a :class:`~priorclip.errors.PriorCLIPError` of one line.

The CPU ONNX Runtime path keeps numpy in and out (``session.run``), which is what ORT's CPU provider wants.

Engines are not thread-safe: each keeps per-tower runtime state between calls (TensorRT execution contexts, ONNX
Runtime I/O bindings, one private CUDA stream). Use one engine per thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from priorclip.config import FAMILY_PRIORCLIP, config_from_dict
from priorclip.errors import PriorCLIPError

from .onnx_export import IMAGE_INPUT, MIN_TEXT_LEN, ORDER_OUTPUT, OUTPUT, TEXT_INPUT

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
# Ops that carry the FLOPs: on a CUDA session, one of these placed on the CPU makes it a CPU engine in disguise.
# (ONNX Runtime legitimately puts shape arithmetic on the CPU, so "any node on CPU" is not the test.)
COMPUTE_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "FusedConv", "MatMul", "MatMulInteger",
                         "QLinearMatMul", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "Gemm",
                         "FusedGemm", "Attention", "MultiHeadAttention"})
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
              "tensor(int32)": torch.int32}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_EMB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ORDER_DTYPES = (torch.int64, torch.int32)
_PIXEL_DTYPES = (torch.float32, torch.float16)
_TOKEN_DTYPES = (torch.int64, torch.int32)
ONNX_OPTIONS = ("threads", "io_binding")  # open_engine keyword options; only ONNX Runtime engines take any
ORT_INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / "manifest.json"
    if not path.is_file():
        raise PriorCLIPError(f"{export_dir}: no manifest.json (not a priorclip-export directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PriorCLIPError(f"{path}: not valid JSON ({e})") from None


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Cut [B, L] token ids to the longest row's EOT + 1 (exact: causal mask + EOT pooling)."""
    if tokens.shape[0] == 0:
        return tokens
    n = max(int(tokens.argmax(dim=-1).max()) + 1, MIN_TEXT_LEN)
    return tokens[:, : min(n, tokens.shape[1])]


def check_io(where: str, tower: str, inputs: dict[str, torch.dtype | str],
             outputs: dict[str, torch.dtype | str]) -> bool:
    """Check a graph's / plan's own I/O (name -> dtype, or the runtime's type name where torch has none) against
    what a priorclip ``tower`` has; True when it has ``belief_order``.

    A wrong name or dtype is one error line: binding by position would silently read the wrong tensor, and a wrong
    input type would hand the runtime bytes it reads as something else.
    """
    image = tower == "image"
    want_in = IMAGE_INPUT if image else TEXT_INPUT
    allowed = {OUTPUT, ORDER_OUTPUT} if image else {OUTPUT}
    if list(inputs) != [want_in]:
        raise PriorCLIPError(f"{where}: inputs {list(inputs)}, expected ['{want_in}'] "
                             f"(not a priorclip {tower} encoder)")
    in_types = _PIXEL_DTYPES if image else _TOKEN_DTYPES
    if inputs[want_in] not in in_types:
        raise PriorCLIPError(f"{where}: input '{want_in}' is {inputs[want_in]}, expected "
                             f"{' or '.join(map(str, in_types))}")
    unexpected = sorted(set(outputs) - allowed)
    if OUTPUT not in outputs or unexpected:
        raise PriorCLIPError(f"{where}: outputs {sorted(outputs)}, expected '{OUTPUT}'"
                             + (f" and optionally '{ORDER_OUTPUT}'" if tower == "image" else "")
                             + (f"; unexpected: {', '.join(unexpected)}" if unexpected else ""))
    if outputs[OUTPUT] not in _EMB_DTYPES:
        raise PriorCLIPError(f"{where}: output '{OUTPUT}' is {outputs[OUTPUT]}, expected a float type")
    if ORDER_OUTPUT in outputs and outputs[ORDER_OUTPUT] not in _ORDER_DTYPES:
        raise PriorCLIPError(f"{where}: output '{ORDER_OUTPUT}' is {outputs[ORDER_OUTPUT]}, expected int64")
    return ORDER_OUTPUT in outputs


def _cuda_device(device: str | torch.device, what: str) -> torch.device:
    """The CUDA device to run ``what`` on, or one error line saying why there is none."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise PriorCLIPError(f"{what} runs on CUDA devices, not {dev}")
    if not torch.cuda.is_available():
        raise PriorCLIPError(f"{what} needs a CUDA device and a CUDA build of torch; neither is available here")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PriorCLIPError(f"{path}: {what} is missing (an incomplete or moved export directory); re-export it")
    return path


def _import_ort():
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or a broken install failing on its native libraries
        raise PriorCLIPError(f"ONNX Runtime is not installed ({_first_line(e)}); install it with: "
                             f"{ORT_INSTALL_HINT}") from None
    return ort


class _CudaStream:
    """A private stream for runtimes that take a raw stream handle (ONNX Runtime's ``user_compute_stream``,
    TensorRT's ``execute_async_v3``). :meth:`begin` orders it after the caller's current stream (the input copy),
    :meth:`end` orders the caller's stream after it, both on the GPU: no host synchronisation, and inputs and
    outputs allocated on the caller's stream are never reused before the runtime is done with them. A private
    stream because ONNX Runtime treats stream handle 0 (torch's default stream) as "none"."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.handle = int(self.stream.cuda_stream)

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def end(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


class _Base:
    device: torch.device
    has_order: bool

    def __init__(self, export_dir: Path, manifest: dict) -> None:
        self.export_dir = Path(export_dir)
        self.metadata = manifest
        self.precision = manifest["precision"]
        cfg = manifest["model"]["config"]
        self.config = config_from_dict(cfg)
        self.image_size = self.config.vision.image_size
        self.num_tokens = self.config.vision.num_tokens
        self.context_length = int(cfg["text"]["context_length"])
        vocab = cfg["text"].get("vocab_size")
        self.vocab_size = int(vocab) if vocab else None  # ids outside [0, vocab) index past the embedding table
        self.embed_dim = int(cfg["embed_dim"])
        self.max_batch = int(manifest["io"]["batch"]["max"])
        # What the manifest promises; engines that can ask their runtime replace it with the graph's own answer.
        self.has_order = any(o.get("name") == ORDER_OUTPUT for o in manifest["io"]["image"].get("outputs", []))

    def _chunks(self, x: torch.Tensor):
        for s in range(0, x.shape[0], self.max_batch):
            yield x[s : s + self.max_batch]

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"encode_images expects pixels [B,3,{s},{s}], got {_describe(pixels)}")
        if not pixels.is_floating_point():
            raise ValueError(f"encode_images expects float pixels (EvalTransform output), got {pixels.dtype}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"encode_texts expects token ids [B,L<={self.context_length}], got {_describe(tokens)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"encode_texts expects int64 token ids, got {tokens.dtype}")
        # An out-of-range id is an error in ONNX Runtime's CPU Gather but reads past the table on a GPU: check it
        # here, with one reduction (trim_tokens reads the ids on the host anyway).
        if self.vocab_size and tokens.numel():
            lo, hi = (int(v) for v in tokens.aminmax())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"encode_texts expects token ids in [0, {self.vocab_size}), got ids from {lo} to "
                                 f"{hi} (a tokenizer for another vocabulary?)")

    def _empty_order(self) -> torch.Tensor | None:
        return torch.zeros(0, self.num_tokens, dtype=torch.int64, device=self.device) if self.has_order else None

    def encode_images_with_order(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, E] float32 embeddings, [B, T] int64 belief order or None), on :attr:`device`."""
        self._check_pixels(pixels)
        if pixels.shape[0] == 0:
            return torch.zeros(0, self.embed_dim, device=self.device), self._empty_order()
        parts = [self._run_image(c, self.has_order) for c in self._chunks(pixels)]
        return _cat([p[0] for p in parts]), (_cat([p[1] for p in parts]) if self.has_order else None)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        if pixels.shape[0] == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return _cat([self._run_image(c, False)[0] for c in self._chunks(pixels)])

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        if tokens.shape[0] == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        if self.config.family != FAMILY_PRIORCLIP:  # PIR attends to its padding: the ids run as given
            return _cat([self._run_text(c) for c in self._chunks(tokens.long())])
        return _cat([self._run_text(trim_tokens(c)) for c in self._chunks(tokens.long())])

    def _run_image(self, pixels: torch.Tensor, with_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _run_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.precision} {self.export_dir}>"


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one chunk: hand back the runtime's own buffer


def _describe(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


# ------------------------------------------------------------------------------------------------- ONNX Runtime


def check_providers(session, provider: str, where: str) -> None:
    """Refuse a session whose first provider is not the one asked for.

    ONNX Runtime does not fail when the CUDA provider cannot start (missing or mismatched CUDA/cuDNN libraries): it
    logs a warning and hands back a CPU session, which would be timed and reported as "CUDA".
    """
    got = list(session.get_providers())
    if not got or got[0] != provider:
        import onnxruntime as ort

        hint = (f"onnxruntime {ort.__version__} could not start its CUDA provider (usually the CUDA/cuDNN libraries "
                "it was built for are missing or mismatched: import torch first, or call onnxruntime.preload_dlls() "
                "where it exists, and check the ONNX Runtime warning above)") if provider == CUDA_EP else \
            f"{provider} did not start"
        raise PriorCLIPError(f"{where}: ONNX Runtime gave a session on {got or 'no provider'} instead of {provider}; "
                             f"{hint}. Refusing to run it as a {provider} engine")


def node_placement(session) -> dict[str, dict[str, int]] | None:
    """Provider -> {op type: node count} after ONNX Runtime's partitioning, or None where this ORT cannot say
    (needs ``session.record_ep_graph_assignment_info=1`` and ORT >= 1.23)."""
    fn = getattr(session, "get_provider_graph_assignment_info", None)
    if fn is None:
        return None
    try:
        subgraphs = fn()
    except Exception:  # noqa: BLE001 - recording not enabled, or an ORT without the feature
        return None
    out: dict[str, dict[str, int]] = {}
    for sg in subgraphs:
        counts = out.setdefault(sg.ep_name, {})
        for node in sg.get_nodes():
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return out or None


def check_placement(placement: dict[str, dict[str, int]] | None, provider: str, where: str) -> None:
    """On an accelerator provider, refuse a partition that left compute ops (:data:`COMPUTE_OPS`) on the CPU."""
    if not placement or provider == CPU_EP:
        return
    on_cpu = {op: n for op, n in placement.get(CPU_EP, {}).items() if op in COMPUTE_OPS}
    if on_cpu:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(on_cpu.items()))
        raise PriorCLIPError(f"{where}: ONNX Runtime placed compute nodes on the CPU ({ops}) because {provider} has "
                             f"no kernel for them, so this would run as a CPU engine; export this graph for the GPU "
                             f"target or use the CPU provider")


class OnnxEngine(_Base):
    """ONNX Runtime over ``image_encoder.onnx`` / ``text_encoder.onnx`` of the export.

    ``io_binding`` (default: on for CUDA) binds torch tensors as inputs and preallocated torch tensors as outputs
    (``IOBinding`` + ``run_with_iobinding``) instead of passing numpy arrays; on CPU it is available for zero-copy
    use and for tests, but ``session.run`` with numpy is the default there. One ``IOBinding`` per tower is kept and
    cleared after each call (so the engine, like every engine here, is not for concurrent use from several threads).
    """

    def __init__(self, export_dir: Path, manifest: dict, device: str = "cpu", provider: str | None = None,
                 threads: int | None = None, io_binding: bool | None = None) -> None:
        super().__init__(export_dir, manifest)
        ort = _import_ort()

        dev = torch.device(device)
        if provider is None:
            provider = CUDA_EP if dev.type == "cuda" else CPU_EP
        if provider not in ort.get_available_providers():
            raise PriorCLIPError(
                f"ONNX Runtime provider {provider} is not available (have: {', '.join(ort.get_available_providers())})"
                + ("; install onnxruntime-gpu" if provider == CUDA_EP else ""))
        self.provider = provider
        self._stream: _CudaStream | None = None
        self._run_options = None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if provider == CUDA_EP:
            self.device = _cuda_device(dev if dev.type == "cuda" else "cuda", "ONNX Runtime's CUDA provider")
            self._stream = _CudaStream(self.device)
            # TF32 off: fp32 means fp32. ORT runs on our stream so the caller's stream can be ordered around it.
            opts = {"device_id": self.device.index, "use_tf32": 0, "has_user_compute_stream": 1,
                    "user_compute_stream": str(self._stream.handle)}
            providers = [(provider, opts), CPU_EP]  # CPU only for the shape arithmetic ORT puts there itself
            so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
            # Without this Run ends with a stream synchronise; _CudaStream.end() orders the outputs instead.
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            self.device = torch.device("cpu")
            providers = [provider]
        # Where bound buffers live, as ORT names it (from the provider: tests stand the CPU in for the CUDA device).
        self._bind_at = ("cuda" if provider == CUDA_EP else "cpu", self.device.index or 0)
        self.io_binding = (provider == CUDA_EP) if io_binding is None else bool(io_binding)
        if provider == CUDA_EP and not self.io_binding:
            raise PriorCLIPError("the CUDA provider always runs with I/O binding (device tensors in and out)")
        files = manifest["files"]
        self.node_placement: dict[str, dict | None] = {}
        self._outputs: dict[str, dict[str, torch.dtype]] = {}
        self._inputs: dict[str, torch.dtype] = {}
        self._widths: dict[str, dict[str, int]] = {}
        self._bindings: dict = {}
        sessions = {}
        for tower in ("image", "text"):
            path = _require_file(self.export_dir / files[tower], f"the {tower} graph")
            try:
                sess = ort.InferenceSession(str(path), so, providers=providers)
            except Exception as e:  # InvalidProtobuf, NoSuchFile, Fail (a missing .onnx.data), ...: one line
                raise PriorCLIPError(f"{path.name}: ONNX Runtime could not load this graph ({_first_line(e)}); a "
                                     "damaged or incomplete export (the .onnx and its .onnx.data belong together): "
                                     "re-export it") from None
            check_providers(sess, provider, path.name)
            if hasattr(sess, "disable_fallback"):
                sess.disable_fallback()  # an EP failure while running must raise, not silently rerun on the CPU
            if provider != CPU_EP:
                self.node_placement[tower] = node_placement(sess)
                check_placement(self.node_placement[tower], provider, path.name)
            outputs = {}
            for o in sess.get_outputs():
                if o.type not in _ORT_TYPES:
                    raise PriorCLIPError(f"{path.name}: output {o.name!r} has type {o.type}, which priorclip "
                                         "cannot bind")
                outputs[o.name] = _ORT_TYPES[o.type]
            inputs = {i.name: _ORT_TYPES.get(i.type, i.type) for i in sess.get_inputs()}
            has_order = check_io(path.name, tower, inputs, outputs)
            if tower == "image":
                self.has_order = has_order  # the graph decides: exports older than the order output have none
            self._outputs[tower], self._inputs[tower] = outputs, inputs[IMAGE_INPUT if tower == "image" else TEXT_INPUT]
            self._widths[tower] = {o.name: _output_width(o, manifest["io"][tower], path.name)
                                   for o in sess.get_outputs()}
            if self.io_binding:
                self._bindings[tower] = sess.io_binding()
            sessions[tower] = sess
        self.image_session, self.text_session = sessions["image"], sessions["text"]
        short = "cuda" if provider == CUDA_EP else provider.removesuffix("ExecutionProvider").lower()
        self.name = f"onnxruntime-{short}"

    def _bound(self, session, tower: str, in_name: str, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        """Run with I/O binding: ``x`` (on :attr:`device`) in, preallocated tensors on :attr:`device` out."""
        x = x.contiguous()
        binding, (where, index) = self._bindings[tower], self._bind_at
        try:
            binding.bind_input(in_name, where, index, _NUMPY[x.dtype], tuple(x.shape), x.data_ptr())
            outs = []
            for name in names:  # only the outputs asked for are bound, so only those are computed
                t = torch.empty(x.shape[0], self._widths[tower][name], dtype=self._outputs[tower][name],
                                device=self.device)
                binding.bind_output(name, where, index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
                outs.append(t)
            if self._stream is None:
                session.run_with_iobinding(binding)
            else:
                self._stream.begin()
                try:
                    session.run_with_iobinding(binding, self._run_options)
                finally:  # ORT raising may have enqueued work that still uses x and the outputs
                    self._stream.end()
        finally:  # the binding holds raw pointers into tensors this call owns: drop them
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        return outs

    def _run(self, session, tower: str, in_name: str, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        if self.io_binding:
            return self._bound(session, tower, in_name, x.to(self.device), names)
        res = session.run(names, {in_name: x.detach().cpu().contiguous().numpy()})
        return [torch.from_numpy(r) for r in res]

    def _run_image(self, pixels: torch.Tensor, with_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        names = [OUTPUT, ORDER_OUTPUT] if with_order and self.has_order else [OUTPUT]
        outs = self._run(self.image_session, "image", IMAGE_INPUT, pixels.detach().to(self._inputs["image"]), names)
        return outs[0].float(), (outs[1].long() if len(outs) > 1 else None)

    def _run_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.detach().to(self._inputs["text"])
        return self._run(self.text_session, "text", TEXT_INPUT, x, [OUTPUT])[0].float()


def _output_width(output, io: dict, where: str) -> int:
    """The static width of a [batch, width] graph output: the graph's own, else the manifest's."""
    width = output.shape[-1] if output.shape else None
    if not isinstance(width, int):
        width = next((o["shape"][-1] for o in io.get("outputs", []) if o.get("name") == output.name), None)
    if not isinstance(width, int):
        raise PriorCLIPError(f"{where}: output {output.name!r} has no static width (shape {output.shape}) and the "
                             "manifest gives none; priorclip cannot preallocate it")
    return width


# ------------------------------------------------------------------------------------------------- AOTInductor


class AotiEngine(_Base):
    """AOTInductor packages (``*.pt2``), compiled for the device recorded in the manifest."""

    def __init__(self, export_dir: Path, manifest: dict, device: str = "cpu") -> None:
        super().__init__(export_dir, manifest)
        built_for = manifest.get("aoti", {}).get("device", "cpu")
        if torch.device(device).type != torch.device(built_for).type:
            raise PriorCLIPError(f"this AOTInductor package was compiled for {built_for}, not {device}; "
                                 f"re-export with --device {torch.device(device).type}")
        self.device = torch.device(device)
        from torch._inductor import aoti_load_package

        def load(tower: str):
            path = _require_file(self.export_dir / manifest["files"][tower], f"the {tower} AOTInductor package")
            try:
                return aoti_load_package(str(path))
            except Exception as e:  # RuntimeError "not a ZIP archive", a package from another torch, ...
                raise PriorCLIPError(f"{path.name}: torch {torch.__version__} could not load this AOTInductor "
                                     f"package ({_first_line(e)}); re-export it with this torch") from None

        self._image, self._text = load("image"), load("text")
        self.name = f"aoti-{self.device.type}"

    def _run_image(self, pixels: torch.Tensor, with_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.inference_mode():
            out = self._image(pixels.to(self.device, torch.float32).contiguous())
        if isinstance(out, (tuple, list)):  # (embeddings, belief_order) where the gate ranks
            return out[0].float(), (out[1].long() if with_order and len(out) > 1 else None)
        return out.float(), None

    def _run_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._text(tokens.to(self.device, torch.int64).contiguous())
        return (out[0] if isinstance(out, (tuple, list)) else out).float()


# ------------------------------------------------------------------------------------------------- TensorRT


class TrtEngine(_Base):
    """A serialised TensorRT plan per tower, run with torch CUDA tensors as I/O buffers.

    Names, modes and dtypes of the I/O tensors come from the engine itself (:func:`.tensorrt.engine_io`); every
    output the plan has is bound (TensorRT requires it), ``belief_order`` only returned when asked for. Every
    ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` result is checked.
    """

    def __init__(self, export_dir: Path, manifest: dict, device: str = "cuda") -> None:
        super().__init__(export_dir, manifest)
        from .tensorrt import engine_io, import_tensorrt

        trt = import_tensorrt()
        self.device = _cuda_device(device if torch.device(device).type == "cuda" else "cuda", "TensorRT")
        self._stream = _CudaStream(self.device)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        plans = manifest["tensorrt"]["engines"]
        self._profiles = manifest["tensorrt"].get("profiles", {})
        self._engines, self._contexts, self._io = {}, {}, {}
        for tower in ("image", "text"):
            data = _require_file(self.export_dir / plans[tower], f"the TensorRT {tower} plan").read_bytes()
            eng = runtime.deserialize_cuda_engine(data)
            if eng is None:
                raise PriorCLIPError(f"{plans[tower]}: TensorRT could not deserialise the plan (version mismatch?)")
            io = engine_io(trt, eng, plans[tower])
            has_order = check_io(plans[tower], tower, {n: v["dtype"] for n, v in io.items() if v["mode"] == "input"},
                                 {n: v["dtype"] for n, v in io.items() if v["mode"] == "output"})
            if tower == "image":
                self.has_order = has_order
            ctx = eng.create_execution_context()
            if ctx is None:
                raise PriorCLIPError(f"{plans[tower]}: TensorRT could not create an execution context (out of memory?)")
            self._engines[tower], self._contexts[tower], self._io[tower] = eng, ctx, io
        self.name = "tensorrt"

    def _profile(self, tower: str, name: str) -> str:
        p = self._profiles.get(tower, {}).get(name)
        return f" (profile min {p['min']}, max {p['max']})" if p else ""

    def _run(self, tower: str, x: torch.Tensor, in_name: str) -> dict[str, torch.Tensor]:
        ctx, io = self._contexts[tower], self._io[tower]
        x = x.to(self.device, io[in_name]["dtype"]).contiguous()
        if x.data_ptr() % 256:  # TensorRT wants 256-byte aligned I/O; a row slice of a batch may not be
            x = x.clone()
        shape = tuple(x.shape)
        if not ctx.set_input_shape(in_name, shape):
            raise PriorCLIPError(f"TensorRT {tower} engine rejected input shape {list(shape)} for "
                                 f"'{in_name}'{self._profile(tower, in_name)}")
        if not ctx.set_tensor_address(in_name, x.data_ptr()):
            raise PriorCLIPError(f"TensorRT {tower} engine refused the address of input '{in_name}'")
        outs = {}
        for name, spec in io.items():
            if spec["mode"] != "output":
                continue
            out_shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in out_shape):
                raise PriorCLIPError(f"TensorRT {tower} engine could not infer the shape of output '{name}' "
                                     f"({list(out_shape)}) for input {list(shape)}")
            t = torch.empty(out_shape, dtype=spec["dtype"], device=self.device)
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise PriorCLIPError(f"TensorRT {tower} engine refused the address of output '{name}'")
            outs[name] = t
        self._stream.begin()
        try:
            ok = ctx.execute_async_v3(self._stream.handle)
        finally:  # also when it raises: the caller's stream must not run ahead of anything enqueued
            self._stream.end()
        if not ok:
            raise PriorCLIPError(f"TensorRT {tower} engine failed to enqueue (see the TensorRT log above)")
        return outs

    def _run_image(self, pixels: torch.Tensor, with_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        outs = self._run("image", pixels.detach(), IMAGE_INPUT)
        order = outs.get(ORDER_OUTPUT) if with_order else None
        return outs[OUTPUT].float(), (None if order is None else order.long())

    def _run_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run("text", tokens.detach(), TEXT_INPUT)[OUTPUT].float()


def open_engine(export_dir: str | Path, device: str = "cpu", provider: str | None = None, **kwargs):
    """Open an export directory as an :class:`~priorclip.encoder.Encoder` (``.name``, ``.precision``, ``.metadata``,
    ``.device``, ``encode_images_with_order``).

    ``kwargs``: ONNX Runtime options (:data:`ONNX_OPTIONS`: ``threads``, ``io_binding``); passing one for another
    format is an error rather than silently ignored. ``provider`` is ONNX Runtime's and ignored by other formats.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    fmt = manifest.get("format")
    onnx_graphs = fmt in ("onnx", "triton-repo")  # a Triton repository's manifest points at its model.onnx files
    unsupported = sorted(set(kwargs) - set(ONNX_OPTIONS if onnx_graphs else ()))
    if unsupported and fmt in ("onnx", "aoti", "trt", "triton-repo"):
        raise PriorCLIPError(f"open_engine: option {', '.join(unsupported)} does not apply to this {fmt} export "
                             f"({export_dir}); only ONNX exports take options ({', '.join(ONNX_OPTIONS)})")
    if onnx_graphs:
        return OnnxEngine(export_dir, manifest, device, provider, **kwargs)
    if fmt == "aoti":
        return AotiEngine(export_dir, manifest, device)
    if fmt == "trt":
        if not manifest.get("tensorrt", {}).get("engines"):
            raise PriorCLIPError(f"{export_dir}: the TensorRT engines were never built (tensorrt was missing at "
                                 "export); re-export with --format onnx, or with --format trt on a TensorRT host")
        return TrtEngine(export_dir, manifest, device)
    raise PriorCLIPError(f"{export_dir}/manifest.json: unknown format {fmt!r}")
