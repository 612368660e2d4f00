"""What both integrations share: the `top_n` check, the `Reranker` they wrap, and the document they hand it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvrank.errors import KvrankError
from kvrank.library import Reranker, check_count


def check_top_n(top_n: int | None) -> int | None:
    """`top_n` as given, if it is an integer >= 1 or None (keep every document, reranked)."""
    check_count("top_n", top_n, none="to keep every document")
    return top_n


def make_reranker(reranker: Reranker | None, options: Mapping[str, Any]) -> Reranker:
    """The `Reranker` given, or a new one built from `options` (`Reranker`'s own keyword arguments)."""
    if reranker is None:
        return Reranker(**options)
    if options:
        raise KvrankError(f"pass either reranker= or the options to build one ({', '.join(sorted(options))}), "
                          "not both", param="reranker")
    if not isinstance(reranker, Reranker):
        raise KvrankError(f"reranker must be a kvrank.Reranker, got {type(reranker).__name__}", param="reranker")
    return reranker


def as_document(text: str, metadata: Mapping[str, Any]) -> dict[str, str]:
    """A `Reranker` document: the text, with the metadata's `title` when it has a non-empty one."""
    title = metadata.get("title")
    return {"text": text, "title": title} if isinstance(title, str) and title else {"text": text}
