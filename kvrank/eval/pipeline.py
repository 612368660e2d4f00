"""The evaluation pipeline: first stage (a retriever, or candidates from a run file), optional reranking,
metrics of both stages side by side, and per-stage latency after warm-up.

The reranking hook is a plain function, so the reranker stays a separate package:

    rerank_fn(query, candidates, corpus) -> (reranked, timings_ms)

`candidates` are the query's top-`rerank_depth` first-stage ScoredDocs (only docs present in the corpus),
`corpus` maps doc id -> Passage; `reranked` holds the same docs with the reranker's scores, `timings_ms` the
time per reranker stage (e.g. {"kv_lookup": 1.2, "prefill": 30.5, "scoring": 4.0}), merged into the latency
stats. Docs below the rerank depth keep their first-stage order after the reranked ones, with scores below the
lowest reranked score so that every evaluator sees the same order.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvrank.errors import KvrankError
from kvrank.eval.latency import StageTimer
from kvrank.eval.metrics import evaluate
from kvrank.io import atomic_write_text
from kvrank.retriever.base import Retriever
from kvrank.types import Dataset, Passage, Query, Run, ScoredDoc

logger = logging.getLogger(__name__)

RerankFn = Callable[[Query, list[ScoredDoc], dict[str, Passage]], tuple[list[ScoredDoc], dict[str, float]]]


@dataclass
class EvalReport:
    dataset: str
    retriever: str
    queries: int
    first_stage_run: Run
    run: Run  # the final ranking (== first_stage_run without reranking)
    metrics: dict[str, float]
    first_stage_metrics: dict[str, float]
    latency_ms: dict[str, dict[str, float]]
    settings: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    # Merged into the top level of the JSON (e.g. the reranker's "kv_cache" stats).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "retriever": self.retriever,
            "queries": self.queries,
            "metrics": self.metrics,
            "first_stage_metrics": self.first_stage_metrics,
            "latency_ms": self.latency_ms,
            "settings": self.settings,
            "machine": self.machine,
        }
        clash = out.keys() & self.extra.keys()
        if clash:
            raise ValueError(f"extra report fields {sorted(clash)} would overwrite the report's own fields")
        return out | self.extra

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def run_eval(
    dataset: Dataset,
    first_stage: Retriever | Run,
    *,
    k: int = 100,
    max_queries: int | None = None,
    rerank_fn: RerankFn | None = None,
    rerank_depth: int = 20,
    warmup: int = 1,
    first_stage_name: str | None = None,
    settings: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> EvalReport:
    """Evaluate `first_stage` (a Retriever, or a Run of candidates such as a TREC DL BM25 pool) on the first
    `max_queries` test queries of `dataset` (sorted id order), optionally reranking the top `rerank_depth`."""
    if k < 1:
        raise KvrankError(f"--k must be >= 1, got {k}")
    if max_queries is not None and max_queries < 1:
        raise KvrankError(f"--max-queries must be >= 1, got {max_queries}")
    if rerank_depth < 1:
        raise KvrankError(f"--rerank-depth must be >= 1, got {rerank_depth}")
    queries = dataset.sorted_queries(max_queries)
    if not queries:
        raise KvrankError(f"{dataset.source or dataset.name} has no judged test queries to evaluate")
    candidates: Run | None = None
    retriever: Retriever | None = None
    if isinstance(first_stage, dict):
        candidates = first_stage
        _check_candidates(candidates, queries, dataset)
    else:
        retriever = first_stage
    name = first_stage_name or (retriever.name if retriever is not None else "candidates")

    timer = StageTimer(warmup=warmup)
    first_run: Run = {}
    final_run: Run = {}
    for query in tqdm(queries, desc="queries", disable=not show_progress):
        start = time.perf_counter()
        if retriever is None:
            ranked = list((candidates or {}).get(query.query_id, []))[:k]
        else:
            with timer.stage("retrieve"):
                ranked = retriever.search([query], k).get(query.query_id, [])
            # A retriever may report its own sub-stages (the hybrid: retrieve.sparse, retrieve.dense).
            for stage, ms in getattr(retriever, "last_timings", {}).items():
                timer.add(stage, ms)
        first_run[query.query_id] = ranked
        if rerank_fn is not None:
            with timer.stage("rerank"):
                final, stage_ms = _rerank_one(query, ranked, dataset.corpus, rerank_fn, rerank_depth)
            for stage, ms in stage_ms.items():
                timer.add(stage, ms)
            final_run[query.query_id] = final
        else:
            final_run[query.query_id] = ranked
        timer.add("total", (time.perf_counter() - start) * 1000.0)

    evaluated = {q.query_id for q in queries}
    qrels = [q for q in dataset.qrels if q.query_id in evaluated]
    first_metrics = evaluate(first_run, qrels)
    metrics = evaluate(final_run, qrels) if rerank_fn is not None else dict(first_metrics)
    return EvalReport(
        dataset=dataset.name,
        retriever=name,
        queries=len(queries),
        first_stage_run=first_run,
        run=final_run,
        metrics=metrics,
        first_stage_metrics=first_metrics,
        latency_ms=timer.summary(),
        settings={
            "k": k,
            "max_queries": max_queries,
            "rerank": rerank_fn is not None,
            "rerank_depth": rerank_depth if rerank_fn is not None else None,
            "warmup_queries": warmup,
            "source": dataset.source,
            **(settings or {}),
        },
        machine=machine_info(),
    )


def _rerank_one(
    query: Query, ranked: list[ScoredDoc], corpus: dict[str, Passage], rerank_fn: RerankFn, depth: int
) -> tuple[list[ScoredDoc], dict[str, float]]:
    head, tail = ranked[:depth], ranked[depth:]
    candidates = [d for d in head if d.doc_id in corpus]
    unrankable = [d for d in head if d.doc_id not in corpus]
    if not candidates:
        return ranked, {}
    reranked, stage_ms = rerank_fn(query, candidates, corpus)
    if sorted(d.doc_id for d in reranked) != sorted(d.doc_id for d in candidates):
        raise ValueError(
            f"rerank_fn must return exactly the {len(candidates)} candidates it was given for query "
            f"{query.query_id!r}, got {len(reranked)} docs"
        )
    reranked = sorted(
        (ScoredDoc(query.query_id, d.doc_id, float(d.score)) for d in reranked), key=lambda d: -d.score
    )
    floor = reranked[-1].score
    rest = [ScoredDoc(query.query_id, d.doc_id, floor - 1.0 - i) for i, d in enumerate(unrankable + tail)]
    return reranked + rest, dict(stage_ms)


def _check_candidates(candidates: Run, queries: list[Query], dataset: Dataset) -> None:
    missing = [q.query_id for q in queries if q.query_id not in candidates]
    if len(missing) == len(queries):
        raise KvrankError(
            f"the candidates run names none of the {len(queries)} test queries of "
            f"{dataset.source or dataset.name} (e.g. {missing[:3]}); is it a run for this dataset?"
        )
    if missing:
        logger.warning(
            "the candidates run has no results for %d of %d test queries (e.g. %s); they score 0",
            len(missing),
            len(queries),
            missing[:3],
        )
    unknown = {d.doc_id for q in queries for d in candidates.get(q.query_id, [])} - dataset.corpus.keys()
    if unknown:
        logger.warning(
            "the candidates run names %d doc ids not in the corpus (e.g. %s); they are evaluated but "
            "never reranked",
            len(unknown),
            sorted(unknown)[:3],
        )


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
