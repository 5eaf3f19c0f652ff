"""Timing harness: request latency, pipelined throughput, peak memory and achieved TFLOP/s per engine and batch size,
and the machine's load while timing (so a busy machine cannot pass off slow numbers as the engine's).

Method (the same for every backend, so the rows compare):

- inputs: a pool of distinct batches, made once and rotated per iteration, so caches and CUDA-graph input reuse do
  not flatter a backend that would otherwise see the same tensor every time; on GPU they sit on the device already
  and engines return device tensors (device tensor in, device tensor out for every backend);
- warm-up calls are separate and untimed (they also absorb compilation and autotuning);
- **request latency**: every call is synchronised (on GPU ``torch.cuda.synchronize`` after it) and timed with the
  host clock around it, which is what a caller waiting for one request sees. Percentiles are printed only where the
  samples support them: p90 from :data:`MIN_SAMPLES` ["p90"] (10) calls, p99 from 100, else "—";
- **pipelined throughput**: back-to-back calls with one synchronisation at the end, items/s = batch x calls /
  elapsed. On CPU every backend returns when its work is done, so the latency calls already run back to back and
  their total is the throughput measurement (no second pass); on GPU it is a second, unsynchronised pass;
- achieved TFLOP/s = batch x FLOPs per item x throughput, FLOPs counted on the model itself (``FlopCounterMode``,
  the same count as ``priorclip info``) at the text length the engine really runs (full context for fixed-length
  engines, the caption length for the trimming eager model, the batch's width for PIR, which runs its ids as given);
- inputs follow the model family (``cfg.family``): CLIP ids (SOT ... EOT) for PriorCLIP, BERT ids ([CLS] word
  pieces [PAD]) for PIR; images go through the model's own eval transform (:func:`priorclip.preprocess.preprocess_for`);
- the machine's peak is measured in the same run by matrix products (fp16 and bf16 8192^3 on GPU; on CPU fp32 at a
  few sizes in torch and ONNX Runtime, the best of them), so "fraction of peak" needs no datasheet; on GPU every row
  is divided by the half-precision peak (the fp32 matrix-product peak is recorded beside it);
- :class:`LoadMonitor` reads /proc (and nvidia-smi on GPU) around every timed point and every second in a background
  thread; :func:`assess_reliability` turns the readings and the timing spread into warnings.
"""

from __future__ import annotations

import io
import math
import os
import resource
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from priorclip.config import FAMILY_PIR, FAMILY_PRIORCLIP, AnyConfig
from priorclip.profile import _count
from priorclip.serve.engines import Engine
from priorclip.transforms import EvalTransform
from priorclip.wordpiece import CLS_ID, trim_padding

TOWERS = ("image", "text")

# A percentile is printed only from this many samples on (p99 of 50 samples is the 2nd-largest, not a p99).
MIN_SAMPLES = {"p90": 10, "p99": 100}

# When timings are flagged unreliable (see assess_reliability). Others' CPU share and steal are fractions of the
# machine's whole CPU capacity during the timed points: 10 % of 2 cores is 0.2 of a core taken from our threads on
# average, already enough to move CPU numbers by more than the differences the report ranks engines by.
OTHERS_CPU_SHARE_MAX = 0.10
STEAL_SHARE_MAX = 0.05
# Timing spread of one point: coefficient of variation of its latencies, and p90/p50 where p90 is printed.
CV_MAX = 0.15
P90_P50_MAX = 1.3
MIN_SAMPLES_FOR_SPREAD = 5


