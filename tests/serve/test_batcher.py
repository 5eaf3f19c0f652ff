"""The dynamic batcher on its own: rows back in order, batches across requests, groups kept apart, back-pressure,
deadlines and engine failures (a stand-in engine records every call)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from priorclip.serve.batcher import Batcher
from priorclip.serve.inputs import RequestError


class Recorder:
    """``run(kind, payloads)``: each row is [payload, call number]; every call's payloads are kept."""

    def __init__(self, gate: threading.Event | None = None, fail_on=None) -> None:
        self.calls: list[tuple[str, list]] = []
        self.gate, self.fail_on = gate, fail_on

    def __call__(self, kind, payloads):
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("engine fault")
        self.calls.append((kind, list(payloads)))
        return np.array([[p, len(self.calls)] for p in payloads], np.float32)


@pytest.fixture
def make():
    made = []

    def factory(run, **kw):
        b = Batcher(run, **kw)
        b.start()
        made.append(b)
        return b

    yield factory
    for b in made:
        b.stop()


def test_rows_in_order_and_requests_share_batches(make):
    rec = Recorder()
    b = make(rec, max_batch=4, max_wait=0.2, max_queue=64)
    futs = [b.submit_nowait("image", [10 * r + i for i in range(3)]) for r in range(4)]  # 12 items, 4 requests
    for r, f in enumerate(futs):
        np.testing.assert_array_equal(f.result(5)[:, 0], [10 * r + i for i in range(3)])
    assert all(len(p) <= 4 for _, p in rec.calls)
    assert len(rec.calls) == 3  # full batches of 4 formed across the requests' boundaries
    assert rec.calls[0][1] == [0, 1, 2, 10]  # first come, first served


def test_large_request_is_split_and_groups_never_mix(make):
    rec = Recorder()
    b = make(rec, max_batch=3, max_wait=0.05, max_queue=64)
    big = b.submit_nowait("text", list(range(8)), groups=[i % 2 for i in range(8)])
    np.testing.assert_array_equal(big.result(5)[:, 0], range(8))
    for _, payloads in rec.calls:
        assert len({p % 2 for p in payloads}) == 1 and len(payloads) <= 3


def test_full_queue_is_refused_with_retry_after(make):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=2, max_wait=0.0, max_queue=4)
    first = b.submit_nowait("image", [1, 2])  # taken by the worker, which blocks on the gate
    deadline = time.monotonic() + 5
    while b.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = b.submit_nowait("image", [3, 4, 5, 6])  # fills the queue
    with pytest.raises(RequestError) as e:
        b.submit_nowait("image", [7])
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
    gate.set()
    np.testing.assert_array_equal(first.result(5)[:, 0], [1, 2])
    np.testing.assert_array_equal(queued.result(5)[:, 0], [3, 4, 5, 6])
    b.submit_nowait("image", [8]).result(5)  # room again


def test_deadline_fails_with_504_and_drops_the_items(make):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=1, max_wait=0.0, max_queue=8)

    async def scenario():
        blocker = b.submit_nowait("image", [1])
        with pytest.raises(RequestError) as e:
            await b.submit("image", [2], deadline=time.monotonic() + 0.2)
        assert e.value.status == 504
        gate.set()
        blocker.result(5)

    asyncio.run(scenario())
    b.submit_nowait("image", [3]).result(5)
    assert [p for _, p in rec.calls] == [[1], [3]]  # the expired item never reached the engine


def test_engine_failure_fails_its_requests_only(make):
    rec = Recorder(fail_on=99)
    b = make(rec, max_batch=8, max_wait=0.0, max_queue=16)
    with pytest.raises(RequestError) as e:
        b.submit_nowait("image", [99]).result(5)
    assert e.value.status == 500 and "engine fault" in str(e.value)
    np.testing.assert_array_equal(b.submit_nowait("image", [5]).result(5)[:, 0], [5])


def test_bad_settings_refused():
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_batch=8, max_queue=4)
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_batch=0)
