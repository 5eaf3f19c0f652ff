"""TensorRT engines from the exported ONNX: strongly typed networks, explicit Q/DQ, one optimisation profile.

TensorRT 10 deprecated, and 11 removes, weak typing, the ``FP16``/``INT8`` builder flags and the implicit-quantisation
calibrators. So precision is decided by the ONNX alone: the fp32 graph, the fp16 graph (fp16 weights/activations,
fp32 where :mod:`.fp16` keeps it) or the Q/DQ graph (:mod:`.quantize`), parsed into a network created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; no precision flag is ever set. The one flag touched is ``TF32``
(on by default): it is cleared for fp32 builds, so an fp32 plan computes in fp32.

Nothing here runs without ``tensorrt``: :func:`import_tensorrt` raises one clear line with what to install. The
profile and flag choices are plain functions so they are unit-tested with a stand-in module.
"""

from __future__ import annotations

import time
from pathlib import Path

from priorclip.errors import PriorCLIPError

from .onnx_export import IMAGE_INPUT, MIN_TEXT_LEN, TEXT_INPUT

INSTALL_HINT = ("pip install tensorrt --extra-index-url https://pypi.nvidia.com "
                "(TensorRT >= 10 from NVIDIA's index; needs an NVIDIA GPU and driver)")
OPT_BATCH = 64  # profile 'opt' batch: the serving batcher's usual size
OPT_TEXT_LEN = 32  # RS captions are 15-30 tokens; engines cut each batch to its longest caption


class TensorRTMissing(PriorCLIPError):
    pass


def import_tensorrt():
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        why = str(e).splitlines()[0] if str(e) else "no module"
        raise TensorRTMissing(
            f"TensorRT is not installed ({type(e).__name__}: {why}); install it with: {INSTALL_HINT}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTMissing(f"TensorRT {trt.__version__} is too old (strongly typed networks need >= 10); "
                              f"upgrade with: {INSTALL_HINT}")
    return trt


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]

        return str(trt.__version__)
    except Exception:
        return None


def profile_shapes(tower: str, image_size: int, context_length: int, max_batch: int,
                   opt_batch: int | None = None) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input for one optimisation profile covering batch 1..max_batch."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    opt = max(1, min(opt_batch or OPT_BATCH, max_batch))
    if tower == "image":
        s = image_size
        return {IMAGE_INPUT: ((1, 3, s, s), (opt, 3, s, s), (max_batch, 3, s, s))}
    if tower == "text":
        lo = min(MIN_TEXT_LEN, context_length)
        mid = max(lo, min(OPT_TEXT_LEN, context_length))
        return {TEXT_INPUT: ((1, lo), (opt, mid), (max_batch, context_length))}
    raise ValueError(f"unknown tower {tower!r}")


def network_flags(trt) -> int:
    """Strongly typed network creation flags (explicit batch is implicit since TensorRT 10)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def configure_builder(trt, builder, shapes: dict, timing_cache: bytes = b"", workspace_bytes: int | None = None,
                      tf32: bool = False):
    """Builder config: one profile with ``shapes``, the timing cache, optional workspace; no precision flags.

    ``tf32=False`` (fp32 exports) clears ``BuilderFlag.TF32``: TensorRT enables it by default, and a strongly typed
    network still lets FP32 convolutions and matmuls run with 10-bit-mantissa inputs, so the plan would not be fp32.
    """
    config = builder.create_builder_config()
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    cache = config.create_timing_cache(timing_cache)
    # set_timing_cache returns False for a cache from another TensorRT version or device (ignore_mismatch=False):
    # building on without it would silently re-time every tactic and write a cache nobody asked for.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        what = "an empty timing cache" if not timing_cache else f"the {len(timing_cache)}-byte timing cache"
        raise PriorCLIPError(f"TensorRT rejected {what} (made by another TensorRT version or GPU?); delete "
                             "timing.cache in the output folder and export again")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    return config


def build_engine(onnx_path: str | Path, plan_path: str | Path, shapes: dict, timing_cache_path: str | Path,
                 workspace_bytes: int | None = None, trt=None, tf32: bool = False) -> dict:
    """Parse ``onnx_path`` strongly typed, build and serialise the plan; update the timing cache file.

    ``tf32``: let FP32 layers use TF32 (fp16/int8 exports, whose fp32 islands need not be exact); off for fp32.
    """
    trt = trt or import_tensorrt()
    onnx_path, plan_path, timing_cache_path = Path(onnx_path), Path(plan_path), Path(timing_cache_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PriorCLIPError(f"TensorRT could not parse {onnx_path.name}: {errs[:500]}")
    cache = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    config = configure_builder(trt, builder, shapes, cache, workspace_bytes, tf32)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PriorCLIPError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    from priorclip.cliutils import atomic_write

    for path, blob in ((plan_path, plan), (timing_cache_path, config.get_timing_cache().serialize())):
        with atomic_write(path) as tmp:  # a build cut off mid-write never leaves half a plan or cache behind
            tmp.write_bytes(bytes(blob))
    return {"plan": plan_path.name, "build_seconds": round(time.perf_counter() - t0, 2),
            "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in shapes.items()}}


def torch_dtypes(trt) -> dict:
    """TensorRT ``DataType`` -> torch dtype, for the types :func:`~.engines.check_io` accepts on a priorclip plan's
    I/O (float pixels / int token ids in; float embeddings / int order out); members this version lacks are
    skipped. Any other type is refused by :func:`engine_io` with one error line."""
    import torch

    pairs = (("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT32", torch.int32),
             ("INT64", torch.int64))
    return {getattr(trt.DataType, n): t for n, t in pairs if hasattr(trt.DataType, n)}


def engine_io(trt, engine, where: str = "TensorRT engine") -> dict[str, dict]:
    """The engine's own I/O tensors: name -> {"mode": "input"|"output", "dtype": torch dtype}, read with
    ``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` / ``get_tensor_dtype`` rather than assumed from
    the ONNX (output shapes come from the execution context per call)."""
    dtypes = torch_dtypes(trt)
    modes = {trt.TensorIOMode.INPUT: "input", trt.TensorIOMode.OUTPUT: "output"}
    out: dict[str, dict] = {}
    for i in range(int(engine.num_io_tensors)):
        name = engine.get_tensor_name(i)
        mode = modes.get(engine.get_tensor_mode(name))
        if mode is None:
            continue
        dt = engine.get_tensor_dtype(name)
        if dt not in dtypes:
            raise PriorCLIPError(f"{where}: I/O tensor {name!r} has TensorRT type {dt}, which priorclip cannot bind")
        out[name] = {"mode": mode, "dtype": dtypes[dt]}
    return out