@dataclass
class TimingRow:
    backend: str
    precision: str
    tower: str  # image | text
    batch: int
    tokens: int | None  # text length the engine ran (None for images)
    iters: int  # latency samples (synchronised calls)
    p50_ms: float
    p90_ms: float | None  # None below MIN_SAMPLES["p90"] samples
    p99_ms: float | None  # None below MIN_SAMPLES["p99"] samples
    mean_ms: float
    cv: float  # std / mean of the latencies
    items_per_s: float  # pipelined throughput (back-to-back calls, one sync at the end)
    throughput_calls: int
    throughput_method: str
    gflop_per_item: float
    tflops: float
    frac_peak: float | None
    peak_mem_mib: float | None
    mem_kind: str  # what peak_mem_mib measures
    others_cpu_share: float | None = None  # other processes' share of the machine's CPU while this point ran
    unsteady: bool = False  # spread above CV_MAX or P90_P50_MAX

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[torch.Tensor], object], pool: Sequence[torch.Tensor], warmup: int, iters: int, device: torch.device
) -> list[float]:
    """Request latency: milliseconds of ``iters`` synchronised calls of ``fn`` rotating over ``pool``, after
    ``warmup`` untimed calls. Host clock around call + synchronisation, the time a waiting caller sees."""
    device = torch.device(device)
    for i in range(warmup):
        fn(pool[i % len(pool)])
    _sync(device)
    out = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(pool[i % len(pool)])
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_pipelined(
    fn: Callable[[torch.Tensor], object], pool: Sequence[torch.Tensor], calls: int, device: torch.device
) -> float:
    """Seconds for ``calls`` back-to-back calls with a single synchronisation at the end (throughput, not latency)."""
    device = torch.device(device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(pool[i % len(pool)])
    _sync(device)
    return time.perf_counter() - t0


def measure_point(
    fn: Callable[[torch.Tensor], object], pool: Sequence[torch.Tensor], warmup: int, iters: int, device: torch.device
) -> tuple[list[float], float, int, str]:
    """(latencies ms, pipelined seconds, pipelined calls, method) of one engine x tower x batch point."""
    device = torch.device(device)
    if device.type == "cuda":
        ms = time_calls(fn, pool, warmup, iters, device)
        return ms, time_pipelined(fn, pool, iters, device), iters, "back-to-back calls, one sync at the end"
    # CPU calls return when done: the synchronised latency calls are back-to-back calls already, so their total is the
    # pipelined measurement (a second pass would only double the CPU run time)
    ms = time_calls(fn, pool, warmup, iters, device)
    return ms, sum(ms) / 1e3, iters, "back-to-back calls (the latency calls; CPU calls are synchronous)"


def percentiles(ms: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / mean / cv of latencies; p90 and p99 are None where too few samples support them."""
    a = np.asarray(ms, dtype=np.float64)
    n = len(a)
    mean = float(a.mean())
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)) if n >= MIN_SAMPLES["p90"] else None,
        "p99_ms": float(np.percentile(a, 99)) if n >= MIN_SAMPLES["p99"] else None,
        "mean_ms": mean,
        "cv": float(a.std() / mean) if n > 1 and mean > 0 else 0.0,
    }


def is_unsteady(stats: dict, n: int) -> bool:
    """Spread of one point's latencies too wide for its numbers to be read as the engine's."""
    if n < MIN_SAMPLES_FOR_SPREAD:
        return False
    if stats["cv"] > CV_MAX:
        return True
    return stats["p90_ms"] is not None and stats["p50_ms"] > 0 and stats["p90_ms"] / stats["p50_ms"] > P90_P50_MAX


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


def _meta_model(cfg: AnyConfig) -> torch.nn.Module:
    """The model of ``cfg``'s family on the meta device (nothing allocated), texts counted at the length given."""
    with torch.device("meta"):
        if cfg.family == FAMILY_PIR:
            from priorclip.pir import PIR

            return PIR(cfg).eval()
        from priorclip.model import PriorCLIP

        model = PriorCLIP(cfg).eval()
    model.trim_text = False  # the data-dependent trim cannot run on meta tensors
    return model


@lru_cache(maxsize=64)
def gflop_per_item(cfg: AnyConfig, tower: str, text_length: int | None = None) -> float:
    """FLOPs (2 x MAC) of one image, or one caption of ``text_length`` tokens, counted on a meta-device model."""
    model = _meta_model(cfg)
    with torch.no_grad():
        if tower == "image":
            s = cfg.vision.image_size
            flops = _count(lambda: model.encode_image(torch.empty(1, 3, s, s, device="meta")))
        else:
            length = text_length or cfg.text.context_length
            flops = _count(lambda: model.encode_text(torch.zeros(1, length, dtype=torch.long, device="meta")))
    return flops / 1e9


PIR_FIRST_WORD_PIECE = 1000  # ids below 1000 are [PAD], [unused*], [UNK], [CLS], [SEP], ...


def make_token_batch(batch: int, length: int, context_length: int, vocab_size: int, seed: int,
                     family: str = FAMILY_PRIORCLIP) -> torch.Tensor:
    """Random token ids. PriorCLIP: [batch, context]: SOT, ``length - 2`` random ids, EOT at ``length - 1``, zero
    padding after. PIR: [batch, length], as its tokenizer pads a batch (to its longest row, which PIR attends to):
    [CLS] and random word pieces, the first row ``length`` ids long, the others 2 to ``length``, [PAD]=0 after."""
    g = torch.Generator().manual_seed(seed)
    if family == FAMILY_PIR:
        tokens = torch.randint(PIR_FIRST_WORD_PIECE, vocab_size, (batch, length), generator=g)
        tokens[:, 0] = CLS_ID
        ends = torch.randint(min(2, length), length + 1, (batch,), generator=g)
        ends[0] = length
        return tokens.masked_fill(torch.arange(length) >= ends[:, None], 0)
    tokens = torch.zeros(batch, context_length, dtype=torch.long)
    tokens[:, 0] = vocab_size - 2  # <start_of_text>
    if length > 2:
        tokens[:, 1 : length - 1] = torch.randint(1, vocab_size - 2, (batch, length - 2), generator=g)
    tokens[:, length - 1] = vocab_size - 1  # <end_of_text>, the highest id: EOT pooling finds it
    return tokens


def caption_batch(caption_tokens: torch.Tensor, batch: int, seed: int, family: str = FAMILY_PRIORCLIP) -> torch.Tensor:
    """``batch`` rows of real tokenised captions [N, ctx], drawn at random (seeded; without repeats while N allows).

    PIR: the [PAD] columns no drawn row needs are dropped, which gives exactly what its tokenizer makes of these
    captions as one batch (padded to the longest of them), the ids PIR must see."""
    g = torch.Generator().manual_seed(seed)
    n = caption_tokens.shape[0]
    idx = torch.randperm(n, generator=g)[:batch] if batch <= n else torch.randint(0, n, (batch,), generator=g)
    rows = caption_tokens[idx]
    return trim_padding(rows) if family == FAMILY_PIR else rows


def tokens_run(pool: Sequence[torch.Tensor], family: str = FAMILY_PRIORCLIP) -> int:
    """The text length an engine runs, averaged over the pool's batches: the batch's longest caption (EOT + 1) for
    engines that cut to it; for PIR the batch's own width (its ids run as given)."""
    if family == FAMILY_PIR:
        return round(sum(t.shape[1] for t in pool) / len(pool))
    return round(sum(int(t.argmax(dim=-1).max()) + 1 for t in pool) / len(pool))


def family_of(engine) -> str:
    """The model family an engine runs (``config.family``; an engine without a config is open-domain)."""
    return getattr(getattr(engine, "config", None), "family", FAMILY_PRIORCLIP)


def input_pool(
    engine: Engine, tower: str, batch: int, text_length: int, vocab_size: int, size: int | None = None,
    caption_tokens: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Distinct input batches on the engine's device (fewer of the big ones, to bound memory). Text batches are
    synthetic captions of ``text_length`` tokens, or real ones drawn from ``caption_tokens`` [N, ctx], in the ids of
    the engine's model family."""
    if size is None:
        size = 4 if batch <= 64 else 2
    dev = engine.device if engine.device.type == "cuda" else torch.device("cpu")
    if tower == "image":
        g = torch.Generator().manual_seed(1000 + batch)
        s = engine.image_size
        return [torch.randn(batch, 3, s, s, generator=g).to(dev) for _ in range(size)]
    family = family_of(engine)
    if caption_tokens is not None:
        return [caption_batch(caption_tokens, batch, 3000 + batch * 7 + i, family).to(dev) for i in range(size)]
    return [
        make_token_batch(batch, text_length, engine.context_length, vocab_size, 2000 + batch * 7 + i, family).to(dev)
        for i in range(size)
    ]


def bench_engine(
    engine: Engine,
    cfg: AnyConfig,
    batch_sizes: Sequence[int],
    warmup: int,
    iters: int,
    text_length: int,
    peaks: dict[str, float],
    towers: Sequence[str] = TOWERS,
    on_row: Callable[[TimingRow], None] | None = None,
    free_before_build: int | None = None,
    monitor: "LoadMonitor | None" = None,
    caption_tokens: torch.Tensor | None = None,
) -> list[TimingRow]:
    """Time ``engine`` for each tower and batch size; returns one :class:`TimingRow` each.

    ``free_before_build``: free device bytes measured before the engine was built, the baseline of the memory taken
    by runtimes that allocate outside torch (ONNX Runtime, TensorRT). ``monitor``: readings around every point.
    ``caption_tokens``: time texts on real captions drawn from these [N, ctx] instead of ``text_length`` tokens.
    """
    rows = []
    peak = peak_for(engine.precision, peaks)
    for tower in towers:
        for batch in batch_sizes:
            pool = input_pool(engine, tower, batch, text_length, cfg.text.vocab_size, caption_tokens=caption_tokens)
            fn = engine.encode_images if tower == "image" else engine.encode_texts
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(engine.device)
                free_before = free_before_build or torch.cuda.mem_get_info(engine.device)[0]
            window = monitor.window() if monitor is not None else nullcontext()
            with window as w:
                ms, pipe_s, pipe_calls, method = measure_point(fn, pool, warmup, iters, engine.device)
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
            if tower == "text":  # FLOPs at the length run (real captions: the batch's longest, as eager cuts them)
                if engine.fixed_text_length:
                    tokens = engine.context_length
                else:
                    tokens = tokens_run(pool, family_of(engine)) if caption_tokens is not None else text_length
            gflop = gflop_per_item(cfg, tower, tokens)
            items_per_s = batch * pipe_calls / pipe_s
            tflops = items_per_s * gflop / 1e3
            row = TimingRow(
                engine.backend,
                engine.precision,
                tower,
                batch,
                tokens,
                len(ms),
                **stats,
                items_per_s=items_per_s,
                throughput_calls=pipe_calls,
                throughput_method=method,
                gflop_per_item=gflop,
                tflops=tflops,
                frac_peak=tflops / peak if peak else None,
                peak_mem_mib=mem,
                mem_kind=kind,
                others_cpu_share=(w or {}).get("others_cpu_share"),
                unsteady=is_unsteady(stats, len(ms)),
            )
            rows.append(row)
            if on_row:
                on_row(row)
            del pool
    return rows


def prime(
    engine: Engine, cfg: AnyConfig, batch_sizes: Sequence[int], text_length: int, towers: Sequence[str] = TOWERS
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
    return transform.load(data)  # the product's read path: pixel limit, JPEG draft decode, one DataError line


def decode_rate(jpegs: Sequence[bytes], transform: EvalTransform, workers: int) -> float:
    """Images/s of decode + eval transform alone (the CPU ceiling of the end-to-end rate); ``transform``: the model's
    (:func:`priorclip.preprocess.preprocess_for`)."""
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
    from priorclip.preprocess import preprocess_for

    transform = preprocess_for(engine).transform  # the model's own (PIR squashes, PriorCLIP crops)
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


# ------------------------------------------------------------------------------------------- machine load while timing


@dataclass
class CpuReading:
    """Cumulative CPU counters at one moment (clock ticks, summed over every CPU of the machine)."""

    t: float  # time.monotonic()
    busy: int  # user + nice + system + irq + softirq: work done by every process (this one included)
    total: int  # busy + idle + iowait + steal
    steal: int  # time the hypervisor gave our virtual CPUs to someone else
    ours: int  # this process: utime + stime (+ waited-for children)
    loadavg1: float | None


def read_cpu() -> CpuReading | None:
    """The counters from /proc/stat, /proc/self/stat and /proc/loadavg; None where /proc is absent (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/loadavg") as f:
            load1 = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    # the command name (field 2) may hold spaces: fields after its closing parenthesis are fixed
    rest = stat[stat.rindex(")") + 2 :].split()
    ours = sum(int(v) for v in rest[11:15])  # utime, stime, cutime, cstime (fields 14-17)
    busy = user + nice + system + irq + softirq
    return CpuReading(time.monotonic(), busy, busy + idle + iowait + steal, steal, ours, load1)


def gpu_uuid(device: torch.device) -> str | None:
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - older torch or no CUDA: match every GPU
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def read_gpu(uuid: str | None = None) -> dict | None:
    """Utilisation of our GPU and the compute processes on it other than this one, from nvidia-smi (None without).

    Where nvidia-smi's PIDs are of another PID namespace (``foreign_pids``), ``others`` lists every process on the
    GPU, this one unrecognised among them, and only when there are several."""
    def query(what: str) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode != 0:
            raise OSError(out.stderr.strip())
        return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]

    try:
        gpus = query("gpu=uuid,utilization.gpu,memory.used")
        apps = query("compute-apps=gpu_uuid,pid,used_memory")
    except (OSError, subprocess.SubprocessError):
        return None
    mine = [g for g in gpus if uuid is None or g[0] == uuid] or gpus[:1]
    util = _float(mine[0][1]) if mine else None
    procs = [
        {"pid": int(a[1]), "used_mib": _float(a[2])}
        for a in apps
        if len(a) >= 3 and a[1].isdigit() and (uuid is None or a[0] == uuid)
    ]
    pid = os.getpid()
    if any(p["pid"] == pid for p in procs):
        return {"util_pct": util, "others": [p for p in procs if p["pid"] != pid]}
    # Our PID is in none of the entries: nvidia-smi reports PIDs of another namespace (a container sees host PIDs),
    # so one of them is probably this process. Only more processes than one prove that someone else is there.
    if len(procs) <= 1:
        return {"util_pct": util, "others": []}
    return {"util_pct": util, "others": procs, "foreign_pids": True}


def _float(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:  # "[N/A]"
        return None


@dataclass
class _Acc:
    ticks: int = 0
    others: int = 0
    steal: int = 0
    ours: int = 0
    seconds: float = 0.0
    n: int = 0
    max_share: float = 0.0  # the highest others' share of one interval (the whole-run record's maximum)

    def add(self, a: CpuReading, b: CpuReading) -> dict:
        total = b.total - a.total
        others = max(0, (b.busy - a.busy) - (b.ours - a.ours))
        steal = b.steal - a.steal
        self.ticks += total
        self.others += others
        self.steal += steal
        self.ours += b.ours - a.ours
        self.seconds += b.t - a.t
        self.n += 1
        share = others / total if total > 0 else None
        if share is not None:
            self.max_share = max(self.max_share, share)
        return {"others_cpu_share": share}  # the point's own share (its TimingRow); steal only counts in total

    def shares(self) -> dict:
        if self.ticks <= 0:
            return {"others_cpu_share": None, "steal_share": None, "ours_cpu_share": None}
        return {
            "others_cpu_share": self.others / self.ticks,
            "steal_share": self.steal / self.ticks,
            "ours_cpu_share": self.ours / self.ticks,
        }


class LoadMonitor:
    """What else ran on the machine while we measured.

    Readings are taken at the start and end of every timed point (:meth:`window`): the CPU time of other processes
    (all CPU time on the machine minus this process's) and the steal time, as shares of the machine's CPU capacity
    over the timed windows. A background thread also samples every ``interval`` seconds for the whole run (load
    average, peaks) and, on GPU, every ``gpu_interval`` seconds nvidia-smi's utilisation and other compute processes.
    ``reader`` / ``gpu_reader`` are injectable (tests feed synthetic readings).
    """

    def __init__(
        self,
        reader: Callable[[], CpuReading | None] = read_cpu,
        gpu_reader: Callable[[], dict | None] | None = None,
        interval: float = 1.0,
        gpu_interval: float = 5.0,
        cpu_count: int | None = None,
    ) -> None:
        self.reader, self.gpu_reader = reader, gpu_reader
        self.interval, self.gpu_interval = interval, gpu_interval
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timed = _Acc()
        self._run = _Acc()
        self._loadavg: list[float] = []
        self._gpu_util: list[float] = []
        self._gpu_others: dict[int, float] = {}
        self._gpu_foreign_pids = False  # nvidia-smi's PIDs are of another namespace: ours is among them, unrecognised
        self._gpu_samples = 0
        self._readable = True

    def _read(self) -> CpuReading | None:
        r = self.reader()
        if r is None:
            self._readable = False
        elif r.loadavg1 is not None:
            with self._lock:
                self._loadavg.append(r.loadavg1)
        return r

    def start(self) -> "LoadMonitor":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="priorclip-bench-load", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def _loop(self) -> None:
        last = self._read()
        next_gpu = 0.0
        while not self._stop.wait(self.interval):
            now = self._read()
            if last is not None and now is not None:
                with self._lock:
                    self._run.add(last, now)
            last = now
            if self.gpu_reader is not None and time.monotonic() >= next_gpu:
                next_gpu = time.monotonic() + self.gpu_interval
                self._sample_gpu()

    def _sample_gpu(self) -> None:
        g = self.gpu_reader() if self.gpu_reader else None
        if g is None:
            return
        with self._lock:
            self._gpu_samples += 1
            if g.get("util_pct") is not None:
                self._gpu_util.append(g["util_pct"])
            for o in g.get("others", []):
                self._gpu_others[o["pid"]] = max(self._gpu_others.get(o["pid"], 0.0), o.get("used_mib") or 0.0)
            self._gpu_foreign_pids |= bool(g.get("foreign_pids"))

    @contextmanager
    def window(self) -> Iterator[dict]:
        """Readings around one timed point; the yielded dict gets the point's shares when the block ends."""
        result: dict = {}
        a = self._read()
        if self.gpu_reader is not None and self._gpu_samples == 0:
            self._sample_gpu()  # at least one GPU reading while timing, however short the run
        try:
            yield result
        finally:
            b = self._read()
            if a is not None and b is not None:
                with self._lock:
                    result.update(self._timed.add(a, b))

    def summary(self) -> dict:
        """The load record of the report (shares are of the whole machine's CPU capacity)."""
        with self._lock:
            timed, run = self._timed.shares(), self._run.shares()
            out = {
                "measured": self._readable and (self._timed.n > 0 or self._run.n > 0),
                "cpu_count": self.cpu_count,
                "timed_points": self._timed.n,
                "timed_seconds": round(self._timed.seconds, 3),
                "others_cpu_share": timed["others_cpu_share"],
                "steal_share": timed["steal_share"],
                "ours_cpu_share": timed["ours_cpu_share"],
                "run_samples": self._run.n,
                "run_interval_s": self.interval,
                "run_others_cpu_share": run["others_cpu_share"],
                "run_others_cpu_share_max": self._run.max_share if self._run.n else None,
                "loadavg1_mean": float(np.mean(self._loadavg)) if self._loadavg else None,
                "loadavg1_max": max(self._loadavg) if self._loadavg else None,
                "gpu": None
                if self.gpu_reader is None
                else {
                    "samples": self._gpu_samples,
                    "util_pct_mean": float(np.mean(self._gpu_util)) if self._gpu_util else None,
                    "util_pct_max": max(self._gpu_util) if self._gpu_util else None,
                    "other_processes": [{"pid": p, "used_mib_max": m} for p, m in sorted(self._gpu_others.items())],
                    "foreign_pids": self._gpu_foreign_pids,
                },
            }
        return out


def assess_reliability(load: dict, timings: Sequence[dict]) -> dict:
    """``{"reliable", "warnings", "thresholds", "unsteady_points"}`` from the load record and the timing rows."""
    warnings = []
    if not load.get("measured"):
        warnings.append("the machine's load could not be read here (no /proc): nothing shows the timings are "
                        "undisturbed")
    others, steal = load.get("others_cpu_share"), load.get("steal_share")
    cores = load.get("cpu_count") or 1
    if others is not None and others > OTHERS_CPU_SHARE_MAX:
        la = load.get("loadavg1_max")
        warnings.append(
            f"other processes used {100 * others:.0f} % of this machine's CPU ({others * cores:.1f} of {cores} cores) "
            f"while engines were timed (threshold {100 * OTHERS_CPU_SHARE_MAX:.0f} %)"
            + (f"; load average up to {la:.1f}" if la is not None else "")
            + ": throughput and latency here may be far below what this machine does idle"
        )
    if steal is not None and steal > STEAL_SHARE_MAX:
        warnings.append(f"the hypervisor took {100 * steal:.0f} % of the CPU time (steal) while engines were timed "
                        f"(threshold {100 * STEAL_SHARE_MAX:.0f} %)")
    gpu = load.get("gpu") or {}
    if gpu.get("other_processes"):
        procs = ", ".join(f"pid {p['pid']} ({p['used_mib_max']:.0f} MiB)" for p in gpu["other_processes"][:5])
        if gpu.get("foreign_pids"):
            warnings.append(f"{len(gpu['other_processes'])} compute processes shared the GPU during the run: {procs} "
                            "(nvidia-smi reports PIDs of another namespace, so one of them is probably this one)")
        else:
            warnings.append(f"other processes ran on the GPU during the run: {procs}")
    unsteady = [f"{t['backend']}/{t['precision']} {t['tower']} b{t['batch']}" for t in timings if t.get("unsteady")]
    if unsteady:
        warnings.append(
            f"{len(unsteady)} of {len(timings)} timing points spread widely (CV > {CV_MAX} or p90/p50 > "
            f"{P90_P50_MAX}): " + ", ".join(unsteady[:6]) + (" ..." if len(unsteady) > 6 else "")
        )
    return {
        "reliable": not warnings,
        "warnings": warnings,
        "unsteady_points": unsteady,
        "thresholds": {
            "others_cpu_share": OTHERS_CPU_SHARE_MAX,
            "steal_share": STEAL_SHARE_MAX,
            "cv": CV_MAX,
            "p90_p50": P90_P50_MAX,
            "min_samples_for_spread": MIN_SAMPLES_FOR_SPREAD,
        },
    }
