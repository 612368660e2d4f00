"""The FastAPI app: `create_app(pipeline, settings)` wires middleware, state, error handlers, the routes
(`routes.py`) and the search page (`page.py`).

Routes: `POST /v1/search`, `POST /v1/rerank` and `/v2/rerank` (Cohere/Jina compatible), `POST /rerank` (Hugging Face
text-embeddings-inference compatible), `GET /healthz`, `GET /readyz`, `GET /metrics`. Model work goes through
`Admission` (one worker thread, micro-batches, a bounded queue, deadlines); handlers only validate, submit and
await. Every error is `{"error": {type, message, limit?, param?}}` with a 4xx/5xx status (`errors.py`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

import kvrank
from kvrank.api.admission import Admission
from kvrank.api.errors import ERRORS, install_error_handlers
from kvrank.api.metrics import Metrics
from kvrank.api.middleware import (
    OPEN_PATHS,
    AuthMiddleware,
    BodyLimitMiddleware,
    ObserveMiddleware,
    ReplicaMiddleware,
)
from kvrank.api.page import Judgements, install_page
from kvrank.api.routes import ROUTES, Served, router
from kvrank.api.service import Service
from kvrank.api.settings import Settings
from kvrank.errors import KvrankError
from kvrank.pipeline import SearchPipeline

logger = logging.getLogger(__name__)


def create_app(pipeline: SearchPipeline, settings: Settings | None = None, *, replica: str | None = None,
               judgements: Judgements | None = None) -> FastAPI:
    """The API over a built pipeline (`kvrank.pipeline.build`). The model worker starts and stops with the app's
    lifespan. The pipeline needs a reranker: every route reranks. `replica` names this copy of the app when
    several serve one address (`kvrank.cluster.serve`): `/readyz` reports it and every response carries it.
    `judgements`: the served corpus's qrels, which the search page at `/` marks on judged queries' hits."""
    settings = settings or Settings()
    reranker = pipeline.reranker
    if reranker is None:
        raise KvrankError("the API reranks: build its pipeline with a reranker (PipelineConfig.reranker)",
                          param="reranker")
    metrics = Metrics()
    admission = Admission(Service(pipeline), settings, metrics)
    metrics.watch(lambda: admission.batcher.depth, lambda: admission.batcher.in_flight, reranker.store.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        admission.start()
        logger.info("kvrank API ready: %d passages, retriever %s, model %s", len(pipeline.corpus),
                    pipeline.first_stage.name, reranker.config.model)
        try:
            yield
        finally:
            # uvicorn has finished in-flight requests by now; let queued jobs finish too, then stop the worker.
            await admission.close()

    app = FastAPI(
        title="kvrank search API",
        version=kvrank.__version__,
        description="Retrieve-then-rerank search with a block-attention reranker over stored passage KV. "
                    "`/v1/rerank` accepts Cohere's and Jina's rerank requests, `/rerank` Hugging Face "
                    "text-embeddings-inference's.",
        lifespan=lifespan,
    )
    app.state.served = Served(pipeline, settings, admission, metrics, replica)
    app.state.pipeline, app.state.settings, app.state.batcher = pipeline, settings, admission.batcher

    # Outermost last: observe -> body limit -> CORS -> auth -> routes.
    if settings.api_keys:
        app.add_middleware(AuthMiddleware, keys=[k.get_secret_value() for k in settings.api_keys])
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObserveMiddleware, metrics=metrics, routes=ROUTES)
    if replica is not None:
        app.add_middleware(ReplicaMiddleware, replica=replica)
    install_error_handlers(app)
    app.include_router(router)
    install_page(app, pipeline, settings, judgements or Judgements(), ERRORS)
    _custom_openapi(app, settings)
    return app


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
        if settings.long_documents == "reject":  # a string document (an object's rank fields count together)
            props["RerankRequest"]["documents"]["items"]["anyOf"][0]["maxLength"] = settings.max_document_chars
        props["TeiRerankRequest"]["query"]["maxLength"] = settings.max_query_chars
        props["TeiRerankRequest"]["texts"]["maxItems"] = settings.max_documents
        if settings.api_keys:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema["paths"].items():
                if path not in OPEN_PATHS:
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
