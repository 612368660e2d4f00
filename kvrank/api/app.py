"""The FastAPI app: `create_app(pipeline, settings)`.

Routes: `POST /v1/search`, `POST /v1/rerank` (Cohere/Jina compatible), `GET /healthz`, `GET /readyz`,
`GET /metrics`. Model work goes through the `Batcher` (one worker thread, micro-batches, bounded queue); handlers
only validate, submit and await. Every error is `{"error": {type, message, limit?, param?}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kvrank
from kvrank.api.batching import Batcher, Closed, Expired, Overloaded, QueueFull
from kvrank.api.metrics import Metrics
from kvrank.api.page import Judgements, install_page, is_page_path
from kvrank.api.schemas import (
    ErrorResponse,
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
    TextDocument,
    Timings,
    Usage,
)
from kvrank.api.service import Outcome, RerankWork, SearchWork, Service
from kvrank.api.settings import Settings
from kvrank.defaults import RERANK_MODES
from kvrank.errors import KvrankError
from kvrank.pipeline import SearchPipeline

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz")  # never need a key
REPLICA_HEADER = "X-Kvrank-Replica"
ROUTES = ("/v1/search", "/v1/rerank", "/v2/rerank", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, limit: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.limit, self.param = status, type_, message, limit, param
        self.headers = headers or {}


def error_response(status: int, type_: str, message: str, limit: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "limit": limit, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **extra}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Malformed JSON or a body that is not UTF-8."),
    401: _error("Missing or wrong API key (only when keys are configured)."),
    413: _error("Body larger than `max_body_bytes`."),
    422: _error("Invalid field, unknown field, or a limit exceeded (`error.limit` names it)."),
    500: _error("Internal error (logged on the server)."),
    503: _error("Queue full, the queued work would not let this request finish before `request_timeout_s`, "
                "shutting down, or not ready; retry after `Retry-After` seconds.",
                headers={"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}),
    504: _error("The request took longer than `request_timeout_s`."),
}


# ---------------------------------------------------------------------------------------------- middleware
class ObserveMiddleware:
    """Counts and times every request by route, method and status (outermost, so it sees 401s and 413s)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        start, status = loop.time(), 500
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            labels = (route, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(loop.time() - start)


class BodyLimitMiddleware:
    """Refuses bodies over `max_body_bytes`: by Content-Length before reading, or while streaming (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> JSONResponse:
        return error_response(413, "limit_exceeded", f"the body is larger than max_body_bytes={self.max_bytes} "
                              "bytes (KVRANK_MAX_BODY_BYTES)", limit="max_body_bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = self.too_large() if length.isdigit() else error_response(
                400, "invalid_request", "the Content-Length header is not a number")
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413)  # FastAPI's body reader re-raises it; `http_error` answers
            return message

        await self.app(scope, counted, send)


class AuthMiddleware:
    """`Authorization: Bearer KEY` on every route but health, when keys are configured. Each configured key's
    SHA-256 is compared with the presented key's in constant time (all keys, no early exit); keys are never
    logged or echoed."""

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def allowed(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for digest in self.digests:
            ok |= hmac.compare_digest(digest, presented)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in OPEN_PATHS or is_page_path(scope["path"])
                or scope["method"] == "OPTIONS"):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if not self.allowed(header):
            response = error_response(401, "unauthorized", "missing or invalid API key; send "
                                      "`Authorization: Bearer <key>` with a key from KVRANK_API_KEYS",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ReplicaMiddleware:
    """Names the replica that answered in an `X-Kvrank-Replica` header (behind Ray Serve's proxy, which spreads
    requests over replicas, a client can tell them apart)."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


# ---------------------------------------------------------------------------------------------- app
def create_app(pipeline: SearchPipeline, settings: Settings | None = None, *, replica: str | None = None,
               judgements: Judgements | None = None) -> FastAPI:
    """The API over a built pipeline (`kvrank.pipeline.build`). The model worker starts and stops with the app's
    lifespan. The pipeline needs a reranker: both routes rerank. `replica` names this copy of the app when
    several serve one address (`kvrank.cluster.serve`): `/readyz` reports it and every response carries it.
    `judgements`: the served corpus's qrels, which the search page at `/` marks on judged queries' hits."""
    settings = settings or Settings()
    if pipeline.reranker is None:
        raise KvrankError("the API reranks: build its pipeline with a reranker (PipelineConfig.reranker)")
    reranker = pipeline.reranker
    metrics = Metrics()
    service = Service(pipeline)
    batcher = Batcher(service.process, max_batch=settings.max_batch_queries,
                      max_wait_s=settings.batch_wait_ms / 1e3, queue_size=settings.queue_size)
    batcher.on_batch = metrics.observe_batch
    metrics.watch(lambda: batcher.depth, lambda: batcher.in_flight, reranker.store.stats)
    metrics.watch_admission(batcher, lambda: service.rows_dropped)
    started = {"worker": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        started["worker"] = True
        logger.info("kvrank API ready: %d passages, retriever %s, model %s", len(pipeline.corpus),
                    pipeline.first_stage.name, reranker.config.model)
        try:
            yield
        finally:
            # uvicorn has finished in-flight requests by now; let queued jobs finish too, then stop the worker.
            done = await asyncio.to_thread(batcher.close, settings.request_timeout_s)
            if not done:
                logger.warning("model worker still busy after %.0f s; exiting anyway", settings.request_timeout_s)

    app = FastAPI(
        title="kvrank search API",
        version=kvrank.__version__,
        description="Retrieve-then-rerank search with a block-attention reranker over stored passage KV. "
                    "`/v1/rerank` accepts Cohere's and Jina's rerank requests.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.metrics, app.state.pipeline = batcher, metrics, pipeline
    app.state.settings = settings

    # Outermost last: observe -> body limit -> CORS -> auth -> routes.
    if settings.api_keys:
        app.add_middleware(AuthMiddleware, keys=[k.get_secret_value() for k in settings.api_keys])
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObserveMiddleware, metrics=metrics)
    if replica is not None:
        app.add_middleware(ReplicaMiddleware, replica=replica)
    _install_error_handlers(app)
    _custom_openapi(app, settings)

    async def run(work: SearchWork | RerankWork, request: Request) -> Outcome:
        """Estimate the work, admit it or refuse it at once (503 + Retry-After), then wait for the model worker
        until the deadline (504) or until the client goes away (the job is dropped)."""
        deadline = time.perf_counter() + settings.request_timeout_s  # from the request's arrival
        if not started["worker"] or not batcher.alive:
            metrics.rejected.labels("not_ready").inc()
            raise ApiError(503, "not_ready", "the model worker is not running (starting or shutting down)",
                           headers={"Retry-After": "5"})
        try:
            cost = await asyncio.to_thread(service.estimate, work)
            job = batcher.submit(work, cost, deadline)
        except KvrankError as err:
            raise ApiError(422, "invalid_request", str(err)) from None
        except QueueFull as err:
            metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, "overloaded", f"{err}; retry after {err.retry_after_s} s or raise "
                           "KVRANK_QUEUE_SIZE", limit="queue_size",
                           headers={"Retry-After": str(err.retry_after_s)}) from None
        except Overloaded as err:
            metrics.rejected.labels("deadline").inc()
            raise ApiError(503, "overloaded", f"{err} (request_timeout_s={settings.request_timeout_s:g}); retry "
                           f"after {err.retry_after_s} s", limit="request_timeout_s",
                           headers={"Retry-After": str(err.retry_after_s)}) from None
        except Closed:
            metrics.rejected.labels("shutting_down").inc()
            raise ApiError(503, "not_ready", "the server is shutting down", headers={"Retry-After": "5"}) from None
        future = asyncio.wrap_future(job.future)
        future.add_done_callback(_retrieve)  # a result nobody awaits any more is not an error to log
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            finished, _ = await asyncio.wait({future, gone}, timeout=max(0.0, deadline - time.perf_counter()),
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if future in finished:
            try:
                return future.result()
            except Expired:
                pass  # answered 504 below, at once
            except KvrankError as err:
                raise ApiError(422, "invalid_request", str(err)) from None
        batcher.cancel(job)
        if gone in finished and future not in finished:
            metrics.rejected.labels("disconnected").inc()
            raise ApiError(499, "client_closed", "the client closed the connection before the answer")
        metrics.rejected.labels("timeout").inc()
        metrics.expired.inc()
        raise ApiError(504, "timeout", f"the request took longer than request_timeout_s="
                       f"{settings.request_timeout_s:g} s (KVRANK_REQUEST_TIMEOUT_S)",
                       limit="request_timeout_s") from None

    def check_query(text: str) -> str:
        if not text.strip():
            raise ApiError(422, "invalid_request", "query is blank; send a non-empty query", param="query")
        if len(text) > settings.max_query_chars:
            raise _limit("query", len(text), "characters", "max_query_chars", settings.max_query_chars)
        return text

    @app.post("/v1/search", response_model=SearchResponse, responses=ERRORS, tags=["search"],
              summary="Retrieve, then rerank with stored passage KV")
    async def search(body: SearchRequest, request: Request) -> SearchResponse:
        query = check_query(body.query)
        if body.top_k > settings.max_top_k:
            raise _limit("top_k", body.top_k, "", "max_top_k", settings.max_top_k)
        mode = body.rerank.mode or settings.rerank_mode
        depth = body.rerank.depth or min(settings.rerank_depth, settings.max_rerank_depth)
        if depth > settings.max_rerank_depth:
            raise _limit("rerank.depth", depth, "", "max_rerank_depth", settings.max_rerank_depth)
        weight = settings.fusion_weight if "fusion_weight" not in body.rerank.model_fields_set \
            else body.rerank.fusion_weight
        outcome = await run(SearchWork(query, body.top_k, mode, depth, weight), request)
        head = pipeline.head_for(mode)  # a scoring head replaces fusion in its mode
        return SearchResponse(
            query=query, retriever=pipeline.first_stage.name, mode=mode, depth=depth,
            fusion_weight=weight if mode != "none" and head is None else None,
            adapter=pipeline.adapter_digest if mode != "none" else None,
            head=head.digest if head is not None else None,
            hits=_hits(outcome, body.top_k, pipeline, settings),
            timings_ms=Timings(**outcome.timings), kv_cache=KVCacheUse(hits=outcome.kv_hits,
                                                                        misses=outcome.kv_misses),
            batch_queries=outcome.batch_queries)

    @app.post("/v1/rerank", response_model=RerankResponse, responses=ERRORS, tags=["rerank"],
              summary="Rerank documents (Cohere / Jina compatible)")
    async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
        query = check_query(body.query)
        if len(body.documents) > settings.max_documents:
            raise _limit("documents", len(body.documents), "documents", "max_documents", settings.max_documents)
        if body.top_n is not None and body.top_n > settings.max_documents:
            raise _limit("top_n", body.top_n, "", "max_documents", settings.max_documents)
        texts, truncated = [], []
        for i, doc in enumerate(body.documents):
            text = doc if isinstance(doc, str) else doc.text
            if len(text) > settings.max_document_chars:
                if settings.long_documents == "reject":
                    raise _limit(f"documents[{i}]", len(text), "characters", "max_document_chars",
                                 settings.max_document_chars, hint="or set KVRANK_LONG_DOCUMENTS=truncate")
                text = text[: settings.max_document_chars]
                truncated.append(i)
            texts.append(text)
        mode = _mode_from_model(body.model, settings.rerank_mode)
        outcome = await run(RerankWork(query, texts, mode, body.max_tokens_per_doc), request)
        order = sorted(range(len(texts)), key=lambda i: -outcome.scores[i])[: body.top_n or len(texts)]
        results = [RerankResult(index=i, relevance_score=outcome.scores[i],
                                document=TextDocument(text=texts[i]) if body.return_documents else None)
                   for i in order]
        tokens = min(body.max_tokens_per_doc or 1 << 30, reranker.config.max_passage_tokens)
        return RerankResponse(
            id=str(uuid.uuid4()), model=reranker.config.model, results=results,
            usage=Usage(total_tokens=outcome.tokens, prompt_tokens=outcome.tokens),
            meta=RerankMeta(mode=mode, truncated_documents=truncated, max_passage_tokens=tokens,
                            kv_cache=KVCacheUse(hits=outcome.kv_hits, misses=outcome.kv_misses),
                            timings_ms=Timings(**outcome.timings), batch_queries=outcome.batch_queries))

    # Cohere's v2 SDK posts to /v2/rerank (its v1 SDK and Jina's API to /v1/rerank): same body, same answer.
    app.post("/v2/rerank", response_model=RerankResponse, responses=ERRORS, tags=["rerank"],
             summary="Rerank documents (Cohere v2 path)")(rerank)

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["ops"], summary="Readiness: index, model, store, worker",
             responses={503: {"model": Readiness, "description": "Not ready (starting or shutting down)."}})
    async def readyz() -> JSONResponse:
        parts = {"index": pipeline.first_stage is not None and bool(pipeline.corpus),
                 "model": reranker.lm is not None, "store": reranker.store is not None,
                 "worker": started["worker"] and batcher.alive}
        ready = all(parts.values())
        detail = None if ready else "not ready: " + ", ".join(k for k, v in parts.items() if not v)
        return JSONResponse(Readiness(ready=ready, components=parts, detail=detail, replica=replica).model_dump(),
                            status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: ERRORS[401]})
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ the search page (kvrank/api/page.py)
    install_page(app, pipeline, settings, judgements or Judgements(), ERRORS)

    return app


