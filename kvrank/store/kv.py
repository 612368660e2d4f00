"""Passage KV records, their content-addressed keys, and the `KVStore` interface with an in-memory LRU store.

Layout (version `LAYOUT_VERSION`): a `PassageKV` holds, per layer, keys and values `[kv_heads, T, head_dim]` in the
storage dtype. Keys are post-RoPE at canonical positions `P .. P+T-1` (P = prefix length); the block attended to
the shared prefix and to itself only, so the bytes do not depend on any query. A compressed `--kv-format`
(`attention/kvformat.py`) stores its own per-layer tensors with T at dim -2 (codes, latents) plus named scales in
`aux`; the format's name is part of the key, so entries of different formats never meet.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NewType, Protocol, runtime_checkable

import torch

LAYOUT_VERSION = 1

KVKey = NewType("KVKey", str)


def kv_key(fingerprint: str, prefix_ids: Sequence[int], token_ids: Sequence[int], storage: str) -> KVKey:
    """Content hash over everything that changes the stored bytes.

    fingerprint: the model's weights/config fingerprint; prefix_ids: the shared prefix the block attended to;
    token_ids: the block's own tokens; storage: dtype, layout version and compression settings.
    """
    h = hashlib.blake2b(digest_size=20)
    for part in (f"kvrank-layout-{LAYOUT_VERSION}", fingerprint, storage):
        h.update(part.encode())
        h.update(b"\x00")
    h.update(torch.tensor(list(prefix_ids), dtype=torch.int64).numpy().tobytes())
    h.update(b"\x01")
    h.update(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return KVKey(h.hexdigest())


@dataclass
class PassageKV:
    """One block's KV: `keys[l]`, `values[l]` are `[kv_heads, T, head_dim]` (or a format's `[*, T, *]` codes);
    `aux` holds a format's extra per-layer tensors (scales)."""

    key: KVKey
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[-2])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *self.aux.values()))


@dataclass
class RemoteCounters:
    """What one handle of a shared remote tier did (`store/remote.py`): lookups it answered (`hits`) or not, objects
    that failed their checksum and were quarantined, transport errors (each a miss or a skipped upload), bytes
    fetched and uploaded, entries uploaded, and uploads skipped because another node had stored the key first."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    uploaded: int = 0
    present: int = 0


@dataclass
class CacheStats:
    """A handle's lookups (`hits` from any tier, `misses` that the caller prefilled) and evictions, with the local
    store's entries and bytes; `remote` is set for a tiered store, whose local hits are `hits - remote.hits`."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    remote: RemoteCounters | None = None

    def as_dict(self) -> dict[str, Any]:
        total = self.hits + self.misses
        out: dict[str, Any] = {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                               "entries": self.entries, "bytes": self.bytes,
                               "hit_rate": round(self.hits / total, 4) if total else 0.0}
        if self.remote is not None:
            out |= {"local_hits": self.hits - self.remote.hits, "remote": asdict(self.remote)}
        return out


def store_totals(stats: CacheStats, tokens: int, max_bytes: int, corrupt: int = 0) -> dict[str, int | float]:
    """`KVStore.totals()` from a store's lifetime counters: one layout for every store."""
    lookups = stats.hits + stats.misses
    return {"entries": stats.entries, "tokens": tokens, "bytes": stats.bytes,
            "bytes_per_token": round(stats.bytes / tokens, 1) if tokens else 0.0, "max_bytes": max_bytes,
            "hits": stats.hits, "misses": stats.misses, "hit_rate": round(stats.hits / lookups, 4) if lookups else 0.0,
            "evictions": stats.evictions, "corrupt": corrupt}


@dataclass(frozen=True)
class StoreIdentity:
    """What the stored bytes depend on besides the tokens: a store holds KV of exactly one identity."""

    fingerprint: str
    storage_tag: str
    layout_version: int = LAYOUT_VERSION
    model: str = ""  # informational: the name the model was loaded by

    def mismatch(self, other: StoreIdentity) -> list[str]:
        return [f"{name} {getattr(self, name)!r} != {getattr(other, name)!r}"
                for name in ("fingerprint", "storage_tag", "layout_version")
                if getattr(self, name) != getattr(other, name)]


