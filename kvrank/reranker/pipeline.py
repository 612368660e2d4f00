"""Glue between the eval pipeline / demo and a `BlockReranker`: build one from CLI settings, return a hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvrank.attention.kvformat import AUTO
from kvrank.reranker.disk_store import DiskKVStore, StoreConfig, StoreIdentity
from kvrank.reranker.formats import (
    DEFAULT_CALIBRATION_PASSAGES,
    Calibration,
    calibration_sample,
    resolve_auto,
    resolve_basis,
    store_format,
)
from kvrank.reranker.fusion import fuse
from kvrank.reranker.kv import KVStore, MemoryKVStore
from kvrank.reranker.model import load_lm
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
                        store_config: StoreConfig | None = None,
                        calibration: Calibration | None = None) -> BlockReranker:
    """A reranker whose store was opened with the model's identity and KV format, so a store of another model or
    format is refused. A fitted format takes its basis from the store, or fits it on `calibration` passages (a
    sample of the corpus) and saves it with a new store."""
    lm = load_lm(settings.model, device=settings.device, dtype=settings.dtype)
    settings = resolve_auto(settings, lm)
    basis = resolve_basis(settings, store, lm, calibration)
    reranker = BlockReranker(settings, store=MemoryKVStore(), lm=lm, basis=basis)
    identity = StoreIdentity(fingerprint=reranker.engine.fingerprint, storage_tag=reranker.storage_tag,
                             model=settings.model)
    reranker.store = open_store(store, identity, store_config)
    return reranker


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
                   dataset=None, calibration: Calibration | None = None,
                   calibration_passages: int = DEFAULT_CALIBRATION_PASSAGES,
                   **config: Any) -> tuple[RerankFn, Callable[[], dict]]:
    """Build a reranker from CLI settings; returns the hook and a function giving the JSON extras. A fitted KV
    format without a store basis is fitted on `calibration` (default: a sample of `dataset`'s corpus)."""
    options: dict[str, Any] = {"mode": mode, "device": device, "dtype": dtype, **config}
    if "kv_format" not in options:  # an existing store's own layout, else the model's recommended one
        options["kv_format"] = store_format(store) or AUTO
    if model:
        options["model"] = model
    settings = RerankerConfig(**options)
    if calibration is None and dataset is not None:  # sampled only if a basis has to be fitted
        def calibration() -> list[Passage]:
            return calibration_sample(list(dataset.corpus.values()), calibration_passages)
    reranker = reranker_with_store(settings, store, calibration=calibration)
    settings = reranker.config

    def extra() -> dict:
        stats = reranker.store.stats().as_dict()  # this run's hits, misses and evictions
        lifetime = {"kv_store": reranker.store.totals()} if isinstance(reranker.store, DiskKVStore) else {}
        return {"kv_cache": stats, **lifetime, "prefills": reranker.prefills,
                "reranker": {"mode": settings.mode, "model": settings.model, "template": reranker.template.name,
                             "max_passage_tokens": settings.max_passage_tokens,
                             "storage_dtype": settings.storage_dtype, "kv_format": settings.format.name,
                             "fusion_weight": fusion_weight}}

    return rerank_hook(reranker, fusion_weight), extra
