"""kvrank as a LlamaIndex node postprocessor: rerank retrieved nodes, keep the best `top_n`.

    from llama_index.core import VectorStoreIndex
    from kvrank.integrations.llama_index import KvrankRerank

    index = VectorStoreIndex.from_documents(documents)
    query_engine = index.as_query_engine(similarity_top_k=20, node_postprocessors=[KvrankRerank(top_n=3)])
    # or without an LLM: rerank what a retriever found
    nodes = KvrankRerank(top_n=3).postprocess_nodes(index.as_retriever().retrieve(query), query_str=query)
    nodes[0].score  # kvrank's score, best first

Needs `pip install 'kvrank[llama-index]'` (llama-index-core).
"""

from __future__ import annotations

from typing import Any

try:
    from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
    from llama_index.core.callbacks import CBEventType, EventPayload
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - exercised by simulating the missing package
    raise ImportError(
        "kvrank.integrations.llama_index needs LlamaIndex: pip install 'kvrank[llama-index]'"
    ) from exc

from kvrank.errors import KvrankError
from kvrank.integrations._common import as_document, check_top_n, make_reranker
from kvrank.library import Reranker

dispatcher = get_dispatcher(__name__)


class KvrankRerank(BaseNodePostprocessor):
    """Rerank LlamaIndex nodes with a `kvrank.Reranker` and keep the best `top_n`, best first.

    Returns new `NodeWithScore`s over the same nodes with `score` set to kvrank's score; the given `NodeWithScore`s
    keep their retrieval scores. The reranker reads each node's content without metadata
    (`MetadataMode.NONE`) as the passage text and `metadata["title"]`, when present, as its title. Order and scores
    are exactly `Reranker.rank`'s.

    Args:
        top_n: nodes to return (>= 1); None returns every node, reranked.
        reranker: a `kvrank.Reranker` to share (its owner closes it); by default one is built from `options`.
        **options: `kvrank.Reranker`'s keyword arguments (`model`, `mode`, `store`, `kv_format`, `head`,
            `device`, `dtype`, ...), when `reranker` is not given.

    Example:
        ```python
        rerank = KvrankRerank(top_n=2, reranker=kvrank.Reranker(mode="ql"))  # or Reranker options: mode="ql", ...
        nodes = rerank.postprocess_nodes(retrieved_nodes, query_str="largest planet")
        [(node.node.get_content(), node.score) for node in nodes]
        ```
    """

    top_n: int | None = Field(default=3, description="Nodes to return, best first; None returns them all.")
    _reranker: Reranker = PrivateAttr()

    def __init__(self, top_n: int | None = 3, reranker: Reranker | None = None, **options: Any) -> None:
        check_top_n(top_n)  # before a model is loaded for nothing
        fields: dict[str, Any] = {"top_n": top_n}
        super().__init__(**fields)  # a dict: type checkers see the base's field-less __init__
        self._reranker = make_reranker(reranker, options)

    @field_validator("top_n", mode="before")
    @classmethod
    def _valid_top_n(cls, top_n: Any) -> int | None:  # before pydantic's own int coercion (2.0 -> 2, True -> 1)
        return check_top_n(top_n)

    @classmethod
    def class_name(cls) -> str:
        return "KvrankRerank"

    @property
    def reranker(self) -> Reranker:
        """The `kvrank.Reranker` that scores the nodes."""
        return self._reranker

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise KvrankError("KvrankRerank needs the query: call postprocess_nodes(nodes, query_str=...) or pass "
                              "a QueryBundle", param="query_bundle")
        top_n = check_top_n(self.top_n)  # again: LlamaIndex does not validate assignments
        model_name = type(self).class_name()
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=top_n or len(nodes),
                                          model_name=model_name))
        if not nodes:
            dispatcher.event(ReRankEndEvent(nodes=[]))
            return []
        payload: dict[str, Any] = {EventPayload.NODES: nodes, EventPayload.MODEL_NAME: model_name,
                                   EventPayload.QUERY_STR: query_bundle.query_str, EventPayload.TOP_K: top_n}
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            documents = [as_document(n.node.get_content(metadata_mode=MetadataMode.NONE), n.node.metadata)
                         for n in nodes]
            ranked = self._reranker.rank(query_bundle.query_str, documents, top_k=top_n)
            reranked = [NodeWithScore(node=nodes[hit["corpus_id"]].node, score=float(hit["score"])) for hit in ranked]
            event.on_end(payload={EventPayload.NODES: reranked})
        dispatcher.event(ReRankEndEvent(nodes=reranked))
        return reranked
