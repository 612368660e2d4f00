"""Evaluation: run a `SearchPipeline` over a collection's test queries, one query at a time, and report metrics
of the first stage and of the final ranking side by side, with per-stage latency after warm-up.

Only what the first stage retrieved is reranked (never the known-relevant passages): a pipeline reranks the top
`rerank_depth` of the first stage's top `k`; docs below the depth keep their first-stage order after the reranked
ones, with scores below the lowest reranked score so that every evaluator sees the same order.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from kvrank.errors import KvrankError
from kvrank.eval.conventions import Convention, convention_for
from kvrank.eval.latency import StageTimer
from kvrank.eval.metrics import evaluate, per_query
from kvrank.eval.significance import TEST_NAME, paired_tests
from kvrank.io import atomic_write_text
from kvrank.pipeline import PipelineConfig, SearchPipeline, SearchResult
from kvrank.types import Dataset, Query, Run

logger = logging.getLogger(__name__)


class TimedResult(NamedTuple):
    """One query's `SearchResult` and its wall time in ms (the report's "total" stage)."""

    result: SearchResult
    total_ms: float


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
    # query id -> {"text", "warmup", "first_stage": {metric: value}, "final": {metric: value}, "latency_ms":
    # {stage: ms}}, in search order; the first `settings["warmup_queries"]` are marked `"warmup": true`.
    per_query: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Reranked vs first stage, only when reranked: {"test": TEST_NAME, "p_values": {metric: p}}.
    significance: dict[str, Any] | None = None
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
            "per_query": self.per_query,
        }
        if self.significance is not None:
            out["significance"] = self.significance
        clash = out.keys() & self.extra.keys()
        if clash:
            raise ValueError(f"extra report fields {sorted(clash)} would overwrite the report's own fields")
        return out | self.extra

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """A report read back from its JSON. The JSON holds no rankings: `run` and `first_stage_run` are
        empty (write them with `kvrank eval --run`); everything else round-trips, unknown top-level fields
        landing in `extra`."""
        own = {"dataset", "retriever", "queries", "metrics", "first_stage_metrics", "latency_ms", "settings",
               "machine", "per_query", "significance"}
        return cls(dataset=data["dataset"], retriever=data["retriever"], queries=data["queries"],
                   first_stage_run={}, run={}, metrics=data["metrics"],
                   first_stage_metrics=data["first_stage_metrics"], latency_ms=data["latency_ms"],
                   settings=data.get("settings", {}), machine=data.get("machine", {}),
                   per_query=data.get("per_query", {}), significance=data.get("significance"),
                   extra={k: v for k, v in data.items() if k not in own})


def load_report(path: str | Path) -> EvalReport:
    """Read a report written by `kvrank eval --json`, with an error naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KvrankError(f"no such report: {path}; pass a file written by `EvalReport.write_json` (`kvrank eval "
                          "--json`)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KvrankError(f"{path} is not a kvrank eval report (not JSON: {error}); pass a file written by "
                          "`EvalReport.write_json` (`kvrank eval --json`)") from None
    missing = {"dataset", "retriever", "queries", "metrics", "first_stage_metrics", "latency_ms"} - (
        data.keys() if isinstance(data, dict) else set())
    if missing:
        raise KvrankError(f"{path} is not a kvrank eval report (missing {sorted(missing)}); pass a file written "
                          "by `EvalReport.write_json` (`kvrank eval --json`)")
    return EvalReport.from_dict(data)


def run_eval(
    dataset: Dataset,
    pipeline: SearchPipeline,
    *,
    max_queries: int | None = None,
    warmup: int = 1,
    settings: dict[str, Any] | None = None,
    show_progress: bool = False,
    convention: Convention | None = None,
) -> EvalReport:
    """Evaluate `pipeline` (its first stage, and its reranker if it has one, with the depth, `k` and fusion
    weight of its config) on the first `max_queries` test queries of `dataset` (sorted id order), with the
    collection's relevance level and metrics (`convention`, by default `conventions.convention_for(dataset)`)."""
    queries = eval_queries(dataset, max_queries)
    timed = search_each(pipeline, queries, show_progress=show_progress)
    return eval_report(dataset, timed, first_stage=pipeline.first_stage.name, config=pipeline.config,
                       reranking=pipeline.reranker is not None, max_queries=max_queries, warmup=warmup,
                       settings=settings, extra=pipeline.describe(), convention=convention)


