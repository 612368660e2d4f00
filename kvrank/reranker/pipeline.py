"""Glue between the eval pipeline / demo and a `BlockReranker`: build one from CLI settings, return a hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvrank.reranker.disk_store import DiskKVStore, StoreConfig, StoreIdentity
from kvrank.reranker.fusion import fuse
from kvrank.reranker.kv import KVStore, MemoryKVStore
from kvrank.reranker.model import fingerprint, load_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.types import Passage, Query, ScoredDoc

RerankFn = Callable[[Query, list[ScoredDoc], dict[str, Passage]], tuple[list[ScoredDoc], dict[str, float]]]


def open_store(store: str | Path | None, identity: StoreIdentity | None = None,
               config: StoreConfig | None = None) -> KVStore:
    """The persistent store in a folder (created for `identity` if new; refused if it holds another model's KV),
    or an in-memory LRU store when no folder is given."""
    if store is None:
        return MemoryKVStore()
    return DiskKVStore(store, identity, config)


def reranker_with_store(settings: RerankerConfig, store: str | Path | None,
                        store_config: StoreConfig | None = None) -> BlockReranker:
    """A reranker whose store was opened with the model's identity, so a store of another model is refused."""
    lm = load_lm(settings.model, device=settings.device, dtype=settings.dtype)
    identity = StoreIdentity(fingerprint=fingerprint(lm.model), storage_tag=settings.storage_tag, model=settings.model)
    return BlockReranker(settings, store=open_store(store, identity, store_config), lm=lm)


def rerank_hook(reranker: BlockReranker, fusion_weight: float | None = None) -> RerankFn:
    """A function that reranks one query's candidates and reports per-stage milliseconds."""

    def rerank_fn(query: Query, candidates: list[ScoredDoc],
                  corpus: dict[str, Passage]) -> tuple[list[ScoredDoc], dict[str, float]]:
        passages = [corpus[d.doc_id] for d in candidates]
        reranked = reranker.rerank(query, passages)
        if fusion_weight is not None:
            reranked = fuse(reranked, candidates, fusion_weight)
        return reranked, reranker.last_timings.as_dict()

    return rerank_fn


def make_rerank_fn(mode: str, model: str | None = None, fusion_weight: float | None = None,
                   store: str | None = None, device: str = "cpu", dtype: str = "float32",
                   dataset=None, **config: Any) -> tuple[RerankFn, Callable[[], dict]]:
    """Build a reranker from CLI settings; returns the hook and a function giving the JSON extras."""
    options: dict[str, Any] = {"mode": mode, "device": device, "dtype": dtype, **config}
    if model:
        options["model"] = model
    settings = RerankerConfig(**options)
    reranker = reranker_with_store(settings, store)

    def extra() -> dict:
        stats = reranker.store.stats().as_dict()  # this run's hits, misses and evictions
        lifetime = {"kv_store": reranker.store.totals()} if isinstance(reranker.store, DiskKVStore) else {}
        return {"kv_cache": stats, **lifetime, "prefills": reranker.prefills,
                "reranker": {"mode": settings.mode, "model": settings.model, "template": reranker.template.name,
                             "max_passage_tokens": settings.max_passage_tokens,
                             "storage_dtype": settings.storage_dtype, "fusion_weight": fusion_weight}}

    return rerank_hook(reranker, fusion_weight), extra
