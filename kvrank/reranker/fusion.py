"""Fusion of reranker scores with first-stage scores: per-query z-score normalisation, then interpolation."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from kvrank.types import ScoredDoc


def zscore(scores: Sequence[float]) -> list[float]:
    if len(scores) < 2:
        return [0.0] * len(scores)
    mean, std = statistics.fmean(scores), statistics.pstdev(scores)
    return [(s - mean) / std if std > 0 else 0.0 for s in scores]


def fuse(reranked: Sequence[ScoredDoc], first_stage: Sequence[ScoredDoc], weight: float) -> list[ScoredDoc]:
    """(1 - `weight`) * z(reranker) + `weight` * z(first stage), over the docs both lists hold; best first.

    `weight` is the first stage's share: 0 keeps the reranker's order, 1 the first stage's.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    first = {d.doc_id: d.score for d in first_stage}
    docs = [d for d in reranked if d.doc_id in first]
    z_rerank = zscore([d.score for d in docs])
    z_first = zscore([first[d.doc_id] for d in docs])
    fused = [ScoredDoc(d.query_id, d.doc_id, (1 - weight) * zr + weight * zf)
             for d, zr, zf in zip(docs, z_rerank, z_first)]
    return sorted(fused, key=lambda d: -d.score)
