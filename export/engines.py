"""Engines over an export directory; each implements :class:`priorclip.encoder.Encoder`.

:func:`open_engine` reads ``manifest.json`` to learn the format: ONNX graphs run in ONNX Runtime (CPU provider by
default, CUDA on ``device="cuda"`` with TF32 off so fp32 parity is real fp32), AOTInductor packages through
``torch._inductor.aoti_load_package``, TensorRT plans through the ``tensorrt`` runtime.

Every engine feeds fp32 pixels and int64 tokens and returns fp32 L2-normalised embeddings; token batches are cut to
their longest caption (EOT + 1, at least 2), exactly like the reference's ``trim_text``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from priorclip.errors import PriorCLIPError

from .onnx_export import IMAGE_INPUT, MIN_TEXT_LEN, TEXT_INPUT


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


class _Base:
    def __init__(self, export_dir: Path, manifest: dict) -> None:
        self.export_dir = Path(export_dir)
        self.metadata = manifest
        self.precision = manifest["precision"]
        cfg = manifest["model"]["config"]
        self.image_size = int(cfg["vision"]["image_size"])
        self.context_length = int(cfg["text"]["context_length"])
        self.embed_dim = int(cfg["embed_dim"])
        self.max_batch = int(manifest["io"]["batch"]["max"])

    def _chunks(self, x: torch.Tensor):
        for s in range(0, x.shape[0], self.max_batch):
            yield x[s : s + self.max_batch]

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"encode_images expects pixels [B,3,{s},{s}], got {tuple(pixels.shape)}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"encode_texts expects token ids [B,L<={self.context_length}], got {tuple(tokens.shape)}")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        if pixels.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        return torch.cat([self._run_image(c) for c in self._chunks(pixels)])

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        if tokens.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        return torch.cat([self._run_text(trim_tokens(c)) for c in self._chunks(tokens.long())])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.precision} {self.export_dir}>"


class OnnxEngine(_Base):
    """ONNX Runtime over ``image_encoder.onnx`` / ``text_encoder.onnx`` of the export."""

    def __init__(self, export_dir: Path, manifest: dict, device: str = "cpu", provider: str | None = None,
                 threads: int | None = None) -> None:
        super().__init__(export_dir, manifest)
        import onnxruntime as ort

        dev = torch.device(device)
        if provider is None:
            provider = "CUDAExecutionProvider" if dev.type == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise PriorCLIPError(
                f"ONNX Runtime provider {provider} is not available (have: {', '.join(ort.get_available_providers())})"
                + ("; install onnxruntime-gpu" if provider == "CUDAExecutionProvider" else ""))
        if provider == "CUDAExecutionProvider":
            opts = {"device_id": dev.index or 0, "use_tf32": 0}
            providers = [(provider, opts), "CPUExecutionProvider"]
        else:
            providers = [provider]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        files = manifest["files"]
        self.image_session = ort.InferenceSession(str(self.export_dir / files["image"]), so, providers=providers)
        self.text_session = ort.InferenceSession(str(self.export_dir / files["text"]), so, providers=providers)
        self.provider = provider
        self.name = "onnxruntime-" + ("cuda" if provider == "CUDAExecutionProvider" else
                                      provider.removesuffix("ExecutionProvider").lower())

    def _run_image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.image_session.run(None, {IMAGE_INPUT: x})[0]).float()

    def _run_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
        return torch.from_numpy(self.text_session.run(None, {TEXT_INPUT: x})[0]).float()


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

        files = manifest["files"]
        self._image = aoti_load_package(str(self.export_dir / files["image"]))
        self._text = aoti_load_package(str(self.export_dir / files["text"]))
        self.name = f"aoti-{self.device.type}"

    def _run_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._image(pixels.to(self.device, torch.float32).contiguous()).float().cpu()

    def _run_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._text(tokens.to(self.device, torch.int64).contiguous()).float().cpu()


class TrtEngine(_Base):
    """A serialised TensorRT plan per tower, run with torch CUDA tensors as I/O buffers."""

    def __init__(self, export_dir: Path, manifest: dict, device: str = "cuda") -> None:
        super().__init__(export_dir, manifest)
        from .tensorrt import import_tensorrt

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise PriorCLIPError("TensorRT engines need a CUDA device")
        self.device = torch.device(device if torch.device(device).type == "cuda" else "cuda")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        plans = manifest["tensorrt"]["engines"]
        self._engines, self._contexts = {}, {}
        for tower in ("image", "text"):
            data = (self.export_dir / plans[tower]).read_bytes()
            eng = runtime.deserialize_cuda_engine(data)
            if eng is None:
                raise PriorCLIPError(f"{plans[tower]}: TensorRT could not deserialise the plan (version mismatch?)")
            self._engines[tower] = eng
            self._contexts[tower] = eng.create_execution_context()
        self.name = "tensorrt"

    def _run(self, tower: str, x: torch.Tensor, in_name: str) -> torch.Tensor:
        ctx = self._contexts[tower]
        x = x.to(self.device).contiguous()
        ctx.set_input_shape(in_name, tuple(x.shape))
        out = torch.empty(x.shape[0], self.embed_dim, device=self.device, dtype=torch.float32)
        ctx.set_tensor_address(in_name, x.data_ptr())
        ctx.set_tensor_address("embeddings", out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu()

    def _run_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("image", pixels.float(), IMAGE_INPUT)

    def _run_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run("text", tokens.long(), TEXT_INPUT)


def open_engine(export_dir: str | Path, device: str = "cpu", provider: str | None = None, **kwargs):
    """Open an export directory as an :class:`~priorclip.encoder.Encoder` (``.name``, ``.precision``, ``.metadata``)."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    fmt = manifest.get("format")
    if fmt == "onnx":
        return OnnxEngine(export_dir, manifest, device, provider, **kwargs)
    if fmt == "aoti":
        return AotiEngine(export_dir, manifest, device)
    if fmt == "trt":
        if not manifest.get("tensorrt", {}).get("engines"):
            raise PriorCLIPError(f"{export_dir}: the TensorRT engines were never built (tensorrt was missing at "
                                 "export); re-export with --format onnx, or with --format trt on a TensorRT host")
        return TrtEngine(export_dir, manifest, device)
    raise PriorCLIPError(f"{export_dir}/manifest.json: unknown format {fmt!r}")
