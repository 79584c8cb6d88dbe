"""The LRU cache behind the prompt-embedding and control-latent caches."""

import pytest

from previewd.pipelines.lru import LruCache


def test_least_recently_used_entry_goes_first():
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


def test_get_or_compute_computes_once_and_clear_forgets():
    cache: LruCache[str, list] = LruCache(4)
    calls = []
    first = cache.get_or_compute("k", lambda: calls.append(1) or ["value"])
    assert cache.get_or_compute("k", lambda: calls.append(1) or ["other"]) is first and calls == [1]
    cache.clear()
    assert len(cache) == 0 and cache.get("k") is None


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="max_size"):
        LruCache(0)