def eval_queries(dataset: Dataset, max_queries: int | None = None) -> list[Query]:
    """The judged test queries an evaluation runs: the first `max_queries` in sorted id order."""
    if max_queries is not None and max_queries < 1:
        raise KvrankError(f"max_queries must be >= 1, got {max_queries}", param="max_queries")
    queries = dataset.sorted_queries(max_queries)
    if not queries:
        raise KvrankError(f"{dataset.source or dataset.name} has no judged test queries to evaluate")
    return queries


def search_each(pipeline: SearchPipeline, queries: Sequence[Query],
                show_progress: bool = False) -> list[TimedResult]:
    """Search one query at a time, each with its wall time in ms. One at a time, so that a query's latency is
    its own, and its scoring batches are formed from its own candidates alone: the same query ranks identically
    whichever queries run before or beside it (`kvrank eval --ray` splits them over workers)."""
    timed = []
    for query in tqdm(queries, desc="queries", disable=not show_progress):
        start = time.perf_counter()
        result = pipeline.search([query])[0]
        timed.append(TimedResult(result, (time.perf_counter() - start) * 1000.0))
    return timed


def eval_report(dataset: Dataset, timed: Sequence[TimedResult], *, first_stage: str, config: PipelineConfig,
                reranking: bool, max_queries: int | None, warmup: int = 1, settings: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None, convention: Convention | None = None) -> EvalReport:
    """Runs, metrics and latency of searched queries (`timed`, in the order they are reported), wherever they
    were searched: in this process (`run_eval`) or on Ray workers (`kvrank.cluster.jobs.search_queries`).
    Metrics and relevance level are `convention`'s (default: the collection's); when reranked, each metric gets
    a paired randomization test of final vs first stage over the per-query values."""
    convention = convention or convention_for(dataset)
    names, level = convention.metrics, convention.rel_level
    timer = StageTimer(warmup=warmup)
    first_run: Run = {}
    final_run: Run = {}
    queries: dict[str, dict[str, Any]] = {}
    for position, (result, total_ms) in enumerate(timed):
        for stage, ms in result.timings.items():
            timer.add(stage, ms)
        query_id = result.query.query_id
        first_run[query_id] = result.first_stage
        final_run[query_id] = result.hits
        timer.add("total", total_ms)
        queries[query_id] = {"text": result.query.text, "warmup": position < warmup,
                             "latency_ms": {**result.timings, "total": total_ms}}

    qrels = [q for q in dataset.qrels if q.query_id in first_run]
    first_metrics = evaluate(first_run, qrels, names, level)
    metrics = evaluate(final_run, qrels, names, level) if reranking else dict(first_metrics)
    first_values = per_query(first_run, qrels, names, level)
    final_values = per_query(final_run, qrels, names, level) if reranking else first_values
    for query_id, entry in queries.items():
        # ir_measures yields nothing for a query without judged documents; every metric is then 0
        zeros = dict.fromkeys(first_metrics, 0.0)
        entry["first_stage"] = first_values.get(query_id, zeros)
        entry["final"] = final_values.get(query_id, zeros)
    significance = None
    if reranking:
        first_pq = {qid: entry["first_stage"] for qid, entry in queries.items()}
        final_pq = {qid: entry["final"] for qid, entry in queries.items()}
        significance = {"test": TEST_NAME, "p_values": paired_tests(first_pq, final_pq, names)}
    return EvalReport(
        dataset=dataset.name,
        retriever=first_stage,
        queries=len(timed),
        first_stage_run=first_run,
        run=final_run,
        metrics=metrics,
        first_stage_metrics=first_metrics,
        latency_ms=timer.summary(),
        settings={
            "k": config.k,
            "max_queries": max_queries,
            "rerank": reranking,
            "rerank_depth": config.rerank_depth if reranking else None,
            "warmup_queries": warmup,
            "source": dataset.source,
            "rel_level": level,
            "rel_level_basis": convention.basis,
            "metrics": list(names),
            **(settings or {}),
        },
        machine=machine_info(),
        per_query=queries,
        significance=significance,
        extra=extra or {},
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
    native = sys.modules.get("kvrank.attention.native")
    info["native_attn_kernel"] = native.loaded() if native is not None else None  # None: no attn pass asked for it
    return info