# ---------------------------------------------------------------------------------------------- helpers
async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is read by now; the server's next message
    is `http.disconnect`, sent when the client goes away or after the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _limit(param: str, value: int, unit: str, limit: str, bound: int, hint: str = "") -> ApiError:
    unit = f" {unit}" if unit else ""
    what = f"{param} has {value}{unit}" if unit else f"{param} is {value}"
    env = f"KVRANK_{limit.upper()}"
    return ApiError(422, "limit_exceeded", f"{what}; the limit {limit} is {bound} ({env}){' ' + hint if hint else ''}",
                    limit=limit, param=param)


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


# Type mismatches of one branch of a union (`str | TextDocument`): the other branch's error says more.
_BRANCH_MISMATCH = {"string_type", "model_type", "model_attributes_type", "dict_type"}


def _first_error(errors: Sequence[Any]) -> dict[str, Any]:
    """The error to report: the first, unless a union branch's type mismatch hides a more telling one (for
    `documents[0]: {"text": 1}` the object branch's `documents[0].text`, not "documents[0] is not a string")."""
    if not errors:
        return {"loc": (), "msg": "invalid request", "type": ""}

    def rank(error: dict[str, Any]) -> int:  # a value error; a wrong type inside an object; an object, wrong
        if error.get("type") not in _BRANCH_MISMATCH:
            return 0
        return 2 if isinstance(error.get("input"), dict) and len(errors) > 1 else 1

    return min(errors, key=rank)


