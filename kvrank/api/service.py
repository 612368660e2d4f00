"""What the model worker does with a micro-batch of requests (runs on the worker thread, never the event loop).

The API holds no ranking logic of its own: it groups a batch's requests into calls of the `SearchPipeline` that
`kvrank eval` uses, so a search ranks exactly as `kvrank eval` does with the same settings.
- `/v1/search` requests with the same (mode, depth, fusion weight) make one `pipeline.search` call: one
  first-stage search for all of them, then their candidates scored together (`ql`/`yesno` rows of different
  queries share forward passes).
- `/v1/rerank` requests with the same (mode, token budget) make one `pipeline.score` call.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrank.api.batching import Job
from kvrank.pipeline import SearchPipeline, SearchResult
from kvrank.types import Passage, Query

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchWork:
    query: str
    top_k: int
    mode: str  # "none" or a reranker mode
    depth: int
    fusion_weight: float | None  # the first stage's share; None: the reranker's scores alone


@dataclass(frozen=True)
class RerankWork:
    query: str
    documents: list[str]
    mode: str
    max_passage_tokens: int | None = None


@dataclass
class Outcome:
    result: SearchResult | None = None  # search: the pipeline's answer
    scores: list[float] = field(default_factory=list)  # rerank: scores in document order
    timings: dict[str, float] = field(default_factory=dict)
    kv_hits: int = 0
    kv_misses: int = 0
    tokens: int = 0
    batch_queries: int = 1


class Service:
    """`process(batch)` is the batcher's callback."""

    def __init__(self, pipeline: SearchPipeline):
        self.pipeline = pipeline

    def process(self, batch: Sequence[Job]) -> None:
        started = time.perf_counter()
        outcomes = {id(job): Outcome(batch_queries=len(batch)) for job in batch}
        searches = [job for job in batch if isinstance(job.payload, SearchWork)]
        reranks = [job for job in batch if isinstance(job.payload, RerankWork)]
        for group in _groups(searches, lambda w: (w.mode, w.depth, w.fusion_weight)):
            _guard(group, functools.partial(self._search, group, outcomes))
        for group in _groups(reranks, lambda w: (w.mode, w.max_passage_tokens)):
            _guard(group, functools.partial(self._rerank, group, outcomes))
        for job in batch:
            if job.future.done():
                continue
            outcome = outcomes[id(job)]
            outcome.timings["queue"] = (job.started - job.enqueued) * 1e3
            outcome.timings["total"] = (time.perf_counter() - started) * 1e3 + outcome.timings["queue"]
            job.future.set_result(outcome)

    def _search(self, jobs: list[Job], outcomes: dict[int, Outcome]) -> None:
        work: SearchWork = jobs[0].payload
        reranking = work.mode != "none"
        k = max(max(j.payload.top_k, j.payload.depth if reranking else 0) for j in jobs)
        queries = [Query(str(i), j.payload.query) for i, j in enumerate(jobs)]
        results = self.pipeline.search(queries, k=k, depth=work.depth, mode=work.mode,
                                       fusion_weight=work.fusion_weight)
        for job, result in zip(jobs, results):
            outcome = outcomes[id(job)]
            outcome.result = result
            outcome.timings.update(result.timings)
            outcome.kv_hits, outcome.kv_misses = result.kv_hits, result.kv_misses

    def _rerank(self, jobs: list[Job], outcomes: dict[int, Outcome]) -> None:
        work: RerankWork = jobs[0].payload
        docs = [[Passage(str(i), "", text) for i, text in enumerate(j.payload.documents)] for j in jobs]
        scored = self.pipeline.score([j.payload.query for j in jobs], docs, work.mode, work.max_passage_tokens)
        reranker = self.pipeline.reranker_for(work.mode, work.max_passage_tokens)
        tokenizer = reranker.lm.tokenizer
        for i, job in enumerate(jobs):
            outcome = outcomes[id(job)]
            outcome.scores = scored.scores[i]
            outcome.kv_hits, outcome.kv_misses = scored.kv_hits[i], scored.kv_misses[i]
            outcome.timings.update(scored.timings.as_dict())
            outcome.tokens = len(tokenizer(job.payload.query, add_special_tokens=False).input_ids) + sum(
                len(reranker.block_ids(p)) for p in docs[i])


def _groups(jobs: list[Job], key: Callable[[Any], Hashable]) -> list[list[Job]]:
    groups: dict[Hashable, list[Job]] = {}
    for job in jobs:
        groups.setdefault(key(job.payload), []).append(job)
    return list(groups.values())


def _guard(jobs: list[Job], work: Callable[[], None]) -> None:
    """Run one group's work; an error fails that group's requests only."""
    try:
        work()
    except Exception as err:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)
