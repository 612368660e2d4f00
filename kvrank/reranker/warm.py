"""Precompute passage KV into a reranker's store: exactly the entries `BlockReranker.passage_kv` looks up."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvrank.reranker.disk_store import DiskKVStore
from kvrank.reranker.kv import PassageKV, kv_key
from kvrank.reranker.reranker import BlockReranker
from kvrank.types import Passage


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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**vars(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def warm(reranker: BlockReranker, passages: Sequence[Passage],
         on_batch: Callable[[int, int], None] | None = None) -> WarmResult:
    """Prefill and store every passage whose KV is not in `reranker.store` yet, in batches of similar length.

    `on_batch(passages_done, tokens_done)` is called after each batch (skipped passages are reported first).
    """
    start = time.perf_counter()
    result = WarmResult(passages=len(passages))
    ids = [reranker.block_ids(p) for p in passages]
    keys = [kv_key(reranker.engine.fingerprint, reranker.prefix_ids, x, reranker.storage_tag) for x in ids]
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in todo and key not in reranker.store:
            todo[key] = i
    result.skipped = len(passages) - len(todo)
    if on_batch is not None and result.skipped:
        on_batch(result.skipped, 0)
    order = sorted(todo.values(), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
    size = reranker.config.batch_size
    for lo in range(0, len(order), size):
        batch = order[lo:lo + size]
        t0 = time.perf_counter()
        kvs: list[PassageKV] = reranker.engine.prefill(reranker.prefix_ids, [ids[i] for i in batch],
                                                       [keys[i] for i in batch])
        t1 = time.perf_counter()
        if isinstance(reranker.store, DiskKVStore):
            reranker.store.put_many(kvs)  # one index transaction per batch
        else:
            for kv in kvs:
                reranker.store.put(kv)
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
