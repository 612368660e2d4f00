"""What the model worker does with a micro-batch of requests (runs on the worker thread, never the event loop).

For a batch: one `retriever.search` call for every search request in it; each request's candidates get their
passage KV from the store (misses are prefilled and stored, so a document sent twice is prefilled once); then
every `ql` request of the batch is scored in shared forward passes (`score_ql_many`: rows of (query, passage)
pairs, `batch_size` rows per forward, filled across request boundaries). Other modes score one request at a time.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from kvrank.api.batching import Job
from kvrank.errors import KvrankError
from kvrank.reranker.fusion import fuse
from kvrank.reranker.kv import PassageKV
from kvrank.reranker.reranker import BlockReranker
from kvrank.reranker.reranker import Timings as StageTimings
from kvrank.retriever.base import Retriever
from kvrank.types import Passage, Query, ScoredDoc

logger = logging.getLogger(__name__)

POOL_SIZE = 8  # rerankers kept for (mode, max_passage_tokens) variants of the base one


@dataclass
class Components:
    """Everything the API serves, built beforehand (tests pass tiny models; `server.py` loads real ones).

    `reranker`'s mode is the default; other modes and token budgets are derived from it and share its model and
    KV store."""

    corpus: Mapping[str, Passage]
    retriever: Retriever
    reranker: BlockReranker
    model_name: str = ""

    def __post_init__(self) -> None:
        self.model_name = self.model_name or self.reranker.config.model


@dataclass
class SearchWork:
    query: str
    top_k: int
    mode: str  # "none" or a reranker mode
    depth: int
    fusion_weight: float | None = None


@dataclass
class RerankWork:
    query: str
    documents: list[str]
    mode: str
    max_passage_tokens: int | None = None


@dataclass
class Outcome:
    candidates: list[Passage] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # candidate order; empty when not reranked
    first_stage: list[ScoredDoc] = field(default_factory=list)  # search: the first-stage ranking (top k)
    final: list[ScoredDoc] | None = None  # search: reranked (fused) head, best first
    timings: dict[str, float] = field(default_factory=dict)
    kv_hits: int = 0
    kv_misses: int = 0
    tokens: int = 0
    batch_queries: int = 1


class RerankerPool:
    """The base reranker plus variants for other modes / token budgets (LRU, `POOL_SIZE`), sharing lm and store."""

    def __init__(self, base: BlockReranker):
        self.base = base
        self._pool: OrderedDict[tuple[str, int], BlockReranker] = OrderedDict()
        self._pool[(base.config.mode, base.config.max_passage_tokens)] = base

    def get(self, mode: str, max_passage_tokens: int | None = None) -> BlockReranker:
        tokens = min(max_passage_tokens or self.base.config.max_passage_tokens, self.base.config.max_passage_tokens)
        key = (mode, tokens)
        if key not in self._pool:
            config = replace(self.base.config, mode=mode, max_passage_tokens=tokens)
            self._pool[key] = BlockReranker(config, store=self.base.store, lm=self.base.lm,
                                            basis=self.base.engine.codec.basis)
            while len(self._pool) > POOL_SIZE:
                oldest = next(k for k in self._pool if self._pool[k] is not self.base)
                del self._pool[oldest]
        self._pool.move_to_end(key)
        return self._pool[key]


class Service:
    """`process(batch)` is the batcher's callback."""

    def __init__(self, components: Components):
        self.components = components
        self.pool = RerankerPool(components.reranker)

    def process(self, batch: Sequence[Job]) -> None:
        outcomes: dict[int, Outcome] = {}
        started = time.perf_counter()
        searches = [job for job in batch if isinstance(job.payload, SearchWork)]
        if searches:
            try:
                self._retrieve(searches, outcomes)
            except Exception as err:
                _fail(searches, err)
        live = [job for job in batch if not job.future.done()]
        ql_groups: dict[int, list[tuple[Job, BlockReranker, list[PassageKV]]]] = {}
        for job in live:
            outcome = outcomes.setdefault(id(job), Outcome())
            outcome.batch_queries = len(batch)
            try:
                self._prepare(job, outcome, ql_groups)
            except Exception as err:
                _fail([job], err)
        for group in ql_groups.values():
            try:
                t0 = time.perf_counter()
                reranker = group[0][1]
                scores = score_ql_many(reranker, [_query(j) for j, _, _ in group], [b for _, _, b in group])
                ms = (time.perf_counter() - t0) * 1e3
                for (job, _, _), s in zip(group, scores):
                    outcomes[id(job)].scores = s
                    outcomes[id(job)].timings["scoring"] = ms
            except Exception as err:
                _fail([j for j, _, _ in group], err)
        for job in batch:
            if job.future.done():
                continue
            outcome = outcomes[id(job)]
            if isinstance(job.payload, SearchWork):
                outcome.final = self._final(job.payload, outcome)
            outcome.timings["queue"] = (job.started - job.enqueued) * 1e3
            outcome.timings["total"] = (time.perf_counter() - started) * 1e3 + outcome.timings["queue"]
            job.future.set_result(outcome)

    # ------------------------------------------------------------------ stages
    def _retrieve(self, jobs: list[Job], outcomes: dict[int, Outcome]) -> None:
        corpus = self.components.corpus
        k = max(max(j.payload.top_k, j.payload.depth if j.payload.mode != "none" else 0) for j in jobs)
        t0 = time.perf_counter()
        run = self.components.retriever.search([Query(str(i), j.payload.query) for i, j in enumerate(jobs)], k)
        ms = (time.perf_counter() - t0) * 1e3
        for i, job in enumerate(jobs):
            work: SearchWork = job.payload
            ranked = run.get(str(i), [])
            outcome = outcomes.setdefault(id(job), Outcome())
            outcome.first_stage = ranked[: max(work.top_k, work.depth)]
            outcome.timings["retrieve"] = ms
            if work.mode != "none":
                outcome.candidates = [corpus[d.doc_id] for d in ranked[: work.depth] if d.doc_id in corpus]

    def _prepare(self, job: Job, outcome: Outcome,
                 ql_groups: dict[int, list[tuple[Job, BlockReranker, list[PassageKV]]]]) -> None:
        work = job.payload
        if isinstance(work, RerankWork):
            outcome.candidates = [Passage(str(i), "", text) for i, text in enumerate(work.documents)]
            reranker = self.pool.get(work.mode, work.max_passage_tokens)
        elif work.mode == "none" or not outcome.candidates:
            return
        else:
            reranker = self.pool.get(work.mode)
        stages = StageTimings()
        before = reranker.prefills
        if reranker.config.mode == "ql":
            blocks = reranker.passage_kv(outcome.candidates, stages)
            ql_groups.setdefault(id(reranker), []).append((job, reranker, blocks))
        else:
            outcome.scores = reranker.score(work.query, outcome.candidates)
            stages = reranker.last_timings
        outcome.kv_misses = reranker.prefills - before
        outcome.kv_hits = len(outcome.candidates) - outcome.kv_misses
        outcome.timings.update(kv_lookup=stages.kv_lookup, prefill=stages.prefill, scoring=stages.scoring)
        if isinstance(work, RerankWork):
            tokenizer = reranker.lm.tokenizer
            outcome.tokens = len(tokenizer(work.query, add_special_tokens=False).input_ids) + sum(
                len(reranker.block_ids(p)) for p in outcome.candidates)

    def _final(self, work: SearchWork, outcome: Outcome) -> list[ScoredDoc] | None:
        if not outcome.scores:
            return None
        first = {d.doc_id: d for d in outcome.first_stage}
        reranked = sorted((ScoredDoc("q", p.doc_id, s) for p, s in zip(outcome.candidates, outcome.scores)),
                          key=lambda d: -d.score)
        if work.fusion_weight is not None:
            reranked = fuse(reranked, [first[p.doc_id] for p in outcome.candidates], work.fusion_weight)
        return reranked


