"""A bounded LRU of embeddings, keyed by the engine and the exact input bytes.

A retrieval service sees the same queries and tiles again and again (a popular caption, a tile re-submitted by a
pipeline): a hit skips decoding, preprocessing and the engine. The key is a SHA-256 of the engine's name and
identity, the input's kind and its bytes (the UTF-8 caption, the image file as sent), so two engines or an image and
a caption never share an entry. Each entry is a row and the tokens its caption used (0 for images), so a cached
caption costs no tokenising either. Thread-safe: decode workers and the event loop use it at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


class EmbeddingCache:
    def __init__(self, capacity: int, engine_key: str) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._prefix = hashlib.sha256(engine_key.encode()).digest()
        self._entries: OrderedDict[bytes, tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, payload: bytes) -> bytes:
        h = hashlib.sha256(self._prefix)
        h.update(kind.encode() + b"\0")
        h.update(payload)
        return h.digest()

    def get(self, key: bytes) -> tuple[np.ndarray, int] | None:
        if not self.capacity:
            return None
        with self._lock:
            v = self._entries.get(key)
            if v is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: bytes, value: np.ndarray, tokens: int = 0) -> None:
        if not self.capacity:
            return
        value = np.array(value, dtype=np.float32)  # a private, read-only copy: callers cannot change a cached row
        value.flags.writeable = False
        with self._lock:
            self._entries[key] = (value, int(tokens))
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
