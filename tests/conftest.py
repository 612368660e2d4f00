"""Shared fixtures: an isolated index cache for the whole session, the bundled MiniLM encoder loaded once, tiny
BEIR folders written into tmp_path, and a tiny Llama checkpoint folder for `--model PATH`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


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
