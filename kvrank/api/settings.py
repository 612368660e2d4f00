"""Server settings: the only pydantic `Settings` in kvrank (the API edge). Every field reads `KVRANK_<NAME>`.

The settings table of the docs (guide/serving.md, reference/settings.md) is generated from this class by
`settings_table()` when the site is built; keep the descriptions here, where the values are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kvrank.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_FUSION_WEIGHT,
    DEFAULT_HEAD,
    DEFAULT_KV_FORMAT,
    DEFAULT_MODE,
    DEFAULT_MODEL,
    DEFAULT_RERANK_DEPTH,
    DEFAULT_RETRIEVER,
    RerankMode,
)


def _split(value: object) -> object:
    """`a,b` or a JSON list (`["a", "b"]`) from the environment; lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """`kvrank serve` settings; CLI options override the environment, which overrides the defaults."""

    model_config = SettingsConfigDict(env_prefix="KVRANK_", extra="forbid", frozen=True)

    # -- what is served
    data: str | None = Field(default=None, description="Corpus to search: a BEIR folder or ir_datasets id; unset: the "
                                               "embedded demo corpus (376 passages).")
    index_dir: Path | None = Field(default=None, description="First-stage index folder from `kvrank index`; unset: the "
                                                     "per-corpus cache.")
    retriever: Literal["bm25", "dense", "hybrid"] = Field(default=DEFAULT_RETRIEVER, description="First stage.")
    adapter: Path | None = Field(default=None, description="Query-side adapter folder (`kvrank train`/`tune`) for "
                                 "the reranker's model and mode; unset: the base model.")
    head: str = Field(default=DEFAULT_HEAD, description="Scoring head that replaces rerank fusion in its mode: auto "
                      "(the head shipped for the reranker's model, if any), none, or a folder from `kvrank train "
                      "--head`.")
    store: Path | None = Field(default=None, description="Passage KV store folder (created if new); unset: in memory.")
    remote_store: str | None = Field(default=None, description=(
        "Passage KV tier shared by several servers, behind `store`: an fsspec URL (s3://bucket/prefix, "
        "file:///mnt/shared/kvrank); needs the ray extra (docs/concepts/store.md)."))
    model: str = Field(default=DEFAULT_MODEL, description="Reranker model: path or id.")
    device: str = Field(default=DEFAULT_DEVICE, description="Device for the models.")
    dtype: str = Field(default=DEFAULT_DTYPE, description="Reranker compute dtype.")
    rerank_mode: RerankMode = Field(default=DEFAULT_MODE, description="Default reranking mode of both routes.")
    kv_format: str = Field(default=DEFAULT_KV_FORMAT, description=(
        "Stored passage-KV layout (`--kv-format`; docs/concepts/kv-formats.md); auto: the model's recommended one, "
        "or an existing store's own."))
    rerank_depth: int = Field(default=DEFAULT_RERANK_DEPTH, ge=1,
                              description="Default number of first-stage hits `/v1/search` reranks.")
    fusion_weight: float | None = Field(default=DEFAULT_FUSION_WEIGHT, ge=0.0, le=1.0, description=(
        "Default rerank fusion of `/v1/search`: the first stage's share of the final score (per-query z-scores), "
        "as `kvrank eval --fusion-weight`; 0 keeps the reranker's order. A request's `\"fusion_weight\": null` gets "
        "the reranker's raw scores."))
    # -- network
    host: str = Field(default="127.0.0.1", description="Bind address (loopback unless set).")
    port: int = Field(default=8000, ge=0, le=65535, description="Port.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys (comma-separated); set: every route but /healthz, /readyz "
                                          "and the search page's files (`/`, `/page/...`) needs "
                                          "`Authorization: Bearer KEY`.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); unset: no CORS headers.")
    # -- batching, queue, time
    max_batch_queries: int = Field(default=8, ge=1, description="Queries scored in one micro-batch (1: no batching).")
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000, description="How long a micro-batch waits for more "
                                                                  "queries once it has one.")
    queue_size: int = Field(default=64, ge=1, description="Requests waiting for the model; beyond it: 503 with "
                                                  "Retry-After.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="Per-request limit, queue wait included; beyond "
                                                             "it: 504. A request the queued work would not let finish "
                                                             "within it gets 503 with Retry-After at once.")
    # -- request limits
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Largest request body (413 beyond it).")
    max_query_chars: int = Field(default=2000, ge=1, description="Longest query.")
    max_top_k: int = Field(default=100, ge=1, description="Largest `top_k` of `/v1/search`.")
    max_rerank_depth: int = Field(default=100, ge=1, description="Largest rerank `depth` of `/v1/search`.")
    max_documents: int = Field(default=100, ge=1, description="Most documents in one `/v1/rerank` or `/rerank` "
                               "request.")
    max_document_chars: int = Field(default=20_000, ge=1, description="Longest document of `/v1/rerank` and `/rerank` "
                                    "(an object document: its rank fields together).")
    long_documents: Literal["truncate", "reject"] = Field(default=
        "truncate", description="A document over `max_document_chars`: cut to the limit (listed in the "
                                "response's `meta.truncated_documents`) or rejected with 422.")
    snippet_chars: int = Field(default=300, ge=0, description="Characters of text in each `/v1/search` hit.")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(value):
            if len(key.get_secret_value()) < 16:
                raise ValueError(f"API key #{i + 1} is shorter than 16 characters; use a long random key "
                                 "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return value


def settings_table() -> str:
    """The Markdown table of every setting: environment variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        shown = "unset" if default in (None, []) else f"`{default}`"
        rows.append(f"| `KVRANK_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