def _param(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as the request field: `documents[3].text`, `rerank.depth` (union branch tags
    such as `str`, `TextDocument` or `list[...]` left out)."""
    param = ""
    for i, part in enumerate(loc):
        if part == "body" and i == 0:
            continue
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in str(part) or (i > 0 and isinstance(loc[i - 1], int) and part in ("str", "TextDocument")):
            continue  # a union branch: `list[...]`, `function-before[...]`, or a member type
        else:
            param += f".{part}" if param else str(part)
    return param or None


def _unparsable(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body (it answers 400 "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 JSON (byte {cause.start}: {cause.reason}); send UTF-8"
    if isinstance(cause, RecursionError):
        return ("the JSON is nested too deeply to parse; a request body needs only a few levels (objects and "
                "lists of documents)")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return (f"the JSON holds an integer of more than {sys.get_int_max_str_digits()} digits, more than the "
                "parser reads; send integers in the range of their field")
    return f"the body could not be parsed as JSON ({type(cause).__name__ if cause else 'unknown error'}: {cause})"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.type, err.message, err.limit, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = _first_error(errors)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = _param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx")
            detail = ctx.get("error", "") if isinstance(ctx, dict) else ""
            return error_response(400, "invalid_request", f"malformed JSON at character {loc[0] if loc else '?'}: "
                                  f"{detail}")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}; see the schema at /docs"
        elif not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
            message = "the body must be a JSON object sent with Content-Type: application/json"
        else:
            message = f"{param or 'body'}: {first.get('msg')}"
        others = {_param(e.get("loc", ())) for e in errors if e.get("type") not in _BRANCH_MISMATCH} - {param}
        more = f" (and {len(others)} more)" if others else ""
        return error_response(422, "invalid_request", message + more, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        types = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "limit_exceeded"}
        message, limit = str(err.detail), None
        if err.status_code == 400 and "parsing the body" in message:
            message = _unparsable(err.__cause__)
        if err.status_code == 413:
            settings: Settings = request.app.state.settings
            message = (f"the body is larger than max_body_bytes={settings.max_body_bytes} bytes "
                       "(KVRANK_MAX_BODY_BYTES)")
            limit = "max_body_bytes"
        return error_response(err.status_code, types.get(err.status_code, "invalid_request"), message, limit,
                              headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s: %s", request.method, request.url.path, err, exc_info=err)
        return error_response(500, "internal", "internal error; it is logged on the server")


def _custom_openapi(app: FastAPI, settings: Settings) -> None:
    """The served OpenAPI document states this server's limits (`maxLength`, `maximum`, `maxItems`) and, when
    keys are configured, the bearer scheme (enforced by `AuthMiddleware`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        props = {name: body.get("properties", {}) for name, body in schema["components"]["schemas"].items()}
        props["SearchRequest"]["query"]["maxLength"] = settings.max_query_chars
        props["SearchRequest"]["top_k"]["maximum"] = settings.max_top_k
        props["RerankOptions"]["depth"]["anyOf"][0]["maximum"] = settings.max_rerank_depth
        props["RerankRequest"]["query"]["maxLength"] = settings.max_query_chars
        props["RerankRequest"]["documents"]["maxItems"] = settings.max_documents
        props["RerankRequest"]["top_n"]["anyOf"][0]["maximum"] = settings.max_documents
        if settings.long_documents == "reject":
            props["RerankRequest"]["documents"]["items"]["anyOf"][0]["maxLength"] = settings.max_document_chars
            props["TextDocument"]["text"]["maxLength"] = settings.max_document_chars
        if settings.api_keys:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema["paths"].items():
                if path not in OPEN_PATHS:
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
