"""The search page at `/`: static HTML, CSS and plain JS shipped in `kvrank/api/static/` (no build step, nothing
fetched from elsewhere), and the small JSON endpoints it reads besides `/v1/search`:

- `GET /v1/store`: the passage KV store panel (entries, bytes, bytes per token, KV format, this server's hits);
- `GET /v1/page/config`: modes, defaults, limits, the corpus and a few of its judged queries (not in OpenAPI);
- `GET /v1/page/judgements?query=...`: the corpus's qrels for a query whose text is one of its judged test
  queries, so the page can mark judged hits (not in OpenAPI).

The page and its files are open (`is_page_path`); the JSON endpoints need the API key like every other route,
and a 401 from them is what makes the page ask for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from kvrank.defaults import NO_RERANK, RERANK_MODES

if TYPE_CHECKING:
    from kvrank.api.settings import Settings
    from kvrank.pipeline import SearchPipeline
    from kvrank.reranker.reranker import BlockReranker
    from kvrank.types import Dataset

STATIC = Path(__file__).with_name("static")
ASSETS = "/page/"  # URL prefix of the page's files
EXAMPLES = 12  # judged queries offered as suggestions
# The page loads nothing but its own files and talks to nothing but its own server.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def is_page_path(path: str) -> bool:
    """The page and its static files: served without an API key (the page then asks for one)."""
    return path == "/" or path.startswith(ASSETS)


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class Judgements:
    """A corpus's judged test queries by normalised text (case and spacing ignored) with their qrels."""

    name: str = ""
    by_text: dict[str, tuple[str, str, dict[str, int]]] = field(default_factory=dict)  # -> (id, text, qrels)

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> Judgements:
        qrels = dataset.grades()
        by_text = {_normalise(q.text): (q.query_id, q.text, qrels.get(q.query_id, {}))
                   for q in dataset.sorted_queries() if q.query_id in qrels}
        return cls(dataset.name, by_text)

    def lookup(self, text: str) -> tuple[str, dict[str, int]] | None:
        found = self.by_text.get(_normalise(text))
        return (found[0], found[2]) if found is not None else None

    def examples(self, n: int = EXAMPLES) -> list[str]:
        return [text for _, text, _ in list(self.by_text.values())[:n]]


# ---------------------------------------------------------------------------------------------- bodies
class StoreStats(BaseModel):
    entries: int = Field(..., description="Passages whose KV is stored.")
    tokens: int = Field(..., description="Tokens of KV stored.")
    bytes: int
    bytes_per_token: float
    max_bytes: int = Field(..., description="The store's size budget (0: none).")
    kv_format: str = Field(..., description="Stored passage-KV layout (docs/concepts/kv-formats.md).")
    persistent: bool = Field(..., description="A store folder (`KVRANK_STORE`), not memory.")
    hits: int = Field(..., description="This server's lookups answered by the store.")
    misses: int = Field(..., description="This server's lookups that needed a prefill.")
    hit_rate: float
    evictions: int


class PageAdapter(BaseModel):
    digest: str
    mode: str


class PageConfig(BaseModel):
    corpus: str
    passages: int
    judged_queries: int
    examples: list[str]
    retriever: str
    model: str
    kv_format: str
    modes: list[str]
    default_mode: str
    adapter: PageAdapter | None
    heads: dict[str, str] = Field(default_factory=dict, description="mode -> digest of the scoring head that ranks "
                                                                     "it (the fusion weight does not apply there)")
    depth: int
    fusion_weight: float | None
    max_query_chars: int
    max_top_k: int
    max_rerank_depth: int


class PageJudgements(BaseModel):
    query_id: str | None = Field(..., description="The judged query with this text; null: not one.")
    relevance: dict[str, int] = Field(default_factory=dict, description="doc id -> judged relevance.")


# ---------------------------------------------------------------------------------------------- routes
def store_stats(reranker: BlockReranker) -> StoreStats:
    store = reranker.store
    totals, own = store.totals(), store.stats()
    lookups = own.hits + own.misses
    return StoreStats(entries=int(totals["entries"]), tokens=int(totals["tokens"]), bytes=int(totals["bytes"]),
                      bytes_per_token=float(totals["bytes_per_token"]), max_bytes=int(totals["max_bytes"]),
                      kv_format=reranker.config.format.name, persistent=store.location is not None,
                      hits=own.hits, misses=own.misses, hit_rate=round(own.hits / lookups, 4) if lookups else 0.0,
                      evictions=own.evictions)


def install_page(app: FastAPI, pipeline: SearchPipeline, settings: Settings, judgements: Judgements,
                 responses: dict[int | str, dict[str, object]]) -> None:
    """Add the page, its files and its JSON endpoints to `app` (`responses`: the app's documented errors)."""
    reranker = pipeline.reranker
    assert reranker is not None  # create_app refuses a pipeline without one
    index = STATIC / "index.html"

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers={"Content-Security-Policy": CSP})

    app.mount(ASSETS, StaticFiles(directory=STATIC), name="page")

    @app.get("/v1/store", response_model=StoreStats, responses={401: responses[401]}, tags=["ops"],
             summary="Passage KV store: size, format and this server's hit rate")
    async def store() -> StoreStats:
        return store_stats(reranker)

    @app.get("/v1/page/config", response_model=PageConfig, include_in_schema=False)
    async def config() -> PageConfig:
        card = reranker.adapter
        return PageConfig(
            corpus=judgements.name or "corpus", passages=len(pipeline.corpus), judged_queries=len(judgements.by_text),
            examples=judgements.examples(), retriever=pipeline.first_stage.name, model=reranker.config.model,
            kv_format=reranker.config.format.name, modes=[NO_RERANK, *RERANK_MODES],
            default_mode=card.mode if card is not None else settings.rerank_mode,
            adapter=PageAdapter(digest=card.digest, mode=card.mode) if card is not None else None,
            heads={mode: head.digest for mode, head in pipeline.heads.items()},
            depth=min(settings.rerank_depth, settings.max_rerank_depth), fusion_weight=settings.fusion_weight,
            max_query_chars=settings.max_query_chars, max_top_k=settings.max_top_k,
            max_rerank_depth=settings.max_rerank_depth)

    @app.get("/v1/page/judgements", response_model=PageJudgements, include_in_schema=False)
    async def judged(query: str) -> PageJudgements:
        found = judgements.lookup(query[: settings.max_query_chars])
        return PageJudgements(query_id=None) if found is None else PageJudgements(query_id=found[0],
                                                                                  relevance=found[1])
