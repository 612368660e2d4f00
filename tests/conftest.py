"""Shared fixtures: an isolated index cache for the whole session, the bundled MiniLM encoder loaded once, tiny
BEIR folders written into tmp_path, a tiny Llama checkpoint folder for `--model PATH`, and the tiny search
pipeline and app builders the API tests share (`tiny_llama`, `api_retriever`, `api_pipeline`, `make_app`)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kvrank.types import Dataset, Passage

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kvrank.pipeline import SearchPipeline
    from kvrank.reranker.model import LoadedLM
    from kvrank.retriever import Retriever


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Indexes built by tests go to a temporary cache, never the user's ~/.cache/kvrank."""
    old = os.environ.get("KVRANK_CACHE_DIR")
    path = tmp_path_factory.mktemp("kvrank-cache")
    os.environ["KVRANK_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("KVRANK_CACHE_DIR", None)
    else:
        os.environ["KVRANK_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 encoder, loaded once per session."""
    from kvrank.retriever.dense import load_encoder

    return load_encoder(None, "cpu")


TINY_CORPUS = [
    {"_id": "d1", "title": "Cats", "text": "Cats are small domestic felines that purr and hunt mice."},
    {"_id": "d2", "title": "Dogs", "text": "Dogs are loyal domestic animals that bark and fetch sticks."},
    {"_id": "d3", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"_id": "d4", "title": "Berlin", "text": "Berlin is the capital of Germany, famous for its wall."},
    {"_id": "d5", "title": "Jupiter", "text": "Jupiter is the largest planet in the solar system."},
    {"_id": "d6", "title": "Mars", "text": "Mars is a cold red planet with the tallest volcano."},
    {"_id": "d7", "title": "Python", "text": "Python is a programming language created by Guido van Rossum."},
    {
        "_id": "d8",
        "title": "Rust",
        "text": "Rust is a systems programming language focused on memory safety.",
    },
]
TINY_QUERIES = [
    {"_id": "1", "text": "what is the capital of France"},
    {"_id": "2", "text": "largest planet"},
    {"_id": "3", "text": "memory safe programming language"},
    {"_id": "10", "text": "cats that purr"},
    {"_id": "99", "text": "an unjudged training query"},
]
TINY_QRELS = [("1", "d3", 1), ("2", "d5", 1), ("3", "d8", 1), ("10", "d1", 1)]


def write_beir(
    folder: Path,
    corpus: list[dict] | None = None,
    queries: list[dict] | None = None,
    qrels: list[tuple[str, str, int]] | None = None,
) -> Path:
    """Write a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    rows = TINY_CORPUS if corpus is None else corpus
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rows = TINY_QUERIES if queries is None else queries
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    judged = TINY_QRELS if qrels is None else qrels
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, d, r in judged), encoding="utf-8"
    )
    return folder


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a checkpoint folder (what `--model PATH` loads)."""
    from conftest_models import tiny_lm

    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_lm("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- the search API
# What tests/test_api.py and tests/test_api_server.py serve: bm25 over API_CORPUS, reranked by a tiny random Llama.
API_CORPUS = {f"d{i}": Passage(f"d{i}", f"Title {i}", f"Passage number {i} about topic {i % 4} and item {i}.")
              for i in range(16)}
API_DATASET = Dataset(name="api-tiny", corpus=API_CORPUS, queries={}, source="tests/conftest.py")


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedLM:
    """A tiny random Llama (`LoadedLM`), built once per session; nothing mutates it."""
    from conftest_models import tiny_lm

    return tiny_lm("llama")


@pytest.fixture(scope="session")
def api_retriever() -> Retriever:
    """BM25 over API_CORPUS, the first stage of `api_pipeline`."""
    from kvrank.retriever import RetrieverConfig, build_or_load

    return build_or_load("bm25", API_DATASET, config=RetrieverConfig(show_progress=False))


class GatedStore:
    """Wraps a pipeline's KV store; lookups wait while `gate` is closed, which holds the model worker busy on
    demand (`waiting` is set once a lookup waits). Everything else goes to the wrapped store."""

    def __init__(self) -> None:
        self.inner: Any = None
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def around(self, inner: Any) -> GatedStore:
        self.inner = inner
        return self

    def get_many(self, keys: Sequence[Any]) -> list[Any]:
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(10)
        return self.inner.get_many(keys)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def api_pipeline(lm: LoadedLM, retriever: Retriever, *, mode: str = "ql", batch_size: int = 4,
                 **config: Any) -> SearchPipeline:
    """`kvrank.pipeline.build` over API_DATASET with the given LM and first stage. Passage KV is stored
    uncompressed (`kv_format="none"`), so scores equal a plain `BlockReranker(RerankerConfig(...), lm=lm)`'s."""
    from kvrank.pipeline import PipelineConfig, build
    from kvrank.reranker.reranker import RerankerConfig

    settings = {"retriever": "bm25", "reranker": RerankerConfig(kv_format="none", mode=mode, batch_size=batch_size),
                "kv_format": "none", **config}
    return build(PipelineConfig(**settings), API_DATASET, lm=lm, first_stage=retriever)


def make_app(lm: LoadedLM, retriever: Retriever, store: GatedStore | None = None, *, batch_size: int = 4,
             **settings: Any) -> FastAPI:
    """The API (`create_app`) over `api_pipeline`, with `Settings(**settings)`; `store` wraps the pipeline's
    KV store (before the app reads it)."""
    from kvrank.api.app import create_app
    from kvrank.api.settings import Settings

    pipeline = api_pipeline(lm, retriever, batch_size=batch_size)
    assert pipeline.reranker is not None
    if store is not None:
        pipeline.reranker.store = store.around(pipeline.reranker.store)
    return create_app(pipeline, Settings(**settings))
