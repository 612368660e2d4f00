"""The API's routes (`router`), over the `Served` objects `create_app` puts in `app.state.served`.

- `POST /v1/search`: retrieve, then rerank with stored passage KV (`SearchPipeline.search`);
- `POST /v1/rerank`, `/v2/rerank`: Cohere's and Jina's rerank APIs (`SearchPipeline.score`);
- `POST /rerank`: Hugging Face text-embeddings-inference's rerank API (`SearchPipeline.score`);
- `GET /healthz`, `/readyz`, `/metrics`: liveness, readiness, Prometheus.

Handlers validate against the server's limits, hand the model work to `Admission.run`, and shape its outcome.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvrank.api.admission import Admission
from kvrank.api.errors import ERRORS, ApiError, limit_exceeded
from kvrank.api.metrics import Metrics
from kvrank.api.schemas import (
    FirstStage,
    Health,
    Hit,
    KVCacheUse,
    Readiness,
    RerankMeta,
    RerankRequest,
    RerankResponse,
    RerankResult,
    SearchRequest,
    SearchResponse,
    TeiRank,
    TeiRerankRequest,
    Timings,
    Usage,
)
from kvrank.api.service import Outcome, RerankWork, SearchWork
from kvrank.api.settings import Settings
from kvrank.defaults import NO_RERANK, RERANK_MODES
from kvrank.pipeline import SearchPipeline
from kvrank.reranker.reranker import BlockReranker
from kvrank.types import Passage

# Paths counted by name in the request metrics (any other path is `other`).
ROUTES = ("/v1/search", "/v1/rerank", "/v2/rerank", "/rerank", "/healthz", "/readyz", "/metrics", "/openapi.json",
          "/docs")
TEXT = "text"  # the field a plain-string document is, and the default rank field
TITLE = "title"  # the rank field that is the passage's title
# Library argument names (`KvrankError.param`) as each route's request fields, where they differ.
SEARCH_PARAMS = {"queries": "query", "k": "top_k", "depth": "rerank.depth", "mode": "rerank.mode",
                 "fusion_weight": "rerank.fusion_weight"}
RERANK_PARAMS = {"queries": "query", "candidates": "documents", "top_k": "top_n", "mode": "model",
                 "max_passage_tokens": "max_tokens_per_doc"}
TEI_PARAMS = {"queries": "query", "candidates": "texts", "documents": "texts"}


@dataclass(frozen=True)
class Served:
    """What the routes serve: the pipeline, the settings, the way to the model worker, the metrics."""

    pipeline: SearchPipeline
    settings: Settings
    admission: Admission
    metrics: Metrics
    replica: str | None = None

    @property
    def reranker(self) -> BlockReranker:
        reranker = self.pipeline.reranker
        assert reranker is not None  # create_app refuses a pipeline without one
        return reranker


def served(request: Request) -> Served:
    return request.app.state.served


ServedDep = Annotated[Served, Depends(served)]
router = APIRouter()


# ---------------------------------------------------------------------------------------------- /v1/search
@router.post("/v1/search", response_model=SearchResponse, responses=ERRORS, tags=["search"],
             summary="Retrieve, then rerank with stored passage KV")
async def search(body: SearchRequest, request: Request, s: ServedDep) -> SearchResponse:
    settings, pipeline = s.settings, s.pipeline
    query = check_query(body.query, settings)
    if body.top_k > settings.max_top_k:
        raise limit_exceeded("top_k", body.top_k, "", "max_top_k", settings.max_top_k)
    mode = body.rerank.mode or settings.rerank_mode
    depth = body.rerank.depth or min(settings.rerank_depth, settings.max_rerank_depth)
    if depth > settings.max_rerank_depth:
        raise limit_exceeded("rerank.depth", depth, "", "max_rerank_depth", settings.max_rerank_depth)
    weight = settings.fusion_weight if "fusion_weight" not in body.rerank.model_fields_set \
        else body.rerank.fusion_weight
    outcome = await s.admission.run(SearchWork(query, body.top_k, mode, depth, weight), request, SEARCH_PARAMS)
    head = pipeline.head_for(mode)  # a scoring head replaces fusion in its mode
    return SearchResponse(
        query=query, retriever=pipeline.first_stage.name, mode=mode, depth=depth,
        fusion_weight=weight if mode != NO_RERANK and head is None else None,
        adapter=pipeline.adapter_digest if mode != NO_RERANK else None,
        head=head.digest if head is not None else None,
        hits=_hits(outcome, body.top_k, pipeline, settings),
        timings_ms=Timings(**outcome.timings), kv_cache=KVCacheUse(hits=outcome.kv_hits, misses=outcome.kv_misses),
        batch_queries=outcome.batch_queries)


# ---------------------------------------------------------------------------------------------- /v1/rerank
@router.post("/v1/rerank", response_model=RerankResponse, responses=ERRORS, tags=["rerank"],
             summary="Rerank documents (Cohere / Jina compatible)")
async def rerank(body: RerankRequest, request: Request, s: ServedDep) -> RerankResponse:
    settings = s.settings
    query = check_query(body.query, settings)
    check_count("documents", len(body.documents), settings)
    if body.top_n is not None and body.top_n > settings.max_documents:
        raise limit_exceeded("top_n", body.top_n, "", "max_documents", settings.max_documents)
    fields = _rank_fields(body.rank_fields)
    passages, echoed, truncated = [], [], []
    for i, doc in enumerate(body.documents):
        values = _fields(i, {TEXT: doc} if isinstance(doc, str) else doc, fields)
        ranked = _fit([values[name] for name in fields], f"documents[{i}]", settings)
        if ranked is not None:
            values = {**values, **dict(zip(fields, ranked))}
            truncated.append(i)
        passages.append(_passage(i, values, fields))
        echoed.append(values)
    mode = _mode_from_model(body.model, settings.rerank_mode)
    outcome = await s.admission.run(RerankWork(query, passages, mode, body.max_tokens_per_doc), request,
                                    RERANK_PARAMS)
    order = _best_first(outcome.scores)[: body.top_n or len(passages)]
    results = [RerankResult(index=i, relevance_score=outcome.scores[i],
                            document=echoed[i] if body.return_documents else None) for i in order]
    config = s.reranker.config
    tokens = min(body.max_tokens_per_doc or config.max_passage_tokens, config.max_passage_tokens)
    return RerankResponse(
        id=str(uuid.uuid4()), model=config.model, results=results,
        usage=Usage(total_tokens=outcome.tokens, prompt_tokens=outcome.tokens),
        meta=RerankMeta(mode=mode, truncated_documents=truncated, max_passage_tokens=tokens,
                        kv_cache=KVCacheUse(hits=outcome.kv_hits, misses=outcome.kv_misses),
                        timings_ms=Timings(**outcome.timings), batch_queries=outcome.batch_queries))


# Cohere's v2 SDK posts to /v2/rerank (its v1 SDK and Jina's API to /v1/rerank): same body, same answer.
router.post("/v2/rerank", response_model=RerankResponse, responses=ERRORS, tags=["rerank"],
            summary="Rerank documents (Cohere v2 path)")(rerank)


# ---------------------------------------------------------------------------------------------- /rerank (TEI)
@router.post("/rerank", response_model=list[TeiRank], response_model_exclude_none=True, responses=ERRORS,
             tags=["rerank"], summary="Rerank texts (Hugging Face text-embeddings-inference compatible)")
async def tei_rerank(body: TeiRerankRequest, request: Request, s: ServedDep) -> list[TeiRank]:
    """Scores in the server's `rerank_mode`; with `raw_scores: false` (the default) each is the sigmoid of the
    mode's score (`ql`: the mean log-probability of the query tokens), so the order is the mode's."""
    settings = s.settings
    query = check_query(body.query, settings)
    check_count("texts", len(body.texts), settings)
    left = body.truncation_direction.lower() == "left"
    passages = []
    for i, text in enumerate(body.texts):
        ranked = _fit([text], f"texts[{i}]", settings, body.truncate, left)
        passages.append(Passage(str(i), "", text if ranked is None else ranked[0]))
    outcome = await s.admission.run(RerankWork(query, passages, settings.rerank_mode), request, TEI_PARAMS)
    return [TeiRank(index=i, text=body.texts[i] if body.return_text else None,
                    score=outcome.scores[i] if body.raw_scores else sigmoid(outcome.scores[i]))
            for i in _best_first(outcome.scores)]


# ---------------------------------------------------------------------------------------------- ops
@router.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, tags=["ops"], summary="Readiness: index, model, store, worker",
            responses={503: {"model": Readiness, "description": "Not ready (starting or shutting down)."}})
async def readyz(s: ServedDep) -> JSONResponse:
    pipeline, reranker = s.pipeline, s.reranker
    parts = {"index": pipeline.first_stage is not None and bool(pipeline.corpus), "model": reranker.lm is not None,
             "store": reranker.store is not None, "worker": s.admission.ready}
    ready = all(parts.values())
    detail = None if ready else "not ready: " + ", ".join(k for k, v in parts.items() if not v)
    return JSONResponse(Readiness(ready=ready, components=parts, detail=detail, replica=s.replica).model_dump(),
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"], summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: ERRORS[401]})
async def prometheus(s: ServedDep) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------- checks
def check_query(text: str, settings: Settings) -> str:
    if not text.strip():
        raise ApiError(422, "invalid_request", "query is blank; send a non-empty query", param="query")
    if len(text) > settings.max_query_chars:
        raise limit_exceeded("query", len(text), "characters", "max_query_chars", settings.max_query_chars)
    return text


def check_count(param: str, count: int, settings: Settings) -> None:
    if count > settings.max_documents:
        raise limit_exceeded(param, count, "documents", "max_documents", settings.max_documents)


def _fit(texts: list[str], param: str, settings: Settings, truncate: bool | None = None,
         left: bool = False) -> list[str] | None:
    """None when `texts` (a document's ranked fields) have at most `max_document_chars` characters together;
    else, with `truncate` (None: as the server's `long_documents` says), the texts cut to the limit (keeping
    their start, or their end if `left`); without it a 422."""
    limit, size = settings.max_document_chars, sum(len(t) for t in texts)
    if size <= limit:
        return None
    if not (truncate if truncate is not None else settings.long_documents == "truncate"):
        raise limit_exceeded(param, size, "characters", "max_document_chars", limit,
                             hint="or set KVRANK_LONG_DOCUMENTS=truncate" if truncate is None else
                             "or send \"truncate\": true")
    kept = list(texts)
    for i in reversed(range(len(texts))) if left else range(len(texts)):
        n = min(len(texts[i]), limit)
        kept[i] = texts[i][len(texts[i]) - n:] if left else texts[i][:n]
        limit -= n
    return kept


def _rank_fields(fields: list[str] | None) -> list[str]:
    fields = fields or [TEXT]
    for i, name in enumerate(fields):
        if name in fields[:i]:
            raise ApiError(422, "invalid_request", f"rank_fields[{i}] repeats {name!r}; name each field once",
                           param=f"rank_fields[{i}]")
    return fields


def _fields(i: int, values: dict[str, str], fields: list[str]) -> dict[str, str]:
    """A document's fields, once it has every rank field (else a 422 naming the first one missing)."""
    for name in fields:
        if name not in values:
            raise ApiError(422, "invalid_request", f"documents[{i}] has no field {name!r}, which rank_fields "
                           f"names; give every document every rank field (a string document has only {TEXT!r})",
                           param=f"documents[{i}].{name}")
    return values


def _passage(i: int, values: dict[str, str], fields: list[str]) -> Passage:
    """A document as the library's `Passage`: `title` (when ranked) is its title, the other rank fields joined
    with a newline in `fields` order its text; `{"title", "text"}` ranks as `Passage(id, title, text)`."""
    return Passage(str(i), values[TITLE] if TITLE in fields else "",
                   "\n".join(values[name] for name in fields if name != TITLE))


# ---------------------------------------------------------------------------------------------- answers
def sigmoid(score: float) -> float:
    """TEI's score for a logit, in (0, 1) (order-preserving; never overflows)."""
    if score >= 0:
        return 1.0 / (1.0 + math.exp(-score))
    e = math.exp(score)
    return e / (1.0 + e)


def _best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _mode_from_model(model: str | None, default: str) -> str:
    name = (model or "").removeprefix("kvrank-")
    return name if name in RERANK_MODES else default


def _hits(outcome: Outcome, top_k: int, pipeline: SearchPipeline, settings: Settings) -> list[Hit]:
    """The pipeline's final ranking: reranked hits with their (fused) scores, then first-stage order, unscored."""
    result = outcome.result
    assert result is not None  # a search outcome
    first = {d.doc_id: (rank, d.score) for rank, d in enumerate(result.first_stage, start=1)}
    reranked = result.reranked
    hits = []
    for i, doc in enumerate(result.hits[:top_k]):
        passage = pipeline.corpus.get(doc.doc_id)
        rank, first_score = first[doc.doc_id]
        score = doc.score if i < reranked else (first_score if not reranked else None)
        hits.append(Hit(doc_id=doc.doc_id, title=passage.title if passage else "",
                        snippet=passage.text[: settings.snippet_chars] if passage else "", score=score,
                        reranked=i < reranked, first_stage=FirstStage(score=first_score, rank=rank)))
    return hits
