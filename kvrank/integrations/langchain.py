"""kvrank as a LangChain document compressor: rerank what a retriever found, keep the best `top_n`.

    from langchain_classic.retrievers import ContextualCompressionRetriever
    from kvrank.integrations.langchain import KvrankRerank

    retriever = ContextualCompressionRetriever(
        base_compressor=KvrankRerank(top_n=3, mode="ql"),
        base_retriever=vector_store.as_retriever(search_kwargs={"k": 20}),
    )
    docs = retriever.invoke("what is the capital of France")
    docs[0].metadata["relevance_score"]  # kvrank's score, best first

Needs `pip install 'kvrank[langchain]'` (langchain-core; langchain-classic for `ContextualCompressionRetriever`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError as exc:  # pragma: no cover - exercised by simulating the missing package
    raise ImportError(
        "kvrank.integrations.langchain needs LangChain: pip install 'kvrank[langchain]'"
    ) from exc
from pydantic import ConfigDict, field_validator

from kvrank.integrations._common import as_document, check_top_n, make_reranker
from kvrank.library import Reranker


class KvrankRerank(BaseDocumentCompressor):
    """Rerank LangChain `Document`s with a `kvrank.Reranker` and keep the best `top_n`, best first.

    Each returned document is a copy of its input with `metadata["relevance_score"]` (a float, kvrank's score) added
    to the metadata it had; the caller's documents are not changed. The reranker reads `page_content` as the passage
    text and `metadata["title"]`, when present, as its title. Order and scores are exactly `Reranker.rank`'s.

    Args:
        top_n: documents to return (>= 1); None returns every document, reranked.
        reranker: a `kvrank.Reranker` to share (its owner closes it); by default one is built from `options`.
        **options: `kvrank.Reranker`'s keyword arguments (`model`, `mode`, `store`, `kv_format`, `head`,
            `device`, `dtype`, ...), when `reranker` is not given.

    Example:
        ```python
        compressor = KvrankRerank(top_n=2, mode="ql", store="~/.cache/my-kv")  # a Reranker built from options
        docs = compressor.compress_documents(retrieved_docs, "largest planet")
        [(doc.page_content, doc.metadata["relevance_score"]) for doc in docs]
        ```
    """

    reranker: Reranker
    """The `kvrank.Reranker` that scores the documents."""
    top_n: int | None = 3
    """Number of documents to return; None returns them all, reranked."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", validate_assignment=True)

    def __init__(self, top_n: int | None = 3, reranker: Reranker | None = None, **options: Any) -> None:
        check_top_n(top_n)  # before a model is loaded for nothing
        fields: dict[str, Any] = {"top_n": top_n, "reranker": make_reranker(reranker, options)}
        super().__init__(**fields)  # a dict: type checkers see the base's field-less __init__

    @field_validator("top_n", mode="before")
    @classmethod
    def _valid_top_n(cls, top_n: Any) -> int | None:  # before pydantic's own int coercion (2.0 -> 2, True -> 1)
        return check_top_n(top_n)

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """The best `top_n` of `documents` for `query`, best first, each with `metadata["relevance_score"]`."""
        documents = list(documents)
        if not documents:
            return []
        ranked = self.reranker.rank(
            query, [as_document(doc.page_content, doc.metadata) for doc in documents], top_k=self.top_n
        )
        out = []
        for hit in ranked:
            doc = documents[hit["corpus_id"]]
            metadata = {**doc.metadata, "relevance_score": float(hit["score"])}
            out.append(doc.model_copy(update={"metadata": metadata}))
        return out
