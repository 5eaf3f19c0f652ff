"""Pieces both trainers share: processes and devices, precision, RNG state, the metrics log, stop requests."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from priorclip.errors import PriorCLIPError

PRECISIONS = ("fp32", "bf16", "fp16")


class TrainingInterrupted(PriorCLIPError):
    """The run was stopped (Ctrl-C, SIGTERM, a time limit); a resumable checkpoint was written."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and start the process group if there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PriorCLIPError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    if device == "cuda":
        device = f"cuda:{local}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"type": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int | None = None, main_pid: int | None = None) -> None:
    """``worker_init_fn`` of training loaders: the worker ignores SIGTERM and SIGINT except its loader's own stop.

    A scheduler (SLURM, ``kill -- -PGID``) and Ctrl-C signal the whole process group. A worker that died of it made
    the main process fail in whatever it was doing (torch's SIGCHLD handler raises "DataLoader worker ... is killed
    by signal"); now only the main process reacts, finishes its step, saves, and shuts the workers down itself.
    A SIGTERM from the main process (``main_pid``, or the parent) still ends the worker at once, as torch's worker
    handler does: the loader's ``terminate()`` of a hung worker and multiprocessing's at exit after a crash rely on
    it (ignoring it outright left a crashed run waiting for its workers forever).

    The signals stay blocked in the worker and a thread takes them with ``sigwaitinfo``, which names the sender;
    without it (macOS) only SIGINT is ignored. Start the workers under :func:`stop_signals_blocked`: a native thread
    that torch starts in the worker before this runs must inherit the block too, or the kernel may hand it a
    group signal (and torch's worker handler then ends the worker)."""
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # before the thread starts, so it inherits the block
    owners = {os.getppid(), main_pid}
    threading.Thread(target=_take_stop_signals, args=(owners,), name="stop-signals", daemon=True).start()


def _take_stop_signals(owners: set[int | None]) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid in owners:
            os._exit(0)


@contextmanager
def stop_signals_blocked():
    """Hold SIGTERM/SIGINT pending in this thread while loader workers start.

    Workers inherit the blocked mask, so a group signal that lands between their fork and
    :func:`ignore_stop_signals` waits and is then discarded, instead of killing them with torch's worker handler.
    The main process still gets it: through another of its threads at once, or when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the loop can write a resumable checkpoint."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every process if it is true on any (keeps processes in step when one of them must stop)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
