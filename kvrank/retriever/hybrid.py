"""Hybrid first stage: fuse BM25 and dense rankings.

- `rrf` (default): reciprocal-rank fusion, score(d) = sum over lists of 1 / (rrf_k + rank(d)), rank from 1,
  rrf_k = 60 (Cormack et al., 2009), over each retriever's top-`depth` list.
- `interpolate`: per query, min-max normalise each list's scores to [0, 1] (a doc missing from a list
  gets 0), then score(d) = weight * dense(d) + (1 - weight) * bm25(d).
Ties are broken by doc id so runs are reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvrank.defaults import DEFAULT_HYBRID_FUSION, DEFAULT_HYBRID_WEIGHT
from kvrank.errors import KvrankError
from kvrank.retriever.base import Retriever
from kvrank.types import Query, Run, ScoredDoc

FUSIONS = ("rrf", "interpolate")


@dataclass(frozen=True)
class FusionConfig:
    method: str = DEFAULT_HYBRID_FUSION
    rrf_k: int = 60
    depth: int = 100  # how many docs each retriever contributes
    weight: float = DEFAULT_HYBRID_WEIGHT  # dense weight for `interpolate`

    def __post_init__(self) -> None:
        if self.method not in FUSIONS:
            raise KvrankError(f"FusionConfig.method {self.method!r} is not supported; use one of {', '.join(FUSIONS)}",
                              param="FusionConfig.method")
        if not 0.0 <= self.weight <= 1.0:
            raise KvrankError(f"FusionConfig.weight must be in [0, 1], got {self.weight}", param="FusionConfig.weight")
        if self.depth < 1 or self.rrf_k < 0:
            raise KvrankError(f"FusionConfig.depth must be >= 1 and FusionConfig.rrf_k >= 0, got {self.depth} and "
                              f"{self.rrf_k}", param="FusionConfig.depth" if self.depth < 1 else "FusionConfig.rrf_k")


def rrf(rankings: list[list[ScoredDoc]], rrf_k: int = 60) -> dict[str, float]:
    """Reciprocal-rank fusion of ranked lists (best first) of one query: doc id -> fused score."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[doc.doc_id] = fused.get(doc.doc_id, 0.0) + 1.0 / (rrf_k + rank)
    return fused


def interpolate(dense: list[ScoredDoc], sparse: list[ScoredDoc], weight: float) -> dict[str, float]:
    """`weight * minmax(dense) + (1 - weight) * minmax(sparse)`; a doc absent from a list scores 0 there."""
    norm_dense, norm_sparse = _minmax(dense), _minmax(sparse)
    return {
        doc_id: weight * norm_dense.get(doc_id, 0.0) + (1.0 - weight) * norm_sparse.get(doc_id, 0.0)
        for doc_id in norm_dense.keys() | norm_sparse.keys()
    }


def _minmax(ranking: list[ScoredDoc]) -> dict[str, float]:
    if not ranking:
        return {}
    low, high = min(d.score for d in ranking), max(d.score for d in ranking)
    span = high - low
    return {d.doc_id: (d.score - low) / span if span > 0 else 1.0 for d in ranking}


class HybridRetriever:
    kind = "hybrid"

    def __init__(self, sparse: Retriever, dense: Retriever, config: FusionConfig | None = None) -> None:
        self.sparse = sparse
        self.dense = dense
        self.config = config or FusionConfig()
        detail = (
            f"rrf k={self.config.rrf_k}"
            if self.config.method == "rrf"
            else f"interpolate w={self.config.weight}"
        )
        self.last_timings: dict[str, float] = {}
        self.name = f"hybrid({sparse.name} + {dense.name}; {detail}; depth {self.config.depth})"

    def search(self, queries: list[Query], k: int) -> Run:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        depth = max(k, self.config.depth)
        start = time.perf_counter()
        sparse_run = self.sparse.search(queries, depth)
        middle = time.perf_counter()
        dense_run = self.dense.search(queries, depth)
        # Per-component milliseconds of the last call; the eval pipeline reports them as sub-stages.
        self.last_timings = {"retrieve.sparse": (middle - start) * 1000.0,
                             "retrieve.dense": (time.perf_counter() - middle) * 1000.0}
        run: Run = {}
        for query in queries:
            sparse_docs = sparse_run.get(query.query_id, [])
            dense_docs = dense_run.get(query.query_id, [])
            if self.config.method == "rrf":
                fused = rrf([sparse_docs, dense_docs], self.config.rrf_k)
            else:
                fused = interpolate(dense_docs, sparse_docs, self.config.weight)
            ranked = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
            run[query.query_id] = [ScoredDoc(query.query_id, doc_id, score) for doc_id, score in ranked]
        return run
