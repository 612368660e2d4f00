"""Glue between the eval pipeline / demo and a `BlockReranker`: build one from CLI settings, return a hook."""

from __future__ import annotations

from collections.abc import Callable

from kvrank.reranker.fusion import fuse
from kvrank.reranker.kv import KVStore, MemoryKVStore
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.types import Passage, Query, ScoredDoc

RerankFn = Callable[[Query, list[ScoredDoc], dict[str, Passage]], tuple[list[ScoredDoc], dict[str, float]]]


def open_store(store: str | None) -> KVStore:
    """The persistent store at a folder when it exists in this install, else an in-memory LRU store."""
    if store is None:
        return MemoryKVStore()
    try:
        from kvrank.reranker.disk_store import DiskKVStore
    except ImportError:
        from kvrank.errors import KvrankError

        raise KvrankError(f"--store {store}: the persistent KV store is not available in this version; "
                          "omit --store to use the in-memory store") from None
    return DiskKVStore(store)


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
                   dataset=None, **config) -> tuple[RerankFn, Callable[[], dict]]:
    """Build a reranker from CLI settings; returns the hook and a function giving the JSON extras."""
    settings = RerankerConfig(mode=mode, device=device, dtype=dtype, **config,
                              **({"model": model} if model else {}))
    reranker = BlockReranker(settings, store=open_store(store))

    def extra() -> dict:
        stats = reranker.store.stats().as_dict()
        return {"kv_cache": stats, "prefills": reranker.prefills,
                "reranker": {"mode": settings.mode, "model": settings.model, "template": reranker.template.name,
                             "max_passage_tokens": settings.max_passage_tokens,
                             "storage_dtype": settings.storage_dtype, "fusion_weight": fusion_weight}}

    return rerank_hook(reranker, fusion_weight), extra
