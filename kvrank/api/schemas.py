"""Request and response bodies. Requests forbid unknown fields and are validated strictly (a boolean, a string or
a float is not an integer; a string is not a boolean), and every text field must be encodable as UTF-8; limits that
depend on settings are checked in `routes.py` and named in the error. `/v1/rerank` follows Cohere's and Jina's rerank
APIs field for field, `/rerank` Hugging Face text-embeddings-inference's."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from kvrank.defaults import DEFAULT_TOP_K, SearchMode


def encodable(value: object) -> object:
    """A string the tokenizer can read: JSON may carry lone surrogates (`"\\ud800"`), which no UTF-8 text holds."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise PydanticCustomError(
                "unencodable_text", "character {position} is U+{code}, a lone surrogate that is not valid unicode "
                "text; send UTF-8 text (a surrogate pair such as \\ud83d\\ude00 is fine)",
                {"position": err.start, "code": f"{ord(value[err.start]):04X}"}) from None
    return value


Text = Annotated[str, BeforeValidator(encodable)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------------------------- /v1/search
class RerankOptions(Strict):
    mode: SearchMode | None = Field(default=None, description="Reranking mode; `none`: first stage only; unset: the "
                                                      "server's `rerank_mode`.")
    depth: int | None = Field(default=None, ge=1, description="First-stage hits to rerank (<= `max_rerank_depth`); "
                                                     "unset: the server's `rerank_depth`.")
    fusion_weight: float | None = Field(default=None, ge=0.0, le=1.0,
                                        description="First-stage share of a fused score (per-query z-scores), as "
                                                    "`kvrank eval --fusion-weight`; unset: the server's "
                                                    "`fusion_weight`; null: the reranker's score alone.")


class SearchRequest(Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"query": "what is the capital of France", "top_k": 5},
        {"query": "largest planet", "top_k": 3, "rerank": {"mode": "ql", "depth": 20, "fusion_weight": 0.3}},
    ]})

    query: Text = Field(..., min_length=1, description="Query text (<= `max_query_chars`), not blank.",
                       json_schema_extra={"pattern": r"\S"})
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="Hits returned (<= `max_top_k`).")
    rerank: RerankOptions = Field(default_factory=RerankOptions)


class FirstStage(BaseModel):
    score: float
    rank: int = Field(..., description="1-based rank in the first stage.")


class Hit(BaseModel):
    doc_id: str
    title: str
    snippet: str = Field(..., description="The first `snippet_chars` characters of the text.")
    score: float | None = Field(..., description="Final score: the reranker's (or fused) score; the first-stage "
                                                 "score without reranking; null below the rerank depth (those "
                                                 "hits follow in first-stage order).")
    reranked: bool
    first_stage: FirstStage


class KVCacheUse(BaseModel):
    hits: int = Field(..., description="Candidates whose passage KV came from the store.")
    misses: int = Field(..., description="Passages prefilled (and stored) for this request.")


class Timings(BaseModel):
    queue: float = Field(..., description="Waiting for the model worker (ms).")
    retrieve: float = 0.0
    kv_lookup: float = 0.0
    prefill: float = 0.0
    scoring: float = Field(default=0.0, description="Shared by every query of the micro-batch.")
    head: float = Field(default=0.0, description="The scoring head: dense cosines and its trees (0: no head).")
    total: float


class SearchResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "query": "largest planet", "retriever": "hybrid(bm25+dense)", "mode": "ql", "depth": 20,
        "hits": [{"doc_id": "planet-jupiter", "title": "Jupiter", "snippet": "Jupiter is the largest planet...",
                  "score": -2.31, "reranked": True, "first_stage": {"score": 0.0328, "rank": 1}}],
        "timings_ms": {"queue": 0.4, "retrieve": 9.8, "kv_lookup": 1.2, "prefill": 0.0, "scoring": 88.0,
                       "total": 101.0},
        "kv_cache": {"hits": 20, "misses": 0}, "batch_queries": 1}]})

    query: str
    retriever: str
    mode: SearchMode
    depth: int
    fusion_weight: float | None = None
    adapter: str | None = Field(default=None, description="Digest of the reranker's query-side adapter; null: the "
                                                          "base model.")
    head: str | None = Field(default=None, description="Digest of the scoring head that ranked the reranked "
                                                       "candidates (it replaces fusion, so fusion_weight is null); "
                                                       "null: no head.")
    hits: list[Hit]
    timings_ms: Timings
    kv_cache: KVCacheUse
    batch_queries: int = Field(..., description="Queries scored in the same micro-batch as this one.")


# ---------------------------------------------------------------------------------------------- /v1/rerank
Document = Annotated[dict[Text, Text], Field(description=(
    "Cohere v1: a document object, every value a string; `rank_fields` name the fields ranked (default "
    "`[\"text\"]`) and `return_documents` echoes the object whole."))]