def score_ql_many(reranker: BlockReranker, queries: Sequence[str],
                  blocks: Sequence[Sequence[PassageKV]]) -> list[list[float]]:
    """Query-likelihood scores of several queries, each over its own blocks, in shared forward passes.

    Equal (to float tolerance) to `reranker.score(query, passages)` per query in ql mode: rows are (query,
    block) pairs, as in `BlockReranker._score_ql`, but one forward holds rows of different queries (right-padded
    new tokens; a query token never sees the padding after it). Returns scores per query in block order.
    """
    engine, device = reranker.engine, reranker.lm.device
    spans = [reranker.query_ids(q) for q in queries]  # (ids, start, end) of each query's own tokens
    if any(start == 0 for _, start, _ in spans):
        raise KvrankError(f"template {reranker.template.name!r}: ql needs text before {{query}} in the query part")
    rows = [(qi, bi) for qi, row in enumerate(blocks) for bi in range(len(row))]
    out = [[0.0] * len(row) for row in blocks]
    size = reranker.config.batch_size
    for c in range(0, len(rows), size):
        chunk = rows[c:c + size]
        lo = min(spans[qi][1] for qi, _ in chunk)
        hi = max(spans[qi][2] for qi, _ in chunk)
        keep = torch.arange(lo - 1, hi - 1, device=device)  # positions that predict some row's query tokens
        logits, _ = engine.run(reranker.prefix_ids, [[blocks[qi][bi]] for qi, bi in chunk],
                               [spans[qi][0] for qi, _ in chunk], logits_to_keep=keep)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, hi - lo, V)
        for r, (qi, bi) in enumerate(chunk):
            ids, start, end = spans[qi]
            targets = torch.tensor(ids[start:end], device=device)  # (Lq,)
            own = logp[r, start - lo:end - lo]  # (Lq, V): position start-1+t predicts token start+t
            out[qi][bi] = float(own.gather(-1, targets[:, None])[:, 0].mean())
    return out


def _query(job: Job) -> str:
    return str(job.payload.query)


def _fail(jobs: Sequence[Job], err: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(err)
