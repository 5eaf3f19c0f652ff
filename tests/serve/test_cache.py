"""The embedding cache: least-recently-used eviction, keys that separate engines and input kinds, private rows."""

from __future__ import annotations

import numpy as np
import pytest

from priorclip.serve.cache import EmbeddingCache


def test_lru_eviction_order_and_counts():
    c = EmbeddingCache(2, "engine-a")
    ka, kb, kc = (c.key("text", s) for s in (b"a", b"b", b"c"))
    c.put(ka, np.ones(3), 5)
    c.put(kb, np.zeros(3), 7)
    assert c.get(ka)[1] == 5  # a is now the most recent: b goes first
    c.put(kc, np.full(3, 2.0), 1)
    assert c.get(kb) is None and c.get(ka) is not None and c.get(kc)[1] == 1
    assert len(c) == 2 and (c.hits, c.misses) == (3, 1)


def test_keys_separate_engines_kinds_and_bytes():
    a, b = EmbeddingCache(8, "engine-a"), EmbeddingCache(8, "engine-b")
    assert a.key("text", b"x") != b.key("text", b"x")
    assert a.key("text", b"x") != a.key("image", b"x")
    assert a.key("text", b"x") != a.key("text", b"x ")
    assert a.key("text", b"x") == EmbeddingCache(1, "engine-a").key("text", b"x")


def test_rows_are_private_copies_and_zero_capacity_is_off():
    c = EmbeddingCache(4, "e")
    row = np.arange(3, dtype=np.float32)
    k = c.key("image", b"img")
    c.put(k, row)
    row[0] = 99
    got, tokens = c.get(k)
    assert got[0] == 0 and tokens == 0
    with pytest.raises(ValueError):
        got[1] = 5
    off = EmbeddingCache(0, "e")
    off.put(k, row)
    assert off.get(k) is None and len(off) == 0
    with pytest.raises(ValueError):
        EmbeddingCache(-1, "e")