class RerankRequest(Strict):
    """Cohere (`/v1/rerank`, `/v2/rerank`) and Jina (`/v1/rerank`) request bodies."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "kvrank", "query": "largest planet", "top_n": 2, "return_documents": True,
         "documents": ["Jupiter is the largest planet.", {"text": "Paris is the capital of France."}]},
        {"query": "largest planet", "rank_fields": ["title", "text"],
         "documents": [{"title": "Jupiter", "author": "NASA", "text": "Jupiter is the largest planet."},
                       {"title": "Paris", "author": "Wikipedia", "text": "Paris is the capital of France."}]},
    ]})

    model: Text | None = Field(default=None, description="Accepted for compatibility. `ql`, `attn`, `yesno`, `cascade` "
                                                "(or `kvrank-<mode>`) pick the mode; any other name uses the "
                                                "server's `rerank_mode`.")
    query: Text = Field(..., min_length=1, description="Query text (<= `max_query_chars`), not blank.",
                       json_schema_extra={"pattern": r"\S"})
    documents: list[Text | Document] = Field(..., min_length=1, description=(
        "Strings or document objects (<= `max_documents`); a string is the document `{\"text\": ...}`."))
    top_n: int | None = Field(default=None, ge=1, description="Results returned, best first; unset: all.")
    return_documents: bool = Field(default=False, description="Echo each document in its result.")
    max_tokens_per_doc: int | None = Field(default=None, ge=1, description="Cohere v2: read at most this many tokens "
                                                                   "of each document (capped by the model's "
                                                                   "`max_passage_tokens`).")
    rank_fields: list[Text] | None = Field(default=None, min_length=1, description=(
        "Cohere v1: the fields of each document that are ranked, in this order; unset: `[\"text\"]`. `title` is "
        "the passage title, the other fields' values joined with a newline its text (as "
        "`kvrank.Reranker.rank(query, [{\"title\": ..., \"text\": ...}])` ranks them). Every document needs "
        "every field; `max_document_chars` counts their characters together."))
    max_chunks_per_doc: int | None = Field(default=None, ge=1, description="Cohere v1: accepted and ignored.")


class RerankResult(BaseModel):
    index: int = Field(..., description="Position of the document in the request.")
    relevance_score: float = Field(..., description="Higher is more relevant; ql: mean log-probability of the "
                                                    "query tokens (<= 0).")
    document: dict[str, str] | None = Field(default=None, description=(
        "The document (with `return_documents`): a string's `{\"text\": ...}`, an object whole; ranked fields "
        "as the model read them (cut if the document was truncated)."))


class Usage(BaseModel):
    total_tokens: int = Field(..., description="Query and document tokens the model read.")
    prompt_tokens: int


class RerankMeta(BaseModel):
    api_version: dict[str, str] = Field(default_factory=lambda: {"version": "2"})
    billed_units: dict[str, int] = Field(default_factory=lambda: {"search_units": 1})
    mode: str
    truncated_documents: list[int] = Field(default_factory=list,
                                           description="Documents cut to `max_document_chars`.")
    max_passage_tokens: int = Field(..., description="Tokens of each document the model reads at most.")
    kv_cache: KVCacheUse
    timings_ms: Timings
    batch_queries: int


class RerankResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f0c2a9e-6d1b-4b8e-9a57-2f5e0d9c1a11", "model": "smollm2",
        "results": [{"index": 0, "relevance_score": -1.9, "document": {"text": "Jupiter is the largest planet."}}],
        "usage": {"total_tokens": 31, "prompt_tokens": 31},
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}, "mode": "ql",
                 "truncated_documents": [], "max_passage_tokens": 192, "kv_cache": {"hits": 1, "misses": 1},
                 "timings_ms": {"queue": 0.3, "kv_lookup": 0.2, "prefill": 20.0, "scoring": 30.0, "total": 52.0},
                 "batch_queries": 1}}]})

    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: RerankMeta


# ---------------------------------------------------------------------------------------------- /rerank (TEI)
class TeiRerankRequest(Strict):
    """Hugging Face text-embeddings-inference's `POST /rerank` body (its `RerankRequest`), field for field."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"query": "largest planet", "texts": ["Jupiter is the largest planet.", "Paris is in France."],
         "return_text": True},
    ]})

    query: Text = Field(..., min_length=1, description="Query text (<= `max_query_chars`), not blank.",
                       json_schema_extra={"pattern": r"\S"})
    texts: list[Text] = Field(..., min_length=1, description="Texts to rank (<= `max_documents`).")
    raw_scores: bool = Field(default=False, description=(
        "true: the mode's own score (`ql`: mean log-probability of the query tokens, <= 0); false: its sigmoid "
        "in (0, 1), as TEI turns a logit into a score. Either way the order is the same."))
    return_text: bool = Field(default=False, description="Echo each text in its result.")
    truncate: bool | None = Field(default=None, description=(
        "A text over `max_document_chars`: true cuts it to the limit, false rejects it with 422; null: the "
        "server's `long_documents`. The model reads at most `max_passage_tokens` tokens of a text either way."))
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(default="Right", description=(
        "Which end of a text `truncate` cuts: `Right` keeps its start, `Left` its end."))


class TeiRank(BaseModel):
    index: int = Field(..., description="Position of the text in the request.")
    text: str | None = Field(default=None, description="The text as sent (with `return_text`); absent otherwise.")
    score: float = Field(..., description="Higher is more relevant: the mode's score, or its sigmoid unless "
                                          "`raw_scores`.")


# ---------------------------------------------------------------------------------------------- errors, health
class ErrorBody(BaseModel):
    type: str = Field(..., description="invalid_request, limit_exceeded, unauthorized, not_found, "
                                       "overloaded, timeout, not_ready or internal.")
    message: str
    limit: str | None = Field(default=None, description="The setting that was exceeded, e.g. `max_query_chars`.")
    param: str | None = Field(default=None, description="The request field at fault.")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "type": "limit_exceeded", "limit": "max_query_chars", "param": "query",
        "message": "query has 2400 characters; the limit max_query_chars is 2000 (KVRANK_MAX_QUERY_CHARS)"}}]})

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    components: dict[str, bool] = Field(..., description="index, model, store, worker.")
    detail: str | None = None
    replica: str | None = Field(default=None, description="The Ray Serve replica that answered (`kvrank serve "
                                "--ray`); every response names it in the `X-Kvrank-Replica` header.")
