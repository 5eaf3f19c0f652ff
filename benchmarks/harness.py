"""Timing harness: latency percentiles, throughput, peak memory and achieved TFLOP/s per engine and batch size.

Method (the same for every backend, so the rows compare):

- inputs: a pool of distinct batches, made once and rotated per iteration, so caches and CUDA-graph input reuse do
  not flatter a backend that would otherwise see the same tensor every time; on GPU they sit on the device already;
- warm-up calls are separate and untimed (they also absorb compilation and autotuning);
- on GPU each call is timed with a pair of ``torch.cuda.Event`` s and one synchronisation at the end; on CPU with
  ``time.perf_counter`` around the call (CPU backends return when their work is done);
- throughput = batch / mean latency; achieved TFLOP/s = batch x FLOPs per item / mean latency, where FLOPs per item
  are counted on the model itself (``FlopCounterMode``, the same count as ``priorclip info``), at the text length the
  engine really runs (full context for fixed-length engines, the caption length for the trimming eager model);
- the machine's peak is measured in the same run by matrix products (fp16 and bf16 8192^3 on GPU; on CPU fp32 at a
  few sizes in torch and ONNX Runtime, the best of them), so "fraction of peak" needs no datasheet; on GPU every row is divided by the half-precision peak (the fp32
  matrix-product peak is recorded beside it).
"""

from __future__ import annotations

import io
import math
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from priorclip.config import ModelConfig
from priorclip.profile import _count
from priorclip.serve.engines import Engine
from priorclip.transforms import EvalTransform, open_image

TOWERS = ("image", "text")


@dataclass
class TimingRow:
    backend: str
    precision: str
    tower: str  # image | text
    batch: int
    tokens: int | None  # text length the engine ran (None for images)
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    items_per_s: float
    gflop_per_item: float
    tflops: float
    frac_peak: float | None
    peak_mem_mib: float | None
    mem_kind: str  # what peak_mem_mib measures

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[torch.Tensor], object], pool: Sequence[torch.Tensor], warmup: int, iters: int, device: torch.device
) -> list[float]:
    """Milliseconds of ``iters`` calls of ``fn`` rotating over ``pool``, after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(pool[i % len(pool)])
    _sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(pool[i % len(pool)])
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(pool[i % len(pool)])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def percentiles(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def rss_high_water_mib() -> float:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_peak_tflops(device: str | torch.device, quick: bool = False) -> dict[str, float]:
    """Dense matrix-product TFLOP/s of this machine, measured now: fp16 and bf16 (and fp32) on GPU, fp32 on CPU."""
    device = torch.device(device)
    out: dict[str, float] = {}
    if device.type == "cuda":
        n, iters = (4096, 5) if quick else (8192, 10)
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            ms = time_calls(
                lambda x, b=b: x @ b, [a], warmup=3, iters=iters if dt != torch.float32 else 3, device=device
            )
            out[name] = 2 * n**3 / (np.mean(ms) * 1e-3) / 1e12
            del a, b
        torch.cuda.empty_cache()
    else:
        # NOTE: measured on the 2-core AMD EPYC here: a 512^3 fp32 product ran at ~0.44 TFLOP/s in ONNX Runtime's
        # MLAS but 2048^3 at only ~0.20 (the large one streams from memory in this VM), and torch's MKL took a slower
        # path than MLAS on this AMD processor. The encoders' GEMMs are 512-768 wide, so the CPU peak is the best of
        # both libraries over a few cache-sized and large sizes.
        sizes, iters = ((256, 512), 3) if quick else ((512, 1024, 2048), 5)
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            ms = time_calls(lambda x, b=b: x @ b, [a], warmup=1, iters=iters, device=device)
            out["fp32_torch"] = max(out.get("fp32_torch", 0.0), 2 * n**3 / (min(ms) * 1e-3) / 1e12)
            ort_peak = _ort_matmul_tflops(n, iters)
            if ort_peak is not None:
                out["fp32_onnxruntime"] = max(out.get("fp32_onnxruntime", 0.0), ort_peak)
        out["fp32"] = max(v for k, v in out.items() if k.startswith("fp32_"))
    return out


def _ort_matmul_tflops(n: int, iters: int) -> float | None:
    """fp32 TFLOP/s of an n^3 MatMul in ONNX Runtime's CPU provider, or None without onnx/onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except Exception:  # noqa: BLE001 - optional
        return None
    spec = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("A", "B", "Y")]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "peak", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    feeds = {"A": a, "B": a}
    sess.run(None, feeds)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def peak_for(precision: str, peaks: dict[str, float]) -> float | None:
    """The peak every row is judged against: the machine's half-precision tensor-core peak where measured (GPU), so
    rows of every precision share one scale ("how much of this machine do we use"); the fp32 peak on CPU."""
    half = [peaks[k] for k in ("fp16", "bf16") if k in peaks]
    if half:
        return max(half)
    return peaks.get("fp32")