@runtime_checkable
class KVStore(Protocol):
    """Where passage KV lives. Implementations differ only in where the bytes are kept.

    `identity` is what every entry was computed with (None: a store that accepts any, e.g. a fresh in-memory one);
    `location` the folder of a persistent store (None: in memory, gone with the process)."""

    @property
    def identity(self) -> StoreIdentity | None: ...

    @property
    def location(self) -> Path | None: ...

    def get_many(self, keys: Sequence[KVKey]) -> list[PassageKV | None]:
        """The stored KV for each key, or None for a miss (counted in stats)."""
        ...

    def put(self, kv: PassageKV) -> None: ...

    def put_many(self, kvs: Sequence[PassageKV]) -> list[KVKey]:
        """Store several entries at once (one index transaction where the store has one); returns the keys of
        entries evicted to stay within the byte budget."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def local_contains_many(self, keys: Sequence[KVKey]) -> list[bool]:
        """Whether each key is held where a lookup asks no other machine: a tiered store's node-local tier (a
        remote check is a network call per key), any other store itself. Counts no hit or miss, moves no entry in
        the eviction order."""
        ...

    def stats(self) -> CacheStats:
        """This handle's hits, misses and evictions with the store's current entries and bytes."""
        ...

    def totals(self) -> dict[str, int | float]:
        """The whole store: entries, tokens, bytes, bytes_per_token, max_bytes and lifetime counters."""
        ...

    def close(self) -> None: ...


@dataclass
class MemoryKVStore:
    """In-process LRU store bounded by a byte budget. Thread-safe.

    Eviction drops least-recently-used entries until the budget holds; an entry larger than the whole budget is not
    stored. Entries handed out by `get_many` are plain tensors that stay valid after eviction (eviction only drops
    the store's reference), so eviction never invalidates what a reader holds.
    """

    max_bytes: int = 2 * 1024**3
    identity: StoreIdentity | None = None
    _entries: OrderedDict[KVKey, PassageKV] = field(default_factory=OrderedDict, repr=False)
    _stats: CacheStats = field(default_factory=CacheStats, repr=False)  # lifetime counters; `entries` unused
    _tokens: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")

    def get_many(self, keys: Sequence[KVKey]) -> list[PassageKV | None]:
        out: list[PassageKV | None] = []
        with self._lock:
            for key in keys:
                kv = self._entries.get(key)
                if kv is None:
                    self._stats.misses += 1
                else:
                    self._stats.hits += 1
                    self._entries.move_to_end(key)
                out.append(kv)
        return out

    def put(self, kv: PassageKV) -> None:
        self.put_many([kv])

    def put_many(self, kvs: Sequence[PassageKV]) -> list[KVKey]:
        evicted: list[KVKey] = []
        with self._lock:
            for kv in kvs:
                if kv.key in self._entries:
                    self._entries.move_to_end(kv.key)
                    continue
                size = kv.nbytes
                if size > self.max_bytes:
                    continue
                self._entries[kv.key] = kv
                self._stats.bytes += size
                self._tokens += kv.num_tokens
                evicted += self._evict_to(self.max_bytes)
        return evicted

    def evict(self, max_bytes: int) -> list[KVKey]:
        """Shrink to `max_bytes`, least recently used first; returns the evicted keys in eviction order."""
        with self._lock:
            return self._evict_to(max_bytes)

    def _evict_to(self, max_bytes: int) -> list[KVKey]:
        evicted = []
        while self._stats.bytes > max_bytes and self._entries:
            key, old = self._entries.popitem(last=False)
            self._stats.bytes -= old.nbytes
            self._tokens -= old.num_tokens
            self._stats.evictions += 1
            evicted.append(key)
        return evicted

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def local_contains_many(self, keys: Sequence[KVKey]) -> list[bool]:
        with self._lock:
            return [key in self._entries for key in keys]

    def keys(self) -> Iterable[KVKey]:
        return list(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> CacheStats:
        return CacheStats(hits=self._stats.hits, misses=self._stats.misses, evictions=self._stats.evictions,
                          entries=len(self._entries), bytes=self._stats.bytes)

    @property
    def location(self) -> Path | None:
        return None

    def totals(self) -> dict[str, int | float]:
        with self._lock:
            return store_totals(self._snapshot(), self._tokens, self.max_bytes)

    def close(self) -> None:
        """Nothing to release: the entries go with the process."""
