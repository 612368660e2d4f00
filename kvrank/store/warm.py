"""Precompute passage KV into a store: exactly the entries a reranker's lookup will ask for.

The store does not know how KV is computed: a `Prefiller` (in practice `BlockReranker`) names each passage's
entry and computes missing ones, so this module depends on no model code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvrank.store.kv import KVKey, KVStore, PassageKV
from kvrank.types import Passage


class Prefiller(Protocol):
    """What warming needs from whatever computes passage KV."""

    store: KVStore

    @property
    def batch_size(self) -> int: ...

    def passage_keys(self, passages: Sequence[Passage]) -> tuple[list[list[int]], list[KVKey]]:
        """Each passage's block token ids and the key its KV is stored under."""
        ...

    def prefill(self, ids: Sequence[Sequence[int]], keys: Sequence[KVKey]) -> list[PassageKV]:
        """The KV of each block, in the store's format."""
        ...


@dataclass
class WarmResult:
    passages: int = 0  # passages asked for
    skipped: int = 0  # already stored (or a duplicate of another passage's block)
    prefilled: int = 0
    tokens: int = 0  # tokens prefilled
    bytes: int = 0  # tensor bytes prefilled (the store adds a small header per entry)
    prefill_s: float = 0.0  # model time
    store_s: float = 0.0  # writing entries, index updates, eviction
    seconds: float = 0.0  # wall time, tokenization included
    evicted: int = 0  # entries evicted to stay within the store's budget

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**vars(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def warm(source: Prefiller, passages: Sequence[Passage],
         on_batch: Callable[[int, int], None] | None = None) -> WarmResult:
    """Prefill and store every passage whose KV is not in `source.store` yet, in batches of similar length.

    Resumable: a second run skips what is stored. `on_batch(passages_done, tokens_done)` is called after each
    batch (skipped passages are reported first).
    """
    start = time.perf_counter()
    result = WarmResult(passages=len(passages))
    store = source.store
    ids, keys = source.passage_keys(passages)
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in todo and key not in store:
            todo[key] = i
    result.skipped = len(passages) - len(todo)
    if on_batch is not None and result.skipped:
        on_batch(result.skipped, 0)
    order = sorted(todo.values(), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
    size = source.batch_size
    for lo in range(0, len(order), size):
        batch = order[lo:lo + size]
        t0 = time.perf_counter()
        kvs = source.prefill([ids[i] for i in batch], [keys[i] for i in batch])
        t1 = time.perf_counter()
        result.evicted += len(store.put_many(kvs))  # one index transaction per batch
        t2 = time.perf_counter()
        result.prefill_s += t1 - t0
        result.store_s += t2 - t1
        tokens = sum(kv.num_tokens for kv in kvs)
        result.prefilled += len(kvs)
        result.tokens += tokens
        result.bytes += sum(kv.nbytes for kv in kvs)
        if on_batch is not None:
            on_batch(len(kvs), tokens)
    result.seconds = time.perf_counter() - start
    return result