@lru_cache(maxsize=64)
def gflop_per_item(cfg: ModelConfig, tower: str, text_length: int | None = None) -> float:
    """FLOPs (2 x MAC) of one image, or one caption of ``text_length`` tokens, counted on a meta-device model."""
    from priorclip.model import PriorCLIP

    with torch.device("meta"):
        model = PriorCLIP(cfg).eval()
    model.trim_text = False
    with torch.no_grad():
        if tower == "image":
            s = cfg.vision.image_size
            flops = _count(lambda: model.encode_image(torch.empty(1, 3, s, s, device="meta")))
        else:
            length = text_length or cfg.text.context_length
            flops = _count(lambda: model.encode_text(torch.zeros(1, length, dtype=torch.long, device="meta")))
    return flops / 1e9


def make_token_batch(batch: int, length: int, context_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Random token ids [batch, context]: SOT, ``length - 2`` random ids, EOT at ``length - 1``, zero padding after."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context_length, dtype=torch.long)
    tokens[:, 0] = vocab_size - 2  # <start_of_text>
    if length > 2:
        tokens[:, 1 : length - 1] = torch.randint(1, vocab_size - 2, (batch, length - 2), generator=g)
    tokens[:, length - 1] = vocab_size - 1  # <end_of_text>, the highest id: EOT pooling finds it
    return tokens


def input_pool(
    engine: Engine, tower: str, batch: int, text_length: int, vocab_size: int, size: int | None = None
) -> list[torch.Tensor]:
    """Distinct input batches on the engine's device (fewer of the big ones, to bound memory)."""
    if size is None:
        size = 4 if batch <= 64 else 2
    dev = engine.device if engine.device.type == "cuda" else torch.device("cpu")
    if tower == "image":
        g = torch.Generator().manual_seed(1000 + batch)
        s = engine.image_size
        return [torch.randn(batch, 3, s, s, generator=g).to(dev) for _ in range(size)]
    return [
        make_token_batch(batch, text_length, engine.context_length, vocab_size, 2000 + batch * 7 + i).to(dev)
        for i in range(size)
    ]


def bench_engine(
    engine: Engine,
    cfg: ModelConfig,
    batch_sizes: Sequence[int],
    warmup: int,
    iters: int,
    text_length: int,
    peaks: dict[str, float],
    towers: Sequence[str] = TOWERS,
    on_row: Callable[[TimingRow], None] | None = None,
    free_before_build: int | None = None,
) -> list[TimingRow]:
    """Time ``engine`` for each tower and batch size; returns one :class:`TimingRow` each.

    ``free_before_build``: free device bytes measured before the engine was built, the baseline of the memory taken
    by runtimes that allocate outside torch (ONNX Runtime, TensorRT).
    """
    rows = []
    peak = peak_for(engine.precision, peaks)
    for tower in towers:
        for batch in batch_sizes:
            pool = input_pool(engine, tower, batch, text_length, cfg.text.vocab_size)
            fn = engine.encode_images if tower == "image" else engine.encode_texts
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(engine.device)
                free_before = free_before_build or torch.cuda.mem_get_info(engine.device)[0]
            ms = time_calls(fn, pool, warmup, iters, engine.device)
            if engine.device.type == "cuda":
                if engine.backend.startswith("torch"):
                    mem, kind = torch.cuda.max_memory_allocated(engine.device) / 2**20, "torch allocator peak"
                else:  # other runtimes allocate outside torch: device memory they hold, weights and arenas included
                    used = free_before - torch.cuda.mem_get_info(engine.device)[0]
                    mem, kind = max(used, 0) / 2**20, "device memory held since the engine was built (outside torch)"
            else:
                mem, kind = rss_high_water_mib(), "process RSS high-water"
            stats = percentiles(ms)
            tokens = None
            if tower == "text":
                tokens = engine.context_length if engine.fixed_text_length else text_length
            gflop = gflop_per_item(cfg, tower, tokens)
            tflops = batch * gflop / (stats["mean_ms"] * 1e-3) / 1e3
            row = TimingRow(
                engine.backend,
                engine.precision,
                tower,
                batch,
                tokens,
                iters,
                **stats,
                items_per_s=batch / (stats["mean_ms"] * 1e-3),
                gflop_per_item=gflop,
                tflops=tflops,
                frac_peak=tflops / peak if peak else None,
                peak_mem_mib=mem,
                mem_kind=kind,
            )
            rows.append(row)
            if on_row:
                on_row(row)
            del pool
    return rows


def prime(
    engine: Engine, cfg: ModelConfig, batch_sizes: Sequence[int], text_length: int, towers: Sequence[str] = TOWERS
) -> float:
    """One call per tower and batch size (compilation, autotuning, CUDA-graph capture happen here); seconds taken."""
    t0 = time.perf_counter()
    for tower in towers:
        fn = engine.encode_images if tower == "image" else engine.encode_texts
        for batch in batch_sizes:
            fn(input_pool(engine, tower, batch, text_length, cfg.text.vocab_size, size=1)[0])
    _sync(engine.device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- JPEG bytes -> embeddings


def make_jpegs(n: int, size: int = 256, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEG-encoded scenes from the generated set's drawing code (not one image repeated)."""
    from priorclip.synthetic import _scene, SCENES

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        _scene(SCENES[i % len(SCENES)], size, rng).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decode(transform: EvalTransform, data: bytes) -> torch.Tensor:
    return transform(open_image(data))


def decode_rate(jpegs: Sequence[bytes], image_size: int, workers: int) -> float:
    """Images/s of decode + eval transform alone (the CPU ceiling of the end-to-end rate)."""
    transform = EvalTransform(image_size)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda b: _decode(transform, b), jpegs[: min(len(jpegs), 4 * workers)]))  # warm
        t0 = time.perf_counter()
        list(pool.map(lambda b: _decode(transform, b), jpegs))
    return len(jpegs) / (time.perf_counter() - t0)


def e2e_rate(engine: Engine, jpegs: Sequence[bytes], batch: int, workers: int) -> dict[str, float]:
    """Images/s from JPEG bytes to embeddings on the host: threaded decode + transform, batched encode.

    All decodes are submitted up front, so decoding the next batch overlaps encoding this one, as a service would
    pipeline it. Includes the host-to-device copy and bringing the embeddings back to the host.
    """
    transform = EvalTransform(engine.image_size)
    # warm-up at the exact batch size (compiled engines are already specialised for it by the timing pass)
    engine.encode_images(torch.stack([_decode(transform, b) for b in jpegs[:batch]]))
    _sync(engine.device)
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(_decode, transform, b) for b in jpegs]
        for s in range(0, len(jpegs), batch):
            pixels = torch.stack([f.result() for f in futures[s : s + batch]])
            engine.encode_images(pixels).cpu()
        elapsed = time.perf_counter() - t0
    return {
        "n_images": len(jpegs),
        "batch": batch,
        "workers": workers,
        "seconds": elapsed,
        "images_per_s": len(jpegs) / elapsed,
    }


def default_workers() -> int:
    import os

    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def ceil_to(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)
