"""Passage KV for a reranker: content-addressed keys, store lookup, prefill (and store) on a miss.

A passage's key hashes the model fingerprint, the template's prefix ids, the block's own token ids and the storage
tag (dtype, layout, KV format): `store.kv.kv_key`. Passages with the same key share one entry and one prefill.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from torch.profiler import record_function

from kvrank.reranker.blocks import BlockEngine
from kvrank.reranker.tokens import PromptTokens
from kvrank.store.kv import KVKey, KVStore, PassageKV, kv_key
from kvrank.types import Passage


@dataclass
class StageTimings:
    """Milliseconds spent per reranker stage in one scoring call."""

    kv_lookup: float = 0.0
    prefill: float = 0.0
    scoring: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"kv_lookup": self.kv_lookup, "prefill": self.prefill, "scoring": self.scoring}


class PassageKVSource:
    """Finds each passage's KV in `store`, prefilling (with `engine`, after the template's prefix) and storing the
    misses. Counts what it prefilled: `prefills` passages, `prefill_tokens` block tokens."""

    def __init__(self, tokens: PromptTokens, engine: BlockEngine, store: KVStore, storage_tag: str):
        self.tokens = tokens
        self.engine = engine
        self.store = store
        self.storage_tag = storage_tag
        self.prefills = 0  # passages prefilled (store misses) since construction
        self.prefill_tokens = 0  # their block tokens (what the API's cost model is calibrated on)

    def keys(self, passages: Sequence[Passage]) -> tuple[list[list[int]], list[KVKey]]:
        """Each passage's block token ids and the content-addressed key its KV is stored under."""
        ids = self.tokens.blocks_ids(passages)
        prefix = self.tokens.prefix_ids
        return ids, [kv_key(self.engine.fingerprint, prefix, x, self.storage_tag) for x in ids]

    def prefill(self, ids: Sequence[Sequence[int]], keys: Sequence[KVKey]) -> list[PassageKV]:
        """Blocks encoded after the prefix, in the engine's KV format (nothing is stored)."""
        return self.engine.prefill(self.tokens.prefix_ids, ids, keys)

    def lookup(self, passages: Sequence[Passage], timings: StageTimings) -> tuple[list[PassageKV], int]:
        """The KV of each passage and how many were prefilled; lookup and prefill time add to `timings`."""
        t0 = time.perf_counter()
        with record_function("kvrank.kv_lookup"):
            ids, keys = self.keys(passages)
            found = self.store.get_many(keys)
        timings.kv_lookup += (time.perf_counter() - t0) * 1e3
        missing = [i for i, kv in enumerate(found) if kv is None]
        fresh: list[PassageKV] = []
        if missing:
            t1 = time.perf_counter()
            # Duplicated passages share one prefill.
            unique = list(dict.fromkeys(keys[i] for i in missing))
            first = {keys[i]: i for i in reversed(missing)}
            with record_function("kvrank.prefill"):
                fresh = self.prefill([ids[first[k]] for k in unique], unique)
            by_key = {kv.key: kv for kv in fresh}
            self.store.put_many(fresh)
            for i in missing:
                found[i] = by_key[keys[i]]
            self.prefills += len(fresh)
            self.prefill_tokens += sum(len(ids[first[k]]) for k in unique)
            timings.prefill += (time.perf_counter() - t1) * 1e3
        return [kv for kv in found if kv is not None], len(fresh)

    def uncached_tokens(self, passages: Sequence[Passage]) -> int:
        """Block tokens of the distinct passages whose KV the store's node-local tier lacks (what a lookup would
        prefill, counting a remote tier's entries as misses: the safe side for admission control)."""
        ids, keys = self.keys(passages)
        distinct = dict(zip(keys, ids))
        held = self.store.local_contains_many(list(distinct))
        return sum(len(block) for block, present in zip(distinct.values(), held) if not present)
