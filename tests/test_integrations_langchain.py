"""The LangChain document compressor (kvrank.integrations.langchain) with the real langchain-core and
langchain-classic, over a tiny random Llama: the order and the scores are `Reranker.rank`'s on the same texts."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402

from kvrank.errors import KvrankError  # noqa: E402
from kvrank.integrations.langchain import KvrankRerank  # noqa: E402
from kvrank.library import Reranker  # noqa: E402

QUERY = "which planet is the largest"
# What the reranker should see for each document: page_content as text, metadata["title"] as title when present.
PASSAGES = [
    {"text": "Cats are small domestic felines that purr and hunt mice.", "title": "Cats"},
    {"text": "Jupiter is the largest planet in the solar system.", "title": "Jupiter"},
    {"text": "Paris is the capital and largest city of France."},
    {"text": "Mars is a cold red planet with the tallest volcano.", "title": "Mars"},
    {"text": "Rust is a systems programming language focused on memory safety.", "title": "Rust"},
]


def as_langchain(passages: list[dict[str, str]]) -> list[Document]:
    return [Document(page_content=p["text"], id=f"d{i}", metadata={"source": f"s{i}", **({"title": p["title"]}
                     if "title" in p else {})}) for i, p in enumerate(passages)]


@pytest.fixture(scope="module")
def reranker(tiny_llama) -> Iterator[Reranker]:
    with Reranker(tiny_llama, kv_format="none", head="none") as reranker:
        yield reranker


def expected(reranker: Reranker, passages: list[dict[str, str]], top_k: int | None) -> list[tuple[int, float]]:
    return [(hit["corpus_id"], hit["score"]) for hit in reranker.rank(QUERY, passages, top_k=top_k)]


def got(documents: list[Document], out: list[Document]) -> list[tuple[int, float]]:
    return [(next(i for i, d in enumerate(documents) if d.id == doc.id), doc.metadata["relevance_score"])
            for doc in out]


@pytest.mark.parametrize("top_n", [None, 1, 3, 5, 9])
def test_order_and_scores_are_reranker_rank(reranker: Reranker, top_n: int | None) -> None:
    documents = as_langchain(PASSAGES)
    out = list(KvrankRerank(top_n=top_n, reranker=reranker).compress_documents(documents, QUERY))
    want = expected(reranker, PASSAGES, top_n)
    assert len(out) == min(top_n or len(PASSAGES), len(PASSAGES))
    assert [i for i, _ in got(documents, out)] == [i for i, _ in want]
    assert [s for _, s in got(documents, out)] == pytest.approx([s for _, s in want], abs=1e-6)
    assert all(type(doc.metadata["relevance_score"]) is float for doc in out)


def test_title_comes_from_metadata(reranker: Reranker) -> None:
    """A title in the metadata is scored with the passage: the same text without it scores differently."""
    documents = as_langchain(PASSAGES[:2])
    untitled = [Document(page_content=d.page_content, id=d.id) for d in documents]
    compressor = KvrankRerank(top_n=None, reranker=reranker)
    titled_scores = {d.id: d.metadata["relevance_score"] for d in compressor.compress_documents(documents, QUERY)}
    plain_scores = {d.id: d.metadata["relevance_score"] for d in compressor.compress_documents(untitled, QUERY)}
    assert titled_scores != pytest.approx(plain_scores, abs=1e-6)
    assert [s for _, s in expected(reranker, [{"text": p["text"]} for p in PASSAGES[:2]], None)] == pytest.approx(
        sorted(plain_scores.values(), reverse=True), abs=1e-6)


def test_metadata_kept_and_inputs_unchanged(reranker: Reranker) -> None:
    documents = as_langchain(PASSAGES)
    before = copy.deepcopy(documents)
    out = KvrankRerank(top_n=3, reranker=reranker).compress_documents(documents, QUERY)
    assert documents == before  # no relevance_score written into the caller's documents
    by_id = {d.id: d for d in documents}
    for doc in out:
        original = by_id[doc.id]
        assert doc.page_content == original.page_content
        assert doc.metadata == {**original.metadata, "relevance_score": doc.metadata["relevance_score"]}


def test_empty_documents(reranker: Reranker) -> None:
    assert list(KvrankRerank(reranker=reranker).compress_documents([], QUERY)) == []


@pytest.mark.parametrize("top_n", [0, -1, 2.5, True])
def test_bad_top_n(reranker: Reranker, top_n: object) -> None:
    with pytest.raises(KvrankError, match="top_n must be"):
        KvrankRerank(top_n=top_n, reranker=reranker)  # type: ignore[arg-type]
    compressor = KvrankRerank(reranker=reranker)
    with pytest.raises(KvrankError, match="top_n must be"):
        compressor.top_n = top_n  # type: ignore[assignment]


def test_reranker_or_options_not_both(reranker: Reranker) -> None:
    with pytest.raises(KvrankError, match="not both"):
        KvrankRerank(reranker=reranker, mode="attn")


def test_builds_its_reranker_from_options(tiny_llama, reranker: Reranker) -> None:
    """Without `reranker=`, the options build one, which ranks as `Reranker` with the same options does."""
    compressor = KvrankRerank(top_n=None, model=tiny_llama, kv_format="none", head="none")
    documents = as_langchain(PASSAGES)
    with compressor.reranker:
        out = compressor.compress_documents(documents, QUERY)
    want = expected(reranker, PASSAGES, None)
    assert [i for i, _ in got(documents, list(out))] == [i for i, _ in want]
    assert [s for _, s in got(documents, list(out))] == pytest.approx([s for _, s in want], abs=1e-6)


def test_async_matches_sync(reranker: Reranker) -> None:
    documents = as_langchain(PASSAGES)
    compressor = KvrankRerank(top_n=3, reranker=reranker)
    sync = compressor.compress_documents(documents, QUERY)
    out = asyncio.run(compressor.acompress_documents(documents, QUERY))
    assert [d.id for d in out] == [d.id for d in sync]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx(
        [d.metadata["relevance_score"] for d in sync], abs=1e-6)


def test_in_contextual_compression_retriever(reranker: Reranker) -> None:
    """In LangChain's own retrieve-then-rerank: a vector store's top 4 (fake, deterministic embeddings), reranked."""
    retrievers = pytest.importorskip("langchain_classic.retrievers")
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents(as_langchain(PASSAGES))
    base = store.as_retriever(search_kwargs={"k": 4})
    retriever = retrievers.ContextualCompressionRetriever(
        base_compressor=KvrankRerank(top_n=2, reranker=reranker), base_retriever=base)

    out = retriever.invoke(QUERY)
    first_stage = base.invoke(QUERY)
    assert len(first_stage) == 4
    want = expected(reranker, [{"text": d.page_content, "title": d.metadata["title"]} if "title" in d.metadata
                               else {"text": d.page_content} for d in first_stage], 2)
    assert [d.id for d in out] == [first_stage[i].id for i, _ in want]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([s for _, s in want], abs=1e-6)
    assert [d.id for d in asyncio.run(retriever.ainvoke(QUERY))] == [d.id for d in out]
