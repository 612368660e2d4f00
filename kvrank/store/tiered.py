"""`TieredKVStore`: a node-local store in front of a remote tier that several nodes share.

    get_many:  local ──miss──> remote ──miss──> None (the caller prefills, then puts)
                                  └─hit──> copied into local
    put_many:  local and remote (the remote keeps the first copy of a key)

The local tier (`DiskKVStore` with its SQLite index, LRU and byte budget, or `MemoryKVStore`) stays node-local;
only immutable, checksummed entry objects are shared (`store/remote.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrank.errors import KvrankError
from kvrank.store.kv import CacheStats, KVKey, KVStore, PassageKV, StoreIdentity
from kvrank.store.remote import RemoteTier


class TieredKVStore:
    """A `KVStore` that reads local, then remote, and writes both. `stats()` counts lookups over both tiers
    (`remote` holds the remote's share: hits, misses, corrupt objects, bytes moved); `totals()` is the local
    store's plus this handle's remote counters."""

    def __init__(self, local: KVStore, remote: RemoteTier) -> None:
        if local.identity is not None and (diff := local.identity.mismatch(remote.identity)):
            raise KvrankError(f"the local store and remote_store {remote.url} hold KV of different models or "
                              f"storage settings ({'; '.join(diff)}); pass a store_dir made for this remote store, "
                              "or a new one", param="store_dir")
        self.local = local
        self.remote = remote

    @property
    def identity(self) -> StoreIdentity | None:
        return self.local.identity or self.remote.identity

    @property
    def location(self) -> Path | None:
        return self.local.location

    def get_many(self, keys: Sequence[KVKey]) -> list[PassageKV | None]:
        """Local hits first; the rest from the remote (copied into the local tier); None where both miss."""
        found = self.local.get_many(keys)
        missing = [i for i, kv in enumerate(found) if kv is None]
        if not missing:
            return found
        fetched = self.remote.get_many([keys[i] for i in missing])
        for i, kv in zip(missing, fetched):
            found[i] = kv
        pulled = {kv.key: kv for kv in fetched if kv is not None}
        if pulled:
            self.local.put_many(list(pulled.values()))
        return found

    def put(self, kv: PassageKV) -> None:
        self.put_many([kv])

    def put_many(self, kvs: Sequence[PassageKV]) -> list[KVKey]:
        """Store in the local tier (returns its evictions) and upload to the remote."""
        evicted = self.local.put_many(kvs)
        self.remote.put_many(kvs)
        return evicted

    def __contains__(self, key: object) -> bool:
        return key in self.local or key in self.remote

    def local_contains_many(self, keys: Sequence[KVKey]) -> list[bool]:
        """The local tier's answer only: the remote is not asked."""
        return self.local.local_contains_many(keys)

    def stats(self) -> CacheStats:
        local, remote = self.local.stats(), self.remote.counters
        return CacheStats(hits=local.hits + remote.hits, misses=remote.misses, evictions=local.evictions,
                          entries=local.entries, bytes=local.bytes, remote=remote)

    def totals(self) -> dict[str, Any]:
        return {**self.local.totals(), "remote": self.remote.describe()}

    def close(self) -> None:
        self.local.close()
        self.remote.close()
