"""Dynamic batching: items of concurrent requests run through the engine together.

One worker thread owns the engine (engines keep per-call runtime state and are not thread-safe). Requests put their
items (already decoded and preprocessed, off the event loop) into a queue per ``(kind, group)``; the worker takes the
group whose oldest item has waited longest and runs it as soon as it holds ``max_batch`` items or that item has
waited ``max_wait`` seconds. A request larger than ``max_batch`` is spread over several engine calls, and one call
may mix items of many requests; each request gets back exactly its own rows, in its order.

``group`` keeps apart items that must not share a batch: the closed-domain PIR attends to its [PAD] tokens, so its
captions are grouped by token length and each runs unpadded (its batch-of-one embedding, whoever it is batched with).

Back-pressure: when the queued items plus a new request's would exceed ``max_queue``, the request is refused at once
with 429 and a ``Retry-After`` estimated from the recent throughput, rather than queued past any useful deadline. A
request whose deadline passes while it waits is failed with 504 and its items are dropped unrun.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from .inputs import RequestError

log = logging.getLogger("priorclip.serve")


@dataclass(frozen=True)
class BatchingOptions:
    """How the service queues, batches and caches (priorclip-serve's defaults; needs none of the service packages)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    decode_workers: int = 4
    cache_size: int = 4096


class _Request:
    """The rows of one submitted request; only the worker thread fills them."""

    def __init__(self, n: int, deadline: float | None) -> None:
        self.rows: list[np.ndarray | None] = [None] * n
        self.remaining = n
        self.deadline = deadline
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def fail(self, err: BaseException) -> None:
        try:
            self.future.set_exception(err)
        except concurrent.futures.InvalidStateError:  # already done (e.g. cancelled at its deadline meanwhile)
            pass

    def put(self, i: int, row: np.ndarray) -> None:
        self.rows[i] = row
        self.remaining -= 1
        if self.remaining == 0:
            try:
                self.future.set_result(np.stack(self.rows))
            except concurrent.futures.InvalidStateError:
                pass


@dataclass
class _Item:
    request: _Request
    index: int
    payload: Any
    enqueued: float = field(default_factory=time.monotonic)


def deadline_exceeded(waited: float) -> RequestError:
    return RequestError(504, "deadline", f"deadline exceeded after {waited:.2f} s in the queue")


class Batcher:
    """Args:
        run: ``run(kind, payloads) -> np.ndarray [len(payloads), E]``, called on the worker thread only.
        max_batch: most items per engine call. max_wait: seconds the oldest item may wait for others.
        max_queue: most items waiting at once (beyond: 429). metrics: a :class:`~priorclip.serve.metrics.Metrics`.
    """

    def __init__(self, run: Callable[[str, list], np.ndarray], *, max_batch: int = 32, max_wait: float = 0.005,
                 max_queue: int = 1024, metrics=None) -> None:
        if max_batch < 1 or max_queue < max_batch or max_wait < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= max_batch and max_wait >= 0 (got {max_batch}, "
                             f"{max_queue}, {max_wait})")
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.metrics = metrics
        self._queues: dict[tuple[str, Hashable], deque[_Item]] = {}
        self._queued = {"image": 0, "text": 0}
        self._cond = threading.Condition()
        self._stopping = False
        self._rate = 0.0  # items per second, exponentially averaged over engine calls (for Retry-After)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="priorclip-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Run what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return sum(self._queued.values())

    # ---------------------------------------------------------------------------------------------------- submit
    def submit_nowait(self, kind: str, payloads: Sequence, groups: Sequence[Hashable] | None = None,
                      deadline: float | None = None) -> concurrent.futures.Future:
        """Queue ``payloads``; the future's result is their rows ``[n, E]`` in order. Raises 429 when full."""
        n = len(payloads)
        req = _Request(n, deadline)
        if n == 0:
            req.future.set_result(np.zeros((0, 0), np.float32))
            return req.future
        groups = groups if groups is not None else [None] * n
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise RequestError(503, "stopping", "the service is shutting down")
            depth = self.depth
            if depth + n > self.max_queue:
                raise RequestError(429, "queue_full", f"queue full ({depth} items waiting, limit {self.max_queue}); "
                                   "retry later", {"Retry-After": str(self._retry_after(depth + n))})
            for i, (p, g) in enumerate(zip(payloads, groups)):
                self._queues.setdefault((kind, g), deque()).append(_Item(req, i, p, now))
            self._queued[kind] = self._queued.get(kind, 0) + n
            self._gauge(kind)
            self._cond.notify_all()
        return req.future

    async def submit(self, kind: str, payloads: Sequence, groups: Sequence[Hashable] | None = None,
                     deadline: float | None = None) -> np.ndarray:
        """:meth:`submit_nowait`, awaited; past ``deadline`` (time.monotonic) the request fails with 504."""
        fut = self.submit_nowait(kind, payloads, groups, deadline)
        start = time.monotonic()
        try:
            timeout = None if deadline is None else max(0.0, deadline - start)
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except asyncio.TimeoutError:
            fut.cancel()  # the worker skips the items of a done request
            raise deadline_exceeded(time.monotonic() - start) from None

    def _retry_after(self, items: int) -> int:
        return max(1, math.ceil(items / self._rate)) if self._rate > 0 else 1

    def _gauge(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(kind).set(self._queued.get(kind, 0))

    # ---------------------------------------------------------------------------------------------------- worker
    def _next_batch(self) -> tuple[str, list[_Item]] | None:
        with self._cond:
            while True:
                if not self._queues:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                key = min(self._queues, key=lambda k: self._queues[k][0].enqueued)  # the longest-waiting item's
                q = self._queues[key]
                wait = q[0].enqueued + self.max_wait - time.monotonic()
                if len(q) >= self.max_batch or wait <= 0 or self._stopping:
                    break
                self._cond.wait(wait)  # more items may arrive; re-pick, since another group may have filled
            batch = [q.popleft() for _ in range(min(len(q), self.max_batch))]
            if not q:
                del self._queues[key]
            self._queued[key[0]] -= len(batch)
            self._gauge(key[0])
            return key[0], batch

    def _loop(self) -> None:
        while (nxt := self._next_batch()) is not None:
            kind, batch = nxt
            now = time.monotonic()
            live = []
            for it in batch:
                if it.request.future.done():  # failed, cancelled or timed out: nobody waits for it
                    continue
                if it.request.deadline is not None and now > it.request.deadline:
                    it.request.fail(deadline_exceeded(now - it.enqueued))
                    continue
                live.append(it)
            if not live:
                continue
            if self.metrics is not None:
                for it in live:
                    self.metrics.stage.labels("queue_wait", kind).observe(now - it.enqueued)
            try:
                t0 = time.perf_counter()
                out = self.run(kind, [it.payload for it in live])
                dt = time.perf_counter() - t0
            except Exception as e:  # an engine failure fails its requests, never the worker
                log.exception("engine call failed (%s batch of %d)", kind, len(live))
                err = RequestError(500, "engine", f"the engine failed on this batch: {type(e).__name__}: {e}")
                for it in live:
                    it.request.fail(err)
                continue
            self._rate = len(live) / dt if self._rate == 0 else 0.8 * self._rate + 0.2 * len(live) / max(dt, 1e-9)
            if self.metrics is not None:
                self.metrics.stage.labels("encode", kind).observe(dt)
                self.metrics.batch_size.labels(kind).observe(len(live))
                self.metrics.items.labels(kind).inc(len(live))
            for it, row in zip(live, out):
                if not it.request.future.done():
                    it.request.put(it.index, row)
