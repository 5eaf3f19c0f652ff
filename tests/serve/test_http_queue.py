"""Back-pressure and deadlines as a client sees them (429 + Retry-After, 504), and the closed-domain PIR's captions:
batched only with captions of their own length, so each equals its batch-of-one embedding whoever it shares a call
with (PIR attends to [PAD])."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import torch

from priorclip.serve.app import create_app
from priorclip.serve.cli import ServerThread, build_service
from priorclip.serve.inputs import Limits
from priorclip.serve.service import BatchingOptions


@pytest.fixture
def gated():
    """A service whose engine calls wait for a gate: the queue fills while the gate is shut."""
    service = build_service(model_name="priorclip-tiny", selftest=False, limits=Limits(max_items=4),
                            batching=BatchingOptions(max_batch=2, max_wait_ms=0, max_queue=4, cache_size=0))
    service.start(block=True)
    gate = threading.Event()
    inner = service.batcher.run

    def run(kind, payloads):
        assert gate.wait(20)
        return inner(kind, payloads)

    service.batcher.run = run
    with ServerThread(create_app(service)) as url:
        yield service, url, gate
    gate.set()
    service.stop()


def test_full_queue_gets_429_and_deadlines_504(gated):
    service, url, gate = gated
    results: dict[int, httpx.Response] = {}

    def post(i: int, n: int, timeout: str | None = None) -> None:
        headers = {"x-request-timeout": timeout} if timeout else {}
        with httpx.Client(base_url=url, timeout=30) as c:
            results[i] = c.post("/embed/texts", json={"texts": [f"caption {i} {j}" for j in range(n)]},
                                headers=headers)

    def taken() -> float:  # text items the worker has taken off the queue
        return service.metrics.registry.get_sample_value("priorclip_stage_seconds_count",
                                                         {"kind": "text", "stage": "queue_wait"}) or 0.0

    def wait_for(cond) -> None:
        t_end = time.monotonic() + 10
        while not cond() and time.monotonic() < t_end:
            time.sleep(0.01)

    before = taken()
    first = threading.Thread(target=post, args=(0, 2))  # the worker takes it and blocks on the gate
    first.start()
    wait_for(lambda: taken() >= before + 2)
    waiting = threading.Thread(target=post, args=(1, 4, "0.5"))  # fills the queue; its deadline passes
    waiting.start()
    wait_for(lambda: service.batcher.depth >= 4)
    assert service.batcher.depth == 4
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/embed/texts", json={"texts": ["one more"]})
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "queue_full"
    waiting.join(10)
    assert results[1].status_code == 504 and results[1].json()["error"]["type"] == "deadline"
    gate.set()
    first.join(10)
    assert results[0].status_code == 200
    with httpx.Client(base_url=url, timeout=30) as c:  # served again once the queue drains
        assert c.post("/embed/texts", json={"texts": ["after"]}).status_code == 200


@pytest.fixture(scope="module")
def pir_served():
    service = build_service(model_name="pir-tiny", selftest=True,
                            batching=BatchingOptions(max_batch=16, max_wait_ms=50, max_queue=256, cache_size=0))
    service.start(block=True)
    assert service.state == "ready", service.selftest
    with ServerThread(create_app(service)) as url:
        yield service, url
    service.stop()


def test_pir_captions_equal_their_batch_of_one_embedding(pir_served):
    service, url = pir_served
    captions = ["a plane", "many planes are parked near the terminal building", "green trees around a pond",
                "a playground", "several storage tanks are near a road and some buildings", "a bridge"]
    with torch.inference_mode():
        alone = np.concatenate([service.engine.encode_texts(service.pre.tokenizer([c])).numpy() for c in captions])
        padded = service.engine.encode_texts(service.pre.tokenizer(captions)).numpy()
    assert np.abs(padded - alone).max() > 1e-3  # padding changes PIR's embeddings: the grouping matters here
    got: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(captions))

    def post(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            got[i] = np.array(c.post("/embed/texts", json={"texts": [captions[i]]}).json()["embeddings"][0])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(captions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(captions)):
        np.testing.assert_allclose(got[i], alone[i], atol=2e-6)
    # one request with all of them: still each its own length
    with httpx.Client(base_url=url, timeout=60) as c:
        rows = np.array(c.post("/embed/texts", json={"texts": captions}).json()["embeddings"])
    np.testing.assert_allclose(rows, alone, atol=2e-6)


def test_pir_caption_that_cleans_to_nothing_is_422(pir_served):
    _, url = pir_served
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/embed/texts", json={"texts": ["fine caption", "!!! ..."]})
    assert r.status_code == 422 and r.json()["error"]["type"] == "bad_text" and "texts[1]" in r.text


def test_self_test_keeps_a_wrong_engine_not_ready():
    """An engine that does not reproduce the reference (here: other weights behind the same model name, as a stale
    engine would be) leaves the service not ready: /readyz 503 with the self-test's line, embeddings refused with
    503, /healthz still 200."""
    import torch as _torch

    from priorclip.registry import create_model
    from priorclip.serve.engines import create_engine

    service = build_service(model_name="priorclip-tiny", selftest=True)
    with _torch.random.fork_rng(devices=[]):
        _torch.manual_seed(1)
        stale = create_model("priorclip-tiny")
    service.engine = create_engine("torch", stale)  # the reference stays the seed-0 model the service was built on
    service.start(block=True)
    assert service.state == "failed"
    with ServerThread(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["state"] == "failed"
        line = ready.json()["selftest"]["line"]
        assert line.startswith("self-test FAILED") and "cosine" in line
        r = c.post("/embed/texts", json={"texts": ["a runway"]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready" and "self-test FAILED" in r.text
        assert c.get("/healthz").status_code == 200
    service.stop()
