"""The service's Prometheus metrics, on a registry of its own (several services in one process do not collide).

Requests and errors by route and kind, request latency by route, the batch sizes the batcher formed, the queue
depth, cache hits and misses, and each stage's time: decode (image bytes to a decoded image), preprocess (the
model's resize and normalisation to pixels, or tokenising a caption), queue wait (enqueued to batch start) and encode
(the engine's call, per batch).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 1 ms (a cached caption) to 30 s (a deadline).
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STAGES = ("decode", "preprocess", "queue_wait", "encode")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("priorclip_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.errors = Counter("priorclip_errors", "Refused or failed requests by route and kind", ["route", "kind"],
                              registry=r)
        self.latency = Histogram("priorclip_request_seconds", "Request latency by route", ["route"], buckets=_SECONDS,
                                 registry=r)
        self.batch_size = Histogram("priorclip_batch_size", "Items per engine call", ["kind"], buckets=_BATCH,
                                    registry=r)
        self.queue_depth = Gauge("priorclip_queue_depth", "Items waiting for the engine", ["kind"], registry=r)
        self.stage = Histogram("priorclip_stage_seconds", "Time per stage (decode, preprocess and queue_wait per item, "
                               "encode per batch)", ["stage", "kind"], buckets=_SECONDS, registry=r)
        self.cache = Counter("priorclip_cache", "Embedding cache lookups", ["kind", "result"], registry=r)
        self.items = Counter("priorclip_embedded_items", "Items embedded by the engine", ["kind"], registry=r)
        self.ready = Gauge("priorclip_ready", "1 when loaded, warmed and self-tested", registry=r)
        self.selftest_cosine = Gauge("priorclip_selftest_min_cosine", "Self-test: lowest cosine to the fp32 "
                                     "reference", ["kind"], registry=r)
        for kind in ("image", "text"):  # zero series exist from the start, so rates and ratios are defined
            self.queue_depth.labels(kind)
            for result in ("hit", "miss"):
                self.cache.labels(kind, result)

    def render(self) -> bytes:
        return generate_latest(self.registry)
