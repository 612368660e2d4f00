"""What the model worker does with a micro-batch of requests (runs on the worker thread, never the event loop).

The API holds no ranking logic of its own: it groups a batch's requests into calls of the `SearchPipeline` that
`kvrank eval` and the Python library use, so a request ranks exactly as they do with the same settings.
- `/v1/search` requests with the same (mode, depth, fusion weight) make one `pipeline.search` call: one
  first-stage search for all of them, then their candidates scored together (`ql`/`yesno` rows of different
  queries share forward passes).
- `/v1/rerank` and `/rerank` requests with the same (mode, token budget) make one `pipeline.score` call: every
  request's passage KV first (looked up, or prefilled and stored), then the rows of the requests someone still
  waits for (`waiting`); a request abandoned meanwhile (timed out, client gone) is not scored.

`estimate(work)` is each request's `Cost` for admission (passage tokens the store lacks, rows to score);
`process` returns what the batch really did (`Measured`), which calibrates the cost model.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrank.api.batching import Cost, Job, Measured
from kvrank.defaults import NO_RERANK
from kvrank.pipeline import SearchPipeline, SearchResult
from kvrank.reranker.reranker import StageTimings
from kvrank.types import Passage, Query

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchWork:
    query: str
    top_k: int
    mode: str  # NO_RERANK or a reranker mode
    depth: int
    fusion_weight: float | None  # the first stage's share; None: the reranker's scores alone


@dataclass(frozen=True)
class RerankWork:
    query: str
    passages: list[Passage]
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


class Abandoned(Exception):
    """Nobody waits for this job any more (its request timed out or its client went away); it was not finished."""


@dataclass
class _Work:
    """What one batch really did, summed over its groups."""

    tokens: int = 0
    rows: int = 0
    prefill_s: float = 0.0
    scoring_s: float = 0.0

    def add(self, tokens: int, rows: int, timings: StageTimings) -> None:
        self.tokens += tokens
        self.rows += rows
        self.prefill_s += timings.prefill / 1e3
        self.scoring_s += timings.scoring / 1e3


class Service:
    """`process(batch)` is the batcher's callback; `estimate(work)` a request's cost for admission."""

    def __init__(self, pipeline: SearchPipeline):
        self.pipeline = pipeline
        self.rows_dropped = 0  # rows of a running batch skipped because nobody waited for them any more
        # Passage tokens a search prefills per reranked row: unknown before its first stage has run; learnt from
        # the searches served (EWMA), starting from a quarter of a full passage (a store that is partly warm).
        reranker = pipeline.reranker
        self.search_tokens_per_row = reranker.config.max_passage_tokens / 4 if reranker is not None else 0.0

    # ------------------------------------------------------------------ admission (off the event loop)
    def estimate(self, work: SearchWork | RerankWork) -> Cost:
        """Passage tokens to prefill and rows to score. For reranking: the documents' tokens whose KV the
        node-local store lacks (`uncached_tokens`). For `/v1/search`: `depth` rows and the prefill learnt from
        earlier searches (the candidates are known only after the first stage)."""
        if isinstance(work, SearchWork):
            if work.mode == NO_RERANK:
                return Cost(0, 0)
            return Cost(round(work.depth * self.search_tokens_per_row), work.depth)
        reranker = self.pipeline.reranker_for(work.mode, work.max_passage_tokens)
        return Cost(reranker.uncached_tokens(work.passages), len(work.passages))

    # ------------------------------------------------------------------ the worker
    def process(self, batch: Sequence[Job]) -> Measured:
        started = time.perf_counter()
        done = _Work()
        outcomes = {id(job): Outcome(batch_queries=len(batch)) for job in batch}
        searches = [job for job in batch if isinstance(job.payload, SearchWork)]
        reranks = [job for job in batch if isinstance(job.payload, RerankWork)]
        for group in _groups(searches, lambda w: (w.mode, w.depth, w.fusion_weight)):
            _guard(group, functools.partial(self._search, group, outcomes, done))
        for group in _groups(reranks, lambda w: (w.mode, w.max_passage_tokens)):
            _guard(group, functools.partial(self._rerank, group, outcomes, done))
        for job in batch:
            if job.future.done():
                continue
            if job.abandoned:
                job.future.set_exception(Abandoned("the request was given up before its batch finished it"))
                continue
            outcome = outcomes[id(job)]
            outcome.timings["queue"] = (job.started - job.enqueued) * 1e3
            outcome.timings["total"] = (time.perf_counter() - started) * 1e3 + outcome.timings["queue"]
            job.future.set_result(outcome)
        return Measured(Cost(done.tokens, done.rows), done.prefill_s, done.scoring_s)

    def _search(self, jobs: list[Job], outcomes: dict[int, Outcome], done: _Work) -> None:
        jobs = [j for j in jobs if not j.abandoned]
        if not jobs:
            return
        work: SearchWork = jobs[0].payload
        reranking = work.mode != NO_RERANK
        k = max(max(j.payload.top_k, j.payload.depth if reranking else 0) for j in jobs)
        queries = [Query(str(i), j.payload.query) for i, j in enumerate(jobs)]
        reranker = self.pipeline.reranker_for(work.mode) if reranking else None
        before = reranker.prefill_tokens if reranker is not None else 0
        results = self.pipeline.search(queries, k=k, depth=work.depth, mode=work.mode,
                                       fusion_weight=work.fusion_weight)
        for job, result in zip(jobs, results):
            outcome = outcomes[id(job)]
            outcome.result = result
            outcome.timings.update(result.timings)
            outcome.kv_hits, outcome.kv_misses = result.kv_hits, result.kv_misses
        if reranker is not None:
            tokens, rows = reranker.prefill_tokens - before, sum(r.reranked for r in results)
            # the call's stage times, reported by every result that was reranked (a query without candidates
            # reports only its own retrieval, and would teach the cost model that prefill and scoring are free)
            shared = next((r.timings for r in results if r.reranked), {})
            done.add(tokens, rows, StageTimings(prefill=shared.get("prefill", 0.0),  # a head's time is per row too
                                                scoring=shared.get("scoring", 0.0) + shared.get("head", 0.0)))
            if rows:
                self.search_tokens_per_row = 0.7 * self.search_tokens_per_row + 0.3 * tokens / rows

    def _rerank(self, jobs: list[Job], outcomes: dict[int, Outcome], done: _Work) -> None:
        self.rows_dropped += sum(len(j.payload.passages) for j in jobs if j.abandoned)
        jobs = [j for j in jobs if not j.abandoned]
        if not jobs:
            return
        work: RerankWork = jobs[0].payload
        reranker = self.pipeline.reranker_for(work.mode, work.max_passage_tokens)
        before = reranker.prefill_tokens
        scored = [False] * len(jobs)

        def waiting(i: int) -> bool:  # asked once every list's passage KV is stored
            scored[i] = not jobs[i].abandoned
            return scored[i]

        result = self.pipeline.score([j.payload.query for j in jobs], [j.payload.passages for j in jobs],
                                     mode=work.mode, max_passage_tokens=work.max_passage_tokens, waiting=waiting)
        tokenizer, rows = reranker.lm.tokenizer, 0
        for i, job in enumerate(jobs):
            passages = job.payload.passages
            if not scored[i]:
                self.rows_dropped += len(passages)
                continue
            outcome = outcomes[id(job)]
            outcome.scores = result.scores[i]
            outcome.kv_hits, outcome.kv_misses = result.kv_hits[i], result.kv_misses[i]
            outcome.timings.update(result.timings.as_dict())
            outcome.tokens = (len(tokenizer(job.payload.query, add_special_tokens=False).input_ids)
                              + result.block_tokens[i])
            rows += len(passages)
        done.add(reranker.prefill_tokens - before, rows, result.timings)


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
