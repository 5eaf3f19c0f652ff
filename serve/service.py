"""The embedding service behind the HTTP routes: cache, decoding pool, dynamic batcher, engine, index, readiness.

Lifecycle: ``loading`` (engine built) -> ``warming`` (one small and one full batch per kind, so graph capture or
compilation happens before traffic) -> ``self-test`` (the export's reference probes through the whole request path:
bytes -> decode -> batcher -> engine) -> ``ready``, or ``failed`` with one log line naming the cosine when the engine
does not reproduce the fp32 reference within its precision's tolerance. Only ``ready`` serves embeddings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from priorclip.config import FAMILY_PIR
from priorclip.preprocess import preprocess_for
from priorclip.provenance import check_identity

from .batcher import Batcher, BatchingOptions
from .cache import EmbeddingCache
from .inputs import Limits, RequestError, check_captions, decode_image, preprocess_image
from .loading import LoadedEngine
from .metrics import Metrics

log = logging.getLogger("priorclip.serve")


def count_tokens(ids: torch.Tensor) -> int:
    """Tokens a caption used (both tokenizers pad with id 0 and never emit it inside a caption)."""
    return int((ids != 0).sum())


class EmbeddingService:
    def __init__(self, loaded: LoadedEngine, *, index=None, limits: Limits = Limits(),
                 batching: BatchingOptions = BatchingOptions(), selftest: bool = True) -> None:
        if limits.max_items > batching.max_queue:
            raise ValueError(f"max items per request ({limits.max_items}) over the queue size ({batching.max_queue}):"
                             " such a request could never be admitted")
        self.loaded, self.engine, self.index = loaded, loaded.engine, index
        if index is not None:
            check_identity(index.identity, loaded.identity, f"index {index.path}")
        self.limits, self.batching = limits, batching
        self.pre = preprocess_for(loaded.config)
        # PIR attends to [PAD]: its captions are tokenised one by one and batched only with equal lengths
        self.group_texts = loaded.config.family == FAMILY_PIR and not loaded.config.mask_padding
        self.metrics = Metrics()
        self.cache = EmbeddingCache(batching.cache_size,
                                    loaded.name + json.dumps(loaded.identity, sort_keys=True))
        self.batcher = Batcher(self._run, max_batch=batching.max_batch, max_wait=batching.max_wait_ms / 1000,
                               max_queue=batching.max_queue, metrics=self.metrics)
        self.pool = ThreadPoolExecutor(batching.decode_workers, thread_name_prefix="priorclip-decode")
        self.state = "loading"
        self.selftest: dict | None = None
        self.started = time.time()
        self._run_selftest = selftest
        self._starter: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        return self.loaded.name

    @property
    def precision(self) -> str:
        return str(getattr(self.engine, "precision", "fp32"))

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def describe(self) -> dict:
        return {"model": self.model_id, "embed_dim": self.loaded.embed_dim, "family": self.loaded.config.family,
                "precision": self.precision, "device": str(getattr(self.engine, "device", "cpu")),
                "identity": self.loaded.identity, "source": self.loaded.source,
                "index": None if self.index is None else {"path": str(self.index.path), "count": len(self.index),
                                                          "kind": self.index.kind}}

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self, block: bool = False) -> None:
        """Start the batcher, then warm up and self-test on a thread (``/healthz`` answers meanwhile)."""
        self.batcher.start()
        self._starter = threading.Thread(target=self._bring_up, name="priorclip-start", daemon=True)
        self._starter.start()
        if block:
            self._starter.join()

    def stop(self) -> None:
        self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.ready.set(1 if state == "ready" else 0)

    def _bring_up(self) -> None:
        try:
            self._set_state("warming")
            self._warm_up()
            if self._run_selftest:
                self._set_state("self-test")
                if not self._self_test():
                    self._set_state("failed")
                    return
            self._set_state("ready")
            log.info("ready: %s (%s)", self.model_id, self.describe()["device"])
        except Exception as e:  # a start-up failure leaves the service not-ready with the reason, never half-up
            log.exception("start-up failed")
            self.selftest = {"passed": False, "line": f"start-up failed: {type(e).__name__}: {e}"}
            self._set_state("failed")

    def _warm_up(self) -> None:
        s = self.engine.image_size
        tokens = self.pre.tokenizer(["a warm-up caption"])
        for n in sorted({1, self.batching.max_batch}):
            self._run("image", [torch.zeros(3, s, s)] * n)
            self._run("text", [tokens] * n)

    def _self_test(self) -> bool:
        from .selftest import load_reference, reference_from_model, run_selftest, selftest_dict

        if self.loaded.manifest is not None:
            ref = load_reference(self.loaded.source["engine_dir"])
            if ref is None:
                self.selftest = {"passed": None, "line": "no self-test reference in this export (exported before "
                                 "they were written): serving unchecked; re-export to get one"}
                log.warning(self.selftest["line"])
                return True
        else:
            ref = reference_from_model(self.loaded.model)
        result = run_selftest(ref, self.embed_images_sync, self.embed_texts_sync, self.precision)
        self.selftest = selftest_dict(result)
        self.metrics.selftest_cosine.labels("image").set(result.image_min_cosine)
        self.metrics.selftest_cosine.labels("text").set(result.text_min_cosine)
        (log.info if result.passed else log.error)(result.line)
        return result.passed

    # -------------------------------------------------------------------------------------------------- engine
    def _run(self, kind: str, payloads: list) -> np.ndarray:
        """The batcher's call (worker thread only): stack and encode; float32 rows on the host."""
        with torch.inference_mode():
            if kind == "image":
                emb = self.engine.encode_images(torch.stack(payloads))
            else:
                emb = self.engine.encode_texts(torch.cat(payloads))
        return emb.float().cpu().numpy()

    def _decode_image(self, data: bytes, where: str) -> torch.Tensor:
        t0 = time.perf_counter()
        img = decode_image(self.pre.transform, data, where, self.limits.max_pixels)
        t1 = time.perf_counter()
        x = preprocess_image(self.pre.transform, img, where)
        self.metrics.stage.labels("decode", "image").observe(t1 - t0)
        self.metrics.stage.labels("preprocess", "image").observe(time.perf_counter() - t1)
        return x

    def _tokenize(self, text: str) -> torch.Tensor:
        t0 = time.perf_counter()
        ids = self.pre.tokenizer([text])
        self.metrics.stage.labels("preprocess", "text").observe(time.perf_counter() - t0)
        return ids

    def _text_groups(self, ids: Sequence[torch.Tensor]) -> list | None:
        return [int(t.shape[1]) for t in ids] if self.group_texts else None

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout if timeout is not None else self.batching.request_timeout_s)

    def _check_ready(self) -> None:
        if not self.ready:
            msg = f"not ready ({self.state})"
            if self.state == "failed" and self.selftest:
                msg += f": {self.selftest.get('line')}"
            raise RequestError(503, "not_ready", msg, {"Retry-After": "5"})

    # ------------------------------------------------------------------------------------------------- embed
    async def embed_images(self, images: Sequence[tuple[str, bytes]], timeout: float | None = None) -> np.ndarray:
        """``[(where, bytes)]`` -> ``[n, E]`` float32 rows, from the cache where it has them."""
        self._check_ready()
        if not images:
            raise RequestError(422, "bad_request", "empty batch: give at least one image")
        if len(images) > self.limits.max_items:
            raise RequestError(413, "too_large", f"{len(images)} images in one request, over the limit of "
                               f"{self.limits.max_items}")
        deadline = self._deadline(timeout)
        keys = self._keys("image", (data for _, data in images))
        rows, _, todo = self._cached("image", keys)
        if todo:
            loop = asyncio.get_running_loop()
            pixels = await asyncio.gather(*(loop.run_in_executor(self.pool, self._decode_image, images[i][1],
                                                                 images[i][0]) for i in todo))
            out = await self.batcher.submit("image", pixels, None, deadline)
            self._fill(rows, todo, keys, out)
        return np.stack(rows)

    async def embed_texts(self, texts: Sequence[str], timeout: float | None = None,
                          where: str = "input") -> tuple[np.ndarray, int]:
        """Captions -> (``[n, E]`` float32 rows, tokens used); ``where`` names the field in error messages."""
        self._check_ready()
        texts = check_captions(list(texts), self.limits, where)
        deadline = self._deadline(timeout)
        keys = self._keys("text", (t.encode("utf-8") for t in texts))
        rows, tokens, todo = self._cached("text", keys)
        if todo:
            loop = asyncio.get_running_loop()
            ids = await asyncio.gather(*(loop.run_in_executor(self.pool, self._tokenize_checked, texts[i],
                                                              f"{where}[{i}]") for i in todo))
            counts = [count_tokens(t) for t in ids]
            out = await self.batcher.submit("text", ids, self._text_groups(ids), deadline)
            self._fill(rows, todo, keys, out, counts)
            for i, n in zip(todo, counts):
                tokens[i] = n
        return np.stack(rows), sum(tokens)

    def _tokenize_checked(self, text: str, where: str) -> torch.Tensor:
        from priorclip.errors import DataError

        try:
            return self._tokenize(text)
        except DataError as e:  # PIR's cleaning leaves nothing of the caption
            raise RequestError(422, "bad_text", f"{where}: {e}") from None

    def _keys(self, kind: str, payloads) -> list[bytes | None]:
        """Cache keys; with the cache off no input is hashed (a SHA-256 of every image would be wasted work)."""
        return [self.cache.key(kind, p) if self.cache.capacity else None for p in payloads]

    def _cached(self, kind: str, keys: list[bytes | None]) -> tuple[list, list[int], list[int]]:
        """(rows, token counts, indices to compute) from the cache."""
        hits = [None if k is None else self.cache.get(k) for k in keys]
        todo = [i for i, h in enumerate(hits) if h is None]
        self.metrics.cache.labels(kind, "hit").inc(len(hits) - len(todo))
        self.metrics.cache.labels(kind, "miss").inc(len(todo))
        return [None if h is None else h[0] for h in hits], [0 if h is None else h[1] for h in hits], todo

    def _fill(self, rows: list, todo: list[int], keys: list[bytes | None], out: np.ndarray,
              tokens: list[int] | None = None) -> None:
        for j, (i, row) in enumerate(zip(todo, out)):
            rows[i] = row
            if keys[i] is not None:
                self.cache.put(keys[i], row, tokens[j] if tokens else 0)

    # Synchronous twins for the self-test thread: the same decode, batcher and engine, no cache (it tests the engine).
    def embed_images_sync(self, images: Sequence[bytes]) -> np.ndarray:
        pixels = [self._decode_image(b, f"self-test image {i}") for i, b in enumerate(images)]
        return self.batcher.submit_nowait("image", pixels).result()

    def embed_texts_sync(self, texts: Sequence[str]) -> np.ndarray:
        ids = [self._tokenize(t) for t in texts]
        return self.batcher.submit_nowait("text", ids, self._text_groups(ids)).result()

    # ------------------------------------------------------------------------------------------------- search
    def require_index(self):
        if self.index is None:
            raise RequestError(404, "no_index", "this service has no index (start it with --index INDEX)")
        return self.index

    def search(self, query: np.ndarray, k: int) -> list:
        index = self.require_index()
        if not 1 <= k <= 1000:
            raise RequestError(422, "bad_request", f"k must be between 1 and 1000, got {k}")
        return index.search(np.asarray(query, np.float32).reshape(1, -1), k)[0]

    def item_vector(self, item_id: str) -> np.ndarray:
        index = self.require_index()
        try:
            return index.vector(item_id)
        except KeyError:
            raise RequestError(404, "unknown_id", f"no item {item_id!r} in the index") from None

    def item_meta(self, item_id: str) -> dict:
        index = self.require_index()
        try:
            return index.meta(item_id)
        except KeyError:
            raise RequestError(404, "unknown_id", f"no item {item_id!r} in the index") from None
