"""KV keys and the in-memory store: exact hits, misses and eviction order."""

from __future__ import annotations

import threading

import pytest
import torch

from kvrank.store.kv import KVStore, MemoryKVStore, PassageKV, StoreIdentity, kv_key
from kvrank.store.remote import RemoteTier
from kvrank.store.tiered import TieredKVStore


def entry(name: str, tokens: int = 4) -> PassageKV:
    key = kv_key("model-a", [1, 2], [ord(c) for c in name], "dtype=float16")
    t = torch.zeros(1, tokens, 2, dtype=torch.float16)  # (Hkv, T, D): 16 bytes per tensor for 4 tokens
    return PassageKV(key=key, keys=[t.clone()], values=[t.clone()])


def test_key_changes_with_everything_that_changes_the_bytes():
    base = kv_key("model-a", [1], [5, 6], "dtype=float16")
    assert base == kv_key("model-a", [1], [5, 6], "dtype=float16")
    assert base != kv_key("model-b", [1], [5, 6], "dtype=float16")
    assert base != kv_key("model-a", [2], [5, 6], "dtype=float16")
    assert base != kv_key("model-a", [1], [5, 7], "dtype=float16")
    assert base != kv_key("model-a", [1], [5, 6], "dtype=float32")
    assert base != kv_key("model-a", [1, 5], [6], "dtype=float16")  # the prefix/block boundary matters


def test_hits_misses_and_lru_eviction_order():
    a, b, c, d = (entry(x) for x in "abcd")
    store = MemoryKVStore(max_bytes=3 * a.nbytes)
    assert isinstance(store, KVStore)
    for e in (a, b, c):
        store.put(e)
    assert store.get_many([a.key, d.key]) == [a, None]  # a becomes most recent
    store.put(d)  # over budget: evicts b (least recently used), not a
    assert b.key not in store and a.key in store and c.key in store and d.key in store
    assert store.evict(a.nbytes) == [c.key, a.key]  # shrink to one entry, LRU first
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (1, 1, 3, 1, d.nbytes)


def test_local_contains_many_is_membership_that_counts_nothing_and_keeps_the_lru_order():
    a, b, c = (entry(x) for x in "abc")
    store = MemoryKVStore(max_bytes=2 * a.nbytes)
    store.put(a)
    store.put(b)
    store.get_many([a.key])  # b is now the least recently used
    assert store.local_contains_many([b.key, c.key, a.key]) == [True, False, True]
    stats = store.stats()
    assert (stats.hits, stats.misses) == (1, 0)
    store.put(c)  # evicts b: the check did not make it recent
    assert b.key not in store and a.key in store and c.key in store


def test_tiered_local_contains_many_asks_only_the_local_tier(tmp_path):
    identity = StoreIdentity(fingerprint="model-a", storage_tag="dtype=float16")
    remote = RemoteTier(f"file://{tmp_path}/remote", identity)
    a, b = entry("a"), entry("b")
    remote.put_many([a])
    tiered = TieredKVStore(MemoryKVStore(identity=identity), remote)
    assert isinstance(tiered, KVStore)
    tiered.put(b)  # local and remote
    assert a.key in tiered and a.key not in tiered.local  # only the remote tier holds a
    assert tiered.local_contains_many([a.key, b.key, entry("c").key]) == [False, True, False]
    assert (remote.counters.hits, remote.counters.misses) == (0, 0)


def test_entry_larger_than_budget_is_not_stored_and_readers_keep_their_tensors():
    store = MemoryKVStore(max_bytes=entry("x").nbytes)
    big = entry("big", tokens=64)
    store.put(big)
    assert big.key not in store
    small = entry("s")
    store.put(small)
    held = store.get_many([small.key])[0]
    store.evict(0)
    assert small.key not in store and held is not None and held.keys[0].shape == (1, 4, 2)


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryKVStore(max_bytes=-1)


def test_concurrent_puts_and_gets_keep_byte_count_exact():
    store = MemoryKVStore(max_bytes=10**9)
    entries = [entry(f"e{i}") for i in range(200)]

    def work(chunk):
        for e in chunk:
            store.put(e)
            store.get_many([e.key])

    threads = [threading.Thread(target=work, args=(entries[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = store.stats()
    assert stats.entries == 200 and stats.bytes == sum(e.nbytes for e in entries) and stats.hits == 200
