"""The LlamaIndex node postprocessor (kvrank.integrations.llama_index) with the real llama-index-core, over a tiny
random Llama: the order and the scores are `Reranker.rank`'s on the same texts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import VectorStoreIndex  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.response_synthesizers.no_text import NoText  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

from kvrank.errors import KvrankError  # noqa: E402
from kvrank.integrations.llama_index import KvrankRerank  # noqa: E402
from kvrank.library import Reranker  # noqa: E402

QUERY = "which planet is the largest"
# What the reranker should see for each node: its text as text, metadata["title"] as title when present.
PASSAGES = [
    {"text": "Cats are small domestic felines that purr and hunt mice.", "title": "Cats"},
    {"text": "Jupiter is the largest planet in the solar system.", "title": "Jupiter"},
    {"text": "Paris is the capital and largest city of France."},
    {"text": "Mars is a cold red planet with the tallest volcano.", "title": "Mars"},
    {"text": "Rust is a systems programming language focused on memory safety.", "title": "Rust"},
]


def as_nodes(passages: list[dict[str, str]]) -> list[NodeWithScore]:
    """Retrieved nodes with a first-stage score each (0.9, 0.8, ...) and some metadata besides the title."""
    return [NodeWithScore(node=TextNode(text=p["text"], id_=f"d{i}", metadata={
        "source": f"s{i}", **({"title": p["title"]} if "title" in p else {})}), score=0.9 - 0.1 * i)
        for i, p in enumerate(passages)]


def as_passage(node: NodeWithScore) -> dict[str, str]:
    title = node.node.metadata.get("title")
    return {"text": node.node.get_content(), **({"title": title} if title else {})}


@pytest.fixture(scope="module")
def reranker(tiny_llama) -> Iterator[Reranker]:
    with Reranker(tiny_llama, kv_format="none", head="none") as reranker:
        yield reranker


def expected(reranker: Reranker, nodes: list[NodeWithScore], top_k: int | None) -> list[tuple[str, float]]:
    """(node id, score) as `Reranker.rank` orders the nodes' passages."""
    hits = reranker.rank(QUERY, [as_passage(n) for n in nodes], top_k=top_k)
    return [(nodes[hit["corpus_id"]].node.node_id, hit["score"]) for hit in hits]


def assert_same(out: list[NodeWithScore], want: list[tuple[str, float]]) -> None:
    assert [n.node.node_id for n in out] == [node_id for node_id, _ in want]
    assert [n.score for n in out] == pytest.approx([score for _, score in want], abs=1e-6)


@pytest.mark.parametrize("top_n", [None, 1, 3, 5, 9])
def test_order_and_scores_are_reranker_rank(reranker: Reranker, top_n: int | None) -> None:
    nodes = as_nodes(PASSAGES)
    out = KvrankRerank(top_n=top_n, reranker=reranker).postprocess_nodes(nodes, QueryBundle(QUERY))
    assert len(out) == min(top_n or len(PASSAGES), len(PASSAGES))
    assert_same(out, expected(reranker, nodes, top_n))
    assert all(type(n.score) is float for n in out)


def test_query_str_and_async(reranker: Reranker) -> None:
    nodes = as_nodes(PASSAGES)
    rerank = KvrankRerank(top_n=2, reranker=reranker)
    want = expected(reranker, nodes, 2)
    assert_same(rerank.postprocess_nodes(nodes, query_str=QUERY), want)
    assert_same(asyncio.run(rerank.apostprocess_nodes(nodes, query_str=QUERY)), want)


def test_inputs_unchanged(reranker: Reranker) -> None:
    """The given NodeWithScores keep their retrieval scores; the returned ones wrap the same nodes."""
    nodes = as_nodes(PASSAGES)
    out = KvrankRerank(top_n=3, reranker=reranker).postprocess_nodes(nodes, query_str=QUERY)
    assert [n.score for n in nodes] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    by_id = {n.node.node_id: n.node for n in nodes}
    assert all(n.node is by_id[n.node.node_id] for n in out)
    assert [n.node.metadata for n in nodes] == [{"source": f"s{i}", **({"title": p["title"]} if "title" in p
                                                                        else {})} for i, p in enumerate(PASSAGES)]


def test_title_comes_from_metadata(reranker: Reranker) -> None:
    nodes = as_nodes(PASSAGES[:2])
    untitled = [NodeWithScore(node=TextNode(text=n.node.get_content(), id_=n.node.node_id)) for n in nodes]
    rerank = KvrankRerank(top_n=None, reranker=reranker)
    titled = {n.node.node_id: n.score for n in rerank.postprocess_nodes(nodes, query_str=QUERY)}
    plain = {n.node.node_id: n.score for n in rerank.postprocess_nodes(untitled, query_str=QUERY)}
    assert titled != pytest.approx(plain, abs=1e-6)


def test_empty_nodes(reranker: Reranker) -> None:
    assert KvrankRerank(reranker=reranker).postprocess_nodes([], query_str=QUERY) == []


def test_no_query(reranker: Reranker) -> None:
    with pytest.raises(KvrankError, match="needs the query"):
        KvrankRerank(reranker=reranker).postprocess_nodes(as_nodes(PASSAGES))


@pytest.mark.parametrize("top_n", [0, -1, 2.5, True])
def test_bad_top_n(reranker: Reranker, top_n: object) -> None:
    with pytest.raises(KvrankError, match="top_n must be"):
        KvrankRerank(top_n=top_n, reranker=reranker)  # type: ignore[arg-type]
    rerank = KvrankRerank(reranker=reranker)
    rerank.top_n = top_n  # type: ignore[assignment]
    with pytest.raises(KvrankError, match="top_n must be"):
        rerank.postprocess_nodes(as_nodes(PASSAGES), query_str=QUERY)


def test_reranker_or_options_not_both(reranker: Reranker) -> None:
    with pytest.raises(KvrankError, match="not both"):
        KvrankRerank(reranker=reranker, mode="attn")


def test_builds_its_reranker_from_options(tiny_llama, reranker: Reranker) -> None:
    rerank = KvrankRerank(top_n=None, model=tiny_llama, kv_format="none", head="none")
    nodes = as_nodes(PASSAGES)
    with rerank.reranker:
        out = rerank.postprocess_nodes(nodes, query_str=QUERY)
    assert_same(out, expected(reranker, nodes, None))


def test_in_a_query_engine(reranker: Reranker) -> None:
    """In LlamaIndex's own retrieve-then-rerank: a vector index's top 4 (mock embeddings), reranked, no LLM call."""
    index = VectorStoreIndex([n.node for n in as_nodes(PASSAGES)], embed_model=MockEmbedding(embed_dim=8))
    retriever = index.as_retriever(similarity_top_k=4)
    engine = RetrieverQueryEngine(retriever, response_synthesizer=NoText(llm=MockLLM()),
                                  node_postprocessors=[KvrankRerank(top_n=2, reranker=reranker)])
    response = engine.query(QUERY)
    first_stage = retriever.retrieve(QUERY)
    assert len(first_stage) == 4
    assert_same(response.source_nodes, expected(reranker, first_stage, 2))
